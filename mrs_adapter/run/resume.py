"""What makes a run reproducible and resumable: its seeds, its RNG state, its recorded settings.

A seed's run folder holds:
- config.json: every setting, resolved;
- last.pt: the trained tensors, the optimizer, the RNG state of `rng_state`
  and the selection so far; train.py writes it at the end of every epoch.
`--resume` continues from last.pt only with the settings of config.json, less those in
RESUMABLE, so that a resumed run ends exactly as an uninterrupted one
(tests/test_train.py checks it).
"""
import json
import os
import random
from contextlib import contextmanager
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ..atomic import write_json
from ..checkpoint import load_trainable, save_trainable
from ..metrics import format_table
from .checks import disk_full
from .files import RunLog, read_jsonl


def seed_everything(seed: int):
    """seed -> None: the published seeding (docs/method.md §4).

    python `seed`, numpy `seed + 1`, torch `seed + 2` (2, 3, 4).
    """
    random.seed(seed)
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 2)


def rng_state() -> dict:
    """() -> dict: every generator's state, as plain values and tensors.

    Loadable with weights_only.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# settings that may differ on --resume: none changes the numbers of the epochs run or to come
# (--epochs extends or shortens the run; the eval batch and the image cache give identical results)
RESUMABLE = ("epochs", "workers", "print_freq", "eval_batch_size", "cache_images", "seeds",
             "resume", "overwrite", "output", "rank", "local_rank")


def run_config(run, seed: int, backbone: dict, dropped: Optional[dict]) -> dict:
    """(run, seed, backbone, dropped) -> config.json of one seed, less the environment.

    - Every setting as resolved (run/args.py).
    - What the run found: the `backbone` it loaded
      (clip.load's record: the name or file given, its path, sha256 and MLP activation;
      eval.py and search.py rebuild the model from it).
    - The training and validation images it `dropped` as copies of test images (load_data).
    """
    settings = {k: v for k, v in vars(run).items() if k != "amp_dtype"}  # precision records it
    return {**settings, "seed": seed, "backbone": backbone, "dropped_overlap": dropped}


# settings of earlier versions that are gone, with the behaviour that stayed: a run recorded
# with that value resumes
RETIRED = {"separate_views": False}


def check_resume_config(old: dict, new: dict, path: str) -> None:
    """(old, new, path) -> None, or a ValueError listing every setting that differs.

    - `old`: the run's recorded settings, read from `path` (last.pt or config.json).
    - Those in RESUMABLE may differ.
    - A resumed run must continue the run it resumes.
    """
    # as config.json stores them: tuples become lists (last.pt's config keeps tuples)
    new, old = (json.loads(json.dumps({**RETIRED, **c})) for c in (new, old))
    absent = "(not set)"
    changed = [f"{k.replace('_', '-')} {old.get(k, absent)!r} -> {new.get(k, absent)!r}"
               for k in sorted((set(old) | set(new)) - set(RESUMABLE) - {"environment"})
               if old.get(k, absent) != new.get(k, absent)]
    if changed:
        raise ValueError(f"--resume with settings that differ from {path}: {'; '.join(changed)}. "
                         f"Only --epochs, --workers, --print-freq, --eval-batch-size, "
                         f"--no-cache-images, --seeds and --output may change on resume; use "
                         f"another --output for a new run")


def recorded_config(run_dir: str) -> Optional[Tuple[dict, str]]:
    """run_dir -> (the settings its seed ran with, the file they were read from), or None.

    For --resume to compare; None where that seed has not started (it starts afresh).
    - With last.pt: the config it holds, the one the checkpoint was trained with,
      there even where config.json is gone.
    - Without it, the seed starts again from epoch 0 with the settings of its config.json,
      only where nothing past its first epoch would be lost (`lost_without_last`).
    """
    last, config = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "config.json")
    if os.path.isfile(last):
        recorded = _checkpoint_config(last)
        if recorded is not None:
            return recorded, last
        if not os.path.isfile(config):
            raise ValueError(f"--resume: {last} records no settings and {config} is missing, so "
                             f"the run's settings cannot be checked; pass --overwrite to start "
                             f"it again, or another --output")
    else:
        lost = lost_without_last(run_dir)
        if lost:
            raise ValueError(f"--resume: {run_dir} holds {lost} but no last.pt, the checkpoint a "
                             f"run continues from; resuming would train this seed from scratch "
                             f"and replace them. Put last.pt back, or pass --overwrite to start "
                             f"the run again, or another --output")
    return (_read_json(config), config) if os.path.isfile(config) else None


def lost_without_last(run_dir: str) -> str:
    """run_dir -> what a restart of its seed from epoch 0 would replace beyond its first epoch.

    "" for nothing; else:
    - results.json;
    - or a best.pt that log.jsonl does not show to be epoch 0's
      (the one epoch that can end without a last.pt: a stop between the two saves).
    """
    trained = [f for f in ("best.pt", "results.json") if os.path.isfile(os.path.join(run_dir, f))]
    if trained == ["best.pt"]:
        try:
            log = read_jsonl(os.path.join(run_dir, "log.jsonl"))
        except (OSError, ValueError):  # unreadable: it cannot show that
            log = []
        if [r.get("epoch") for r in log if r.get("kind") == "val"] == [0]:
            return ""
    return " and ".join(trained)


def _checkpoint_config(path: str) -> Optional[dict]:
    """path -> the "config" entry of a last.pt, or None.

    Memory-mapped: its tensors are not read.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, or not a torch file
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e)[:200]}); pass --overwrite to start the run again") from e
    return state.get("config") if isinstance(state, dict) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} to compare the settings of the run "
                         f"to resume: {e}") from e


