"""train.py, eval.py, petl_benchmark.py and the overlap command on bad input and faults: every
check before anything of the user's is removed, one line naming the flag or file, nothing lost
(issue 20: the items numbered in each test's comment), under torchrun too."""
import errno
import json
import os
import shutil
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import petl_benchmark as benchmark
import train
from mrs_adapter import atomic, clip
from mrs_adapter.data import load_splits
from mrs_adapter.prepare import overlap
from mrs_adapter.prepare.cli import main as prepare_main
from mrs_adapter.run import distributed, files, resume


def train_argv(demo, output, *extra):
    root, backbone = demo
    return ["--dataset", "demo", "--data-root", root, "--clip", backbone, "--output", str(output),
            "--epochs", "1", "--lr", "1e-3", "--print-freq", "100", "--device", "cpu", *extra]


def old_run(folder):
    """A run folder as train.py leaves it, with files of the user's named like a run's; returns
    {relative path: bytes} of every file."""
    for name in ("seed2/last.pt", "seed2/best.pt", "seed2/config.json", "results.json",
                 "results.xlsx", "seedlings/plan.txt", "seed2/notes.txt", "notes.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    return tree(folder)


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def no_gpu(monkeypatch):
    """No CUDA device, here or on a machine that has one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def same_images(make_precomp, make_tiny_clip, tmp_path):
    """(data root, CLIP file): an "rsitmd" whose every image is the same picture, so every training
    and validation image is a copy of a test image."""
    root = tmp_path / "same"
    make_precomp(str(root), "rsitmd", n_train=10, n_test=3)
    for image in (root / "rsitmd_images").iterdir():
        Image.new("RGB", (40, 48), (90, 120, 60)).save(image)
    weights = tmp_path / "tiny.pt"
    torch.save(make_tiny_clip().state_dict(), weights)
    return str(root), str(weights)


# 3: what a seed needs is checked before --overwrite removes the old run
def test_overwrite_keeps_the_old_run_when_no_training_image_is_left(same_images, tmp_path):
    before = old_run(tmp_path / "run")
    argv = ["--dataset", "rsitmd", "--test-dataset", "rsitmd", "--data-root", same_images[0],
            "--clip", same_images[1], "--output", str(tmp_path / "run"), "--epochs", "1",
            "--device", "cpu", "--overwrite"]
    with pytest.raises(ValueError, match=r"the train split of rsitmd holds 0 caption-image "
                                         r"pair\(s\) after 8 image\(s\) were dropped as copies "
                                         r"of test images \(--keep-overlap keeps them\); training "
                                         r"needs at least 2"):
        train.main(argv)
    assert tree(tmp_path / "run") == before


def test_overwrite_keeps_the_old_run_when_the_device_is_missing(demo, no_gpu, tmp_path):
    before = old_run(tmp_path / "run")
    argv = train_argv(demo, tmp_path / "run", "--overwrite")
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {device}: torch sees 0 CUDA GPU"):
            train.main(argv + ["--device", device])
    with pytest.raises(ValueError, match="--device gpu: not a device torch knows"):
        train.main(argv + ["--device", "gpu"])
    assert tree(tmp_path / "run") == before


# 4 and 7: --resume continues only what last.pt allows, with last.pt's settings
@pytest.fixture
def finished_run(demo, tmp_path):
    """A run of 2 epochs, trained once for the tests of this module that resume it."""
    train.main(train_argv(demo, tmp_path / "run", "--epochs", "2"))
    return tmp_path / "run"


def test_resume_without_last_pt_refuses_instead_of_training_afresh(demo, finished_run):
    seed = finished_run / "seed2"
    (seed / "last.pt").unlink()
    before = tree(finished_run)
    with pytest.raises(ValueError, match=r"seed2 holds best.pt and results.json but no last.pt"):
        train.main(train_argv(demo, finished_run, "--epochs", "2", "--resume"))
    (seed / "results.json").unlink()  # the log still shows epochs 0 and 1 ended: refused too
    with pytest.raises(ValueError, match=r"seed2 holds best.pt but no last.pt"):
        train.main(train_argv(demo, finished_run, "--epochs", "2", "--resume"))
    del before["seed2/results.json"]
    assert tree(finished_run) == before


def test_a_seed_stopped_in_its_first_epoch_starts_again(demo, tmp_path, capsys):
    train.main(train_argv(demo, tmp_path / "run"))
    seed = tmp_path / "run" / "seed2"
    for name in ("last.pt", "results.json"):  # as a stop between best.pt and last.pt leaves it
        (seed / name).unlink()
    summary = train.main(train_argv(demo, tmp_path / "run", "--resume"))
    assert "has no last.pt yet: starting that seed again from epoch 0" in capsys.readouterr().out
    assert torch.load(seed / "last.pt", weights_only=True)["epoch"] == 0
    assert summary["per_seed"][0]["best_epoch"] == 0


def test_resume_compares_with_last_pt_when_config_json_is_gone(demo, finished_run):
    seed = finished_run / "seed2"
    (seed / "config.json").unlink()
    last = (seed / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"differ from .*seed2/last.pt: batch-size 16 -> 8; "
                                         r"lr 0.001 -> 0.002\."):
        train.main(train_argv(demo, finished_run, "--epochs", "2", "--resume", "--lr", "2e-3",
                              "--batch-size", "8"))
    assert (seed / "last.pt").read_bytes() == last and not (seed / "config.json").exists()


# 5: --overwrite removes the files a run writes and nothing else
def test_overwrite_removes_only_what_a_run_wrote(tmp_path, capsys):
    folder = tmp_path / "run"
    before = old_run(folder)
    (folder / "seed3").mkdir()
    for name in ("seed3/log.jsonl", "seed3/last.pt.k2j4h5l6.tmp", "seed2x/last.pt"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("run")  # a run's files, a killed save's temporary one; not ours
    capsys.readouterr()
    files.prepare_run_dir(str(folder), resume=False, overwrite=True)
    said = capsys.readouterr().out  # what went and how much stayed, in one line
    assert said.startswith("--overwrite: removed 6 file(s) a run wrote in")
    assert "seed3/log.jsonl" in said and said.rstrip().endswith("kept 5 other file(s)")
    kept = {k: v for k, v in before.items()
            if k in ("results.xlsx", "seedlings/plan.txt", "seed2/notes.txt", "notes.txt")}
    assert tree(folder) == {**kept, "seed2x/last.pt": b"run"}
    assert not (folder / "seed3").exists()  # only run files in it: gone with them


# 6 and 15: overlap --csv replaces only its own CSV, refused before any image is hashed
def test_overlap_csv_refuses_a_file_it_did_not_write(two_datasets, tmp_path, monkeypatch, capsys):
    root, _ = two_datasets
    command = ["overlap", "--datasets", "rsitmd", "rsicd", "--data-root", root,
               "--cache", str(tmp_path / "hashes.json")]
    ours = tmp_path / "ours.csv"
    assert prepare_main(command + ["--csv", str(ours)]) == 0
    assert prepare_main(command + ["--csv", str(ours)]) == 0  # its own: replaced
    monkeypatch.setattr(overlap, "hash_image", lambda path: 1 / 0)  # no image may be hashed
    mine = tmp_path / "mine.csv"
    mine.write_text("dataset,file\nrsitmd,a.png\n")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    capsys.readouterr()
    for csv_path, message in ((mine, "mine.csv exists and was not written by the overlap command;"
                                     " choose another --csv"),
                              (tmp_path, "is a folder, not a file; choose another --csv"),
                              (afile / "o.csv", "afile is a file, not a folder")):
        assert prepare_main(command + ["--csv", str(csv_path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert mine.read_text() == "dataset,file\nrsitmd,a.png\n" and afile.read_text() == "mine"


# 8: a value given twice is refused, before any data is read
@pytest.mark.parametrize("flags", [["--seeds", "2", "2"], ["--dataset", "rsitmd", "rsitmd"],
                                   ["--test-dataset", "rsicd", "rsicd"]])
def test_train_refuses_repeated_values(flags, tmp_path):
    argv = ["--dataset", "rsitmd", "--data-root", str(tmp_path / "nodata"),
            "--output", str(tmp_path / "run"), *flags]
    with pytest.raises(ValueError, match=f"{flags[0]} lists {flags[-1]} more than once"):
        train.main(argv)
    assert os.listdir(tmp_path) == []


def test_eval_overlap_and_benchmark_refuse_repeated_values(eval_script, tmp_path, capsys):
    nodata = str(tmp_path / "nodata")
    with pytest.raises(ValueError, match="--dataset lists rsitmd more than once"):
        eval_script.main(["--dataset", "rsitmd", "rsitmd", "--data-root", nodata, "--zero-shot",
                          "--device", "cpu"])
    assert prepare_main(["overlap", "--datasets", "ucm", "ucm", "--data-root", nodata]) == 1
    assert "--datasets lists ucm more than once" in capsys.readouterr().err
    for flags, message in ((["--methods", "zero_shot", "zero_shot"], "--methods lists zero_shot"),
                           (["--seeds", "2", "3", "2"], "--seeds lists 2 more than once"),
                           (["--", "--batch-size", "1"], "--batch-size 1: the hmmc loss")):
        with pytest.raises(ValueError, match=message):  # before zero_shot, the first, runs
            benchmark.main(["--dataset", "rsitmd", "--data-root", nodata,
                            "--output", str(tmp_path / "bench"), *flags])
    assert os.listdir(tmp_path) == []


# 12: a batch of one pair has no negative: refused for both objectives
@pytest.mark.parametrize("objective", ["hmmc", "info_nce"])
def test_a_batch_of_one_pair_is_refused(objective, tmp_path):
    with pytest.raises(ValueError, match=f"--batch-size 1: the {objective} loss needs at least 2 "
                                         f"pairs in a batch.*It is the global batch"):
        train.main(["--dataset", "rsitmd", "--data-root", str(tmp_path / "nodata"),
                    "--objective", objective, "--batch-size", "1"])
    assert os.listdir(tmp_path) == []


# 15: one line naming the file or flag
def test_a_backbone_tensor_of_the_wrong_shape_is_one_line(demo, make_tiny_clip, tmp_path):
    state = make_tiny_clip().state_dict()
    state["visual.proj"] = torch.zeros(128, 31)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    want = (f"CLIP weights {bad}: 1 tensor(s) do not fit the ViT CLIP that the other tensors' "
            f"shapes imply: visual.proj is (128, 31), not (128, 32)")
    with pytest.raises(ValueError) as error:
        clip.load(str(bad))
    assert str(error.value).startswith(want) and "\n" not in str(error.value)
    before = old_run(tmp_path / "run")
    with pytest.raises(ValueError, match="visual.proj is"):  # before --overwrite removes anything
        train.main(train_argv((demo[0], str(bad)), tmp_path / "run", "--overwrite"))
    assert tree(tmp_path / "run") == before


def test_eval_names_a_missing_device_and_bad_counts(eval_script, no_gpu, tmp_path):
    base = ["--dataset", "rsitmd", "--data-root", str(tmp_path / "nodata"), "--zero-shot"]
    for flags, message in ((["--device", "cuda"], "--device cuda: torch sees 0 CUDA GPU"),
                           (["--device", "cuda:2"], "--device cuda:2: torch sees 0 CUDA GPU"),
                           (["--batch-size", "0"], "--batch-size 0: expected a positive number"),
                           (["--workers", "-1"], "--workers -1: expected 0 or more")):
        with pytest.raises(ValueError, match=message):
            eval_script.main(base + flags)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag, value, message", [
    ("--workers", "-1", "--workers -1: expected 0 or more"),
    ("--eval-batch-size", "0", "--eval-batch-size 0: expected a positive number"),
    ("--lr-decay-every", "0", "--lr-decay-every 0: expected a positive number"),
    ("--feature-dropout", "1.5", "--feature-dropout 1.5: expected a probability")])
def test_train_counts_are_checked_before_anything_is_read(flag, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.main(["--dataset", "rsitmd", "--data-root", str(tmp_path / "nodata"), flag, value])
    assert os.listdir(tmp_path) == []


def run_cli(monkeypatch, capsys, argv):
    """train.py as the shell runs it: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    code = train.cli()
    return code, capsys.readouterr().err


def test_a_full_disk_says_which_file_and_what_is_intact(demo, tmp_path, monkeypatch, capsys):
    real = resume.save_trainable

    def full_at_epoch_1(model, path, **extra):  # last.pt of epoch 1 meets a full disk
        if extra.get("epoch") == 1:
            def no_space(f):
                f.write(b"part of a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device")
            atomic.atomic_write(path, no_space, mode="wb")
        return real(model, path, **extra)

    monkeypatch.setattr(resume, "save_trainable", full_at_epoch_1)
    code, err = run_cli(monkeypatch, capsys, train_argv(demo, tmp_path / "run", "--epochs", "3"))
    seed = tmp_path / "run" / "seed2"
    assert code == 1 and err.count("\n") == 1, err
    assert f"no space left on the device to write {seed / 'last.pt'}: the file it would " \
           f"replace and the run's other files are whole" in err
    assert f"{seed / 'last.pt'} (end of epoch 0) is intact, and the same command with --resume " \
           f"continues from epoch 1" in err
    assert torch.load(seed / "last.pt", weights_only=True)["epoch"] == 0
    assert not [p for p in os.listdir(seed) if p.endswith(".tmp")]
    monkeypatch.setattr(resume, "save_trainable", real)  # space again: --resume ends the run
    code, _ = run_cli(monkeypatch, capsys, train_argv(demo, tmp_path / "run", "--epochs", "3",
                                                      "--resume"))
    assert code == 0 and torch.load(seed / "last.pt", weights_only=True)["epoch"] == 2


def test_ctrl_c_says_where_resume_continues(demo, tmp_path, monkeypatch, capsys):
    real_epoch = train.train_one_epoch

    def interrupted_in_epoch_1(run, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(run, epoch, *rest)

    monkeypatch.setattr(train, "train_one_epoch", interrupted_in_epoch_1)
    code, err = run_cli(monkeypatch, capsys, train_argv(demo, tmp_path / "run", "--epochs", "3"))
    last = tmp_path / "run" / "seed2" / "last.pt"
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"interrupted: {last} (end of epoch 0) is intact, and the "
                                    f"same command with --resume continues from epoch 1")


def test_overlap_names_absent_data_and_unreadable_images(two_datasets, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(two_datasets[0], root)
    command = ["overlap", "--datasets", "rsitmd", "rsicd", "--data-root", str(root)]
    assert prepare_main(["overlap", "--datasets", "ucm", "--data-root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{root}/ucm_precomp" in err, err
    broken = root / "rsicd_images" / "rsicd_train_3.png"
    broken.write_bytes(broken.read_bytes()[:60])
    assert prepare_main(command) == 1
    err = capsys.readouterr().err
    n = len(every_image(root, "rsitmd", "rsicd"))
    assert err.count("\n") == 1 and f"1 of {n} image(s) cannot be read: cannot read image" in err
    assert str(broken) in err and "python -m mrs_adapter.prepare check" in err
    cached = json.load(open(root / ".image_hashes.json"))["images"]
    assert len(cached) == n - 1 and str(broken) not in cached  # the others: hashed for next time


def every_image(root, *names):
    return {os.path.abspath(p) for n in names for s in load_splits(n, str(root)).values()
            for p in s.image_paths}


@pytest.mark.parametrize("cache", [b"[1, 2, 3]", b'{"version": 2, "images": [1]}',
                                   b"\xff\xfe not json", None])  # None: one malformed entry
def test_a_malformed_hash_cache_is_rebuilt_with_a_warning(two_datasets, tmp_path, capsys, cache):
    root = tmp_path / "data"
    shutil.copytree(two_datasets[0], root)
    path = root / ".image_hashes.json"
    image = os.path.abspath(root / "rsitmd_images" / "rsitmd_test_0.png")
    if cache is None:  # well-formed JSON whose entry for a real, unchanged image is not
        stat = os.stat(image)
        entry = [stat.st_size, stat.st_mtime_ns, "ab", 5, "zz" * 192]
        cache = json.dumps({"version": 2, "images": {image: entry}}).encode()
    path.write_bytes(cache)
    assert prepare_main(["overlap", "--datasets", "rsitmd", "--data-root", str(root)]) == 0
    assert "warning: the hash cache" in capsys.readouterr().out
    rebuilt = json.load(open(path))["images"]
    assert set(rebuilt) == every_image(root, "rsitmd") and len(rebuilt[image][4]) == 384


# every launcher: under torchrun a refusal is one error, and no process waits for the other
def test_refusals_under_torchrun_are_one_error_and_no_wait(
        demo, finished_run, tmp_path, torchrun, error_lines):
    (finished_run / "seed2" / "last.pt").unlink()  # a check rank 0 makes alone (preflight)
    before = tree(finished_run)
    proc = torchrun("train.py", train_argv(demo, finished_run, "--epochs", "2", "--resume"),
                    tmp_path)
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        f"error: --resume: {finished_run / 'seed2'} holds best.pt and results.json but no "
        f"last.pt, the checkpoint a run continues from; resuming would train this seed from "
        f"scratch and replace them. Put last.pt back, or pass --overwrite to start the run "
        f"again, or another --output"], proc.stderr
    assert tree(finished_run) == before
    # a check every process makes alike, before the process group: one error too
    proc = torchrun("train.py", train_argv(demo, tmp_path / "other", "--batch-size", "1"),
                    tmp_path)
    errors = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: --batch-size 1: the hmmc loss needs at least")


def together_worker(rank: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    seen = {}

    def fails_on_rank_1():
        if rank == 1:
            raise FileExistsError("rank 1's check failed")
        return "fine"

    steps = (("rank1", fails_on_rank_1, True), ("rank0 only", lambda: rank, False))
    for name, step, every in steps:
        try:
            seen[name] = ("returned", distributed.together(step, every_rank=every))
        except Exception as e:
            seen[name] = (type(e).__name__, str(e), getattr(e, "reported_by", None))
    json.dump(seen, open(os.path.join(out, f"rank{rank}.json"), "w"))
    dist.destroy_process_group()


def test_together_gives_every_process_the_failure_of_one(tmp_path):
    """distributed.together (train.main's steps): a check that fails on rank 1 alone stops rank 0
    too, with the same error, reported by rank 1 only; a rank-0 step's result reaches no one else
    but the others wait for it."""
    mp.spawn(together_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for seen in ranks:
        assert seen["rank1"] == ["FileExistsError", "rank 1's check failed", 1]
    assert [seen["rank0 only"] for seen in ranks] == [["returned", 0], ["returned", None]]