def resumed_log(path: str, epoch: int) -> RunLog:
    """(path, epoch) -> RunLog: log.jsonl as it was at the end of `epoch`.

    Records of the interrupted epoch are dropped, since that epoch runs again.
    """
    return RunLog(path, [r for r in read_jsonl(path) if r.get("epoch", -1) <= epoch])


def save_last(path: str, model, optimizer, epoch: int, step: int, best: dict, initial: dict,
              config: dict) -> None:
    """(path, model, optimizer, epoch, ...) -> None: last.pt written.

    All that start_or_resume needs to continue after `epoch` as if uninterrupted.
    """
    save_trainable(model, path, optimizer=optimizer.state_dict(), epoch=epoch, step=step,
                   rng=rng_state(), best=best, initial=initial, config=config)


def start_or_resume(run, model, optimizer, paths: dict, config: dict, score: Callable,
                    tests: List[str]):
    """Model, optimizer -> (first epoch, global step, best val so far, scores before training, log).

    - With --resume: from last.pt.
    - Else from scratch, scoring the model before training on "val" and `tests` (rank 0).
    - Writes config.json either way (rank 0).
    """
    main_rank = run.rank == 0
    if run.resume and os.path.isfile(paths["last.pt"]):
        state = load_trainable(model, paths["last.pt"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])  # last: building the model drew from the RNGs
        if main_rank:  # train.preflight checked that only RESUMABLE settings differ; record them
            write_json(paths["config.json"], config)
        log, best = resumed_log(paths["log.jsonl"], state["epoch"]), state["best"]
        if main_rank:
            print(f"resuming {os.path.dirname(paths['last.pt'])} at epoch {state['epoch'] + 1} "
                  f"(best val mR {best['mR']:.2f} at epoch {best['epoch']})")
        return state["epoch"] + 1, state["step"], best, state["initial"], log
    if main_rank and run.resume and os.path.isfile(paths["config.json"]):
        print(f"{os.path.dirname(paths['last.pt'])} has no last.pt yet: starting that seed again "
              f"from epoch 0")
    log = RunLog(paths["log.jsonl"])
    initial = {s: score(s) for s in ["val"] + tests} if main_rank else {}
    if main_rank:
        write_json(paths["config.json"], config)
        scores = {f"{s}_{k}": v for s, m in initial.items() for k, v in m.items()}
        log.write(kind="initial", epoch=-1, **scores)
        print(format_table([(f"before training ({k.split(':')[-1]})", initial[k]) for k in tests]))
    return 0, 0, {"mR": -1.0, "epoch": -1}, initial, log


# what an interruption outside a seed's training can say
NOTHING_HALF_WRITTEN = ("no run file is half-written (each is written under a temporary name, "
                        "then renamed)")


def resume_point(run_dir: str, epochs: int) -> str:
    """(run_dir, epochs) -> str: where `--resume` would continue its seed, as its last.pt says."""
    path = os.path.join(run_dir, "last.pt")
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # no last.pt yet (or not one train.py wrote)
        return (f"{run_dir} has no last.pt yet, so the same command with --resume starts that "
                f"seed again from epoch 0")
    then = f"continues from epoch {epoch + 1}" if epoch + 1 < epochs else \
        "tests its best.pt (its training had ended)"
    return f"{path} (end of epoch {epoch}) is intact, and the same command with --resume {then}"


@contextmanager
def stops_explained(run_dir: str, epochs: int):
    """Context manager: Ctrl-C or a full disk while a seed runs -> one line, what is intact.

    - The line says what is intact and where --resume continues.
    - Every run file is written under a temporary name and renamed (atomic.atomic_write),
      so none is ever half-written.
    """
    try:
        yield
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_point(run_dir, epochs)) from None
    except OSError as e:
        explained = disk_full(e, f"the file it would replace and the run's other files are whole "
                                 f"(each is written under a temporary name, then renamed). Free "
                                 f"some space; {resume_point(run_dir, epochs)}")
        if explained is e:  # another OSError: as it was
            raise
        raise explained from e
