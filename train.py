"""Train CLIP + MRS-Adapter with the HMMC loss: the recipe of the paper's tables (method.md 4).

    python train.py --dataset demo                                  # offline, ~2 minutes on 2 CPU cores
    python train.py --dataset rsitmd --data-root data --seeds 2 3 4
    torchrun --nproc_per_node=4 train.py --dataset rsicd --data-root data

Each epoch trains on the training split, validates on the validation split (never the test
split), and keeps the checkpoint of best validation mR; the end of the run reports that
checkpoint on test. Several seeds give mean +- std. A run folder holds config.json, log.jsonl,
last.pt (resumable), best.pt and results.json, each written atomically.
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from mrs_adapter import clip
from mrs_adapter.check import verify_images
from mrs_adapter.checkpoint import load_trainable, print_trainable_parameters, save_trainable
from mrs_adapter.cuda_graph import GraphedStep
from mrs_adapter.data import CAPTIONS_PER_IMAGE, DATASETS, check_command, load_splits, union_splits
from mrs_adapter.datasets import TrainDataset, eval_loaders
from mrs_adapter.download import DownloadError
from mrs_adapter.loss import hmmc_loss, info_nce
from mrs_adapter.methods import METHODS, apply_method, default_lr, freeze_unread, method_options
from mrs_adapter.metrics import METRICS, chance_recall, evaluate, format_table
from mrs_adapter.overlap import default_cache, drop_copies
from mrs_adapter.runfiles import (RunLog, check_folder_writable, environment, prepare_run_dir,
                                  read_jsonl, write_json)



def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    names = ["rsitmd", "rsicd", "ucm", "sydney", "demo"]
    a("--dataset", dest="datasets", nargs="+", required=True, choices=names,
      help="demo: generated offline (README 'Data' for the others); several: train on the union "
           "of their training splits, select on the union of their validation splits, test on "
           "each test split")
    a("--test-dataset", nargs="+", choices=names,
      help="transfer: test on these datasets' test splits instead (README 'Several datasets')")
    a("--keep-overlap", action="store_true", help="with several datasets or --test-dataset, keep "
      "the training and validation images that are copies of test images (the published, leaky "
      "setting)")
    a("--data-root", default="data", help="folder holding the datasets (README 'Data'); default: data")
    a("--layout", choices=["precomp", "json"], help="force an annotation layout (default: the dataset's usual one)")
    a("--image-dir", help="image folder (default: <data-root>/<dataset>_images)")
    a("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE,
      help="captions of each image where a file-name list has one line per image (default 5, "
           "as every known dataset); another ratio is an error")
    a("--clip", help="CLIP weights: a name of clip.available_models() or a file (default: ViT-B/32, as in the "
                     "paper; the demo uses a tiny CLIP pre-trained offline and cached in <data-root>)")
    a("--clip-activation", choices=clip.ACTIVATIONS,
      help="CLIP's MLP activation (default: a named backbone's own; QuickGELU, OpenAI's, for a "
           "file; e.g. gelu for SkyCLIP ViT-B/32); recorded in the run")
    a("--clip-sha256", help="the sha256 the CLIP weights must have (pins a backbone published "
                            "without one)")
    a("--method", default="mrs_adapter", choices=sorted(METHODS), help="PETL method (default: the paper's)")
    a("--objective", default="hmmc", choices=["hmmc", "info_nce"], help="loss (default: HMMC, Sec. III-C)")
    a("--margin", type=float, default=0.2, help="HMMC hinge margin (paper: 0.2)")
    a("--loss-weights", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="HMMC weights (paper: 1 1 1)")
    a("--feature-dropout", type=float, default=0.2, help="dropout of the augmented views (paper: 0.2)")
    a("--adapter-dropout", type=float, help="the method's `dropout` option (default: the method's; "
                                             "MRS-Adapter: 0.5, the paper's)")
    a("--bottleneck", type=int, help="the method's `bottleneck` option (default: the method's; "
                                     "MRS-Adapter: 64, the paper's)")
    a("--lr", type=float, help="Adam learning rate (default: the method's, methods.default_lr: 2e-4 as in the "
                               "paper for the PETL methods, 5e-6 for full fine-tuning)")
    a("--lr-decay", type=float, default=0.7, help="lr factor (paper: x0.7)")
    a("--lr-decay-start", type=int, default=19, help="first 0-indexed epoch with decayed lr (paper: 19)")
    a("--lr-decay-every", type=int, default=20, help="epochs between decays (paper: 20)")
    a("--epochs", type=int, default=30, help="training epochs (paper: 30)")
    a("--batch-size", type=int, default=16, help="GLOBAL batch of caption-image pairs (paper: 16)")
    a("--eval-batch-size", type=int, help="evaluation batch (paper: 64, the CPU default; 512 on CUDA, where "
                                          "64 leaves the GPU idle; each item is encoded alone, so results do not change)")
    a("--seeds", type=int, nargs="+", default=[2], help="one run per seed s: python s, numpy s+1, torch s+2 "
                                                        "(paper: 2, 3, 4, i.e. --seeds 2)")
    a("--output", help="run folder (default: runs/<dataset>-<method>; several: "
                       "runs/rsitmd+rsicd-<method>, runs/rsicd-to-rsitmd-<method>)")
    a("--resume", action="store_true", help="continue the run in --output from its last.pt")
    a("--overwrite", action="store_true", help="replace the run files in a non-empty --output")
    a("--precision", choices=["fp32", "bf16", "fp16"], help="autocast dtype on CUDA (default bf16); CPU: fp32")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=int, help="DataLoader workers per process (default: min(8, CPUs) on CUDA; 0 on CPU, "
                                  "where the model needs the cores and cached images cost little to serve)")
    a("--no-cache-images", dest="cache_images", action="store_false",
      help="decode images every epoch instead of once into memory (the recipe has no image augmentation)")
    a("--separate-views", action="store_true", help="encode clean and dropout views in separate passes "
                                                    "(same distribution as the default single batched pass)")
    a("--compile", action="store_true", help="torch.compile the training forward (an option; see README 'Speed')")
    a("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
      help="launch every kernel of a training step from Python instead of replaying a recorded CUDA graph "
           "(default: graphs on one CUDA device with bf16/fp32; off on CPU, under torchrun, with fp16 or --compile)")
    a("--print-freq", type=int, default=50, help="steps between progress lines (and non-finite loss checks)")
    return p


def seed_everything(seed: int):
    """The published seeding: python `seed`, numpy `seed + 1`, torch `seed + 2` (2, 3, 4)."""
    random.seed(seed)
    np.random.seed(seed + 1)
    torch.manual_seed(seed + 2)


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached], "torch": torch.get_rng_state()}
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


class Views(nn.Module):
    """One training forward (method.md 3): v, t and, for HMMC, the feature-dropout views v', t'."""

    def __init__(self, model: nn.Module, feature_dropout: float, both_views: bool, separate: bool = False):
        super().__init__()
        self.model, self.p, self.both_views, self.separate = model, feature_dropout, both_views, separate

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        m = self.model
        if not self.both_views:
            return m.encode_image(images), m.encode_text(tokens, trim=False)
        if self.separate:
            return (m.encode_image(images), m.encode_text(tokens, trim=False),
                    m.encode_image(images, self.p), m.encode_text(tokens, self.p, trim=False))
        # the training loader trims the tokens already (collate_trimmed)
        (v, v_aug), (t, t_aug) = m.encode_image_views(images, self.p), m.encode_text_views(tokens, self.p, trim=False)
        return v, t, v_aug, t_aug


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (world * B, D); this rank's rows keep their gradient, the others are constants."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def counted_once(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, whose gradient every rank takes 1/world of. A parameter the loss reads directly
    (not through this rank's rows, like logit_scale) gets the whole gradient on every rank; after
    forward_backward's x world and DDP's mean it must count once, not world times."""
    if not dist.is_initialized():
        return t
    return t + (t.detach() - t) * (1 - 1 / dist.get_world_size())


def compute_loss(args, model: nn.Module, embeddings):
    """(loss, {term: value}) on the global batch: with several processes the embeddings are gathered first."""
    if dist.is_initialized():
        embeddings = [gather_with_grad(e) for e in embeddings]
    embeddings = [e.float() for e in embeddings]
    if args.objective == "info_nce":
        loss = info_nce(*embeddings, counted_once(model.logit_scale))
        return loss, {"info_nce": loss}
    return hmmc_loss(*embeddings, margin=args.margin, weights=args.loss_weights, return_terms=True)


def lr_at(epoch: int, args) -> float:
    """Step decay: x lr_decay at the start of epoch lr_decay_start and every lr_decay_every after."""
    if epoch < args.lr_decay_start:
        return args.lr
    return args.lr * args.lr_decay ** ((epoch - args.lr_decay_start) // args.lr_decay_every + 1)


METHOD_FLAGS = {"bottleneck": "bottleneck", "adapter_dropout": "dropout"}  # flag -> apply keyword


def resolve_method_options(args) -> dict:
    """Every keyword of the method's `apply` with its value: --bottleneck / --adapter-dropout where
    given, else the method's default. A flag the method has no option for is an error."""
    defaults = method_options(args.method)
    given = {}
    for flag, keyword in METHOD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if keyword not in defaults:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: method {args.method} has no "
                             f"{keyword} option (its options: {', '.join(defaults) or 'none'})")
        given[keyword] = value
    return method_options(args.method, given)


def build_model(args, verbose: bool = True):
    """(CLIP with the method composed in, on args.device; preprocess; all the method's options)."""
    model, preprocess = clip.load(args.clip, device="cpu", activation=args.clip_activation,
                                  sha256=args.clip_sha256)
    args.backbone = model.backbone  # absolute path, sha256, activation: in config.json and best.pt
    if verbose:
        print(clip.describe(model.backbone))
    options = resolve_method_options(args)
    model = freeze_unread(apply_method(model, args.method, options, verbose=False), args.objective)
    if verbose:
        print(f"method {args.method}: ", end="")
        print_trainable_parameters(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method {args.method} trains nothing; evaluate it with `python eval.py --zero-shot`")
    return model.to(args.device), preprocess, options


def forward_backward(args, views: nn.Module, model: nn.Module, images, tokens, scaler):
    """One step's loss on the global batch (and its terms), and its backward."""
    # no autocast weight cache: it cannot live inside a CUDA graph, and each weight is cast once per step anyway
    with torch.autocast("cuda", dtype=args.amp_dtype or torch.float32, enabled=args.amp_dtype is not None,
                        cache_enabled=False):
        loss, terms = compute_loss(args, model, views(images, tokens))
    # DDP averages gradients over ranks; each rank's loss is the global-batch loss whose gradient
    # flows through its own rows only, so x world makes that average the global-batch gradient.
    world = dist.get_world_size() if dist.is_initialized() else 1
    scaler.scale(loss * world).backward()
    return loss, terms


def check_finite(window: list, epoch: int):
    """Raise at the first non-finite loss of `window` [(step, loss, terms)], naming the step and terms.

    Losses stay on the device between checks (every --print-freq steps and at the end of an
    epoch): reading one per step would make the CPU wait for the GPU at every step."""
    finite = torch.isfinite(torch.stack([loss for _, loss, _ in window])).tolist()
    if not all(finite):
        step, loss, terms = window[finite.index(False)]
        detail = ", ".join(f"{k} = {v.item():.4g}" for k, v in terms.items())
        kept = (f"The last good checkpoint (last.pt, end of epoch {epoch - 1}) is kept."
                if epoch > 0 else "No checkpoint was written: the first epoch did not finish.")
        raise FloatingPointError(f"epoch {epoch} step {step}: non-finite loss {loss.item()} "
                                 f"({detail}); stopping. {kept}")
    window.clear()


def collate_trimmed(batch):
    """Default collation, then the token columns after the batch's last end token are dropped
    (on the CPU, in the loader, so the model need not read the ids on the device)."""
    images, tokens, index = default_collate(batch)
    return images, clip.CLIP.trim(tokens), index


def recorded_step(graphs, eager_step, optimizer, images, tokens, batch_size):
    """The CUDA-graphed step for a full batch: recorded on first use and when the lr changes.
    None for other batches, without --cuda-graphs, or after a recording failed (then eager)."""
    if graphs is None or graphs.get("failed") or images.shape[0] != batch_size:
        return None
    if "step" not in graphs or graphs["step"].lr != optimizer.param_groups[0]["lr"]:
        graphs.pop("step", None)  # frees the previous recording first
        try:
            graphs["step"] = GraphedStep(eager_step, optimizer, images, tokens)
        except RuntimeError as e:
            graphs["failed"] = True
            print(f"warning: recording the training step as a CUDA graph failed ({e}); continuing without")
            return None
    return graphs["step"]


def train_one_epoch(args, epoch, views, model, loader, optimizer, scaler, log, step, graphs=None):
    """One pass over the training pairs; returns (global step, mean loss, pairs/s).

    graphs: a dict holding the CUDA-graphed step (--cuda-graphs), recorded at the first full batch
    and again when the learning rate changes; other batches (the last, smaller one) run eagerly."""
    views.train()
    for g in optimizer.param_groups:
        g["lr"] = lr_at(epoch, args)
    world = dist.get_world_size() if dist.is_initialized() else 1
    start, seen, loss_sum, window = time.time(), 0, 0.0, []

    def eager_step(images, tokens):
        loss, terms = forward_backward(args, views, model, images, tokens, scaler)
        scaler.step(optimizer)
        scaler.update()
        return loss, terms

    for i, (images, tokens, _) in enumerate(loader):
        images, tokens = images.to(args.device, non_blocking=True), tokens.to(args.device, non_blocking=True)
        step += 1
        graphed = recorded_step(graphs, eager_step, optimizer, images, tokens, args.batch_size)
        if graphed is not None:
            loss, terms = graphed(images, tokens)
        else:
            optimizer.zero_grad(set_to_none=True)
            loss, terms = eager_step(images, tokens)
        seen += images.shape[0] * world
        loss_sum = loss_sum + loss.detach()
        window.append((step, loss.detach(), {k: v.detach() for k, v in terms.items()}))
        if (i + 1) % args.print_freq == 0 or i + 1 == len(loader):
            check_finite(window, epoch)
            if (i + 1) % args.print_freq == 0 and args.rank == 0:
                rate = seen / (time.time() - start)
                eta = (len(loader) - i - 1) * images.shape[0] * world / rate
                lr, parts = optimizer.param_groups[0]["lr"], " ".join(f"{k} {v.item():.3f}" for k, v in terms.items())
                print(f"epoch {epoch} step {i + 1}/{len(loader)} loss {loss.item():.3f} ({parts}) lr {lr:.2e} "
                      f"{rate:.0f} pairs/s eta {eta:.0f}s", flush=True)
                log.write(kind="train", epoch=epoch, step=step, loss=loss.item(), lr=lr, pairs_per_s=rate,
                          **{k: v.item() for k, v in terms.items()})
    mean_loss = float(loss_sum) / max(len(loader), 1)
    return step, mean_loss, seen / max(time.time() - start, 1e-9)


def run_seed(args, seed: int, splits: dict, run_dir: str) -> dict:
    """Train one seed in `run_dir`, select on validation, test the selected checkpoint; rank 0's results."""
    main_rank, world = args.rank == 0, args.world_size
    paths = {name: os.path.join(run_dir, name) for name in ("config.json", "log.jsonl", "last.pt", "best.pt",
                                                              "results.json")}
    resume = args.resume and os.path.isfile(paths["last.pt"])
    seed_everything(seed)
    model, preprocess, options = build_model(args, verbose=main_rank)
    ctx, amp = model.context_length, args.amp_dtype
    train_set = TrainDataset(splits["train"], preprocess, ctx, cache=args.cache_images)
    # the shuffle order depends on (seed, epoch) alone, so a resumed run sees the same batches
    sampler = DistributedSampler(train_set, num_replicas=world, rank=args.rank, shuffle=True, seed=seed + 2)
    # a recorded step needs fixed shapes, so with CUDA graphs the text keeps its 77 columns
    loader = DataLoader(train_set, args.batch_size // world, sampler=sampler, num_workers=args.workers,
                        collate_fn=default_collate if args.cuda_graphs else collate_trimmed,
                        pin_memory=args.device.startswith("cuda"), persistent_workers=args.workers > 0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                 betas=(0.9, 0.999), weight_decay=0.0, capturable=args.cuda_graphs)
    graphs = {} if args.cuda_graphs else None
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp_dtype == torch.float16)
    views = Views(model, args.feature_dropout, args.objective == "hmmc", args.separate_views)
    if world > 1:
        views = DistributedDataParallel(views, device_ids=[args.local_rank] if args.device.startswith("cuda") else None)
    if args.compile:
        views = torch.compile(views, dynamic=True)  # text length varies per batch (collate_trimmed)
    evals = {s: eval_loaders(splits[s], preprocess, ctx, args.eval_batch_size, args.workers, args.cache_images)
             for s in ["val"] + test_keys(splits)} if main_rank else {}

    def score(split):
        return evaluate(model, *evals[split], splits[split].txt2img, args.device, amp)

    config = {**run_config(args, seed, options), "environment": environment()}
    if resume:
        state = load_trainable(model, paths["last.pt"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best, initial = state["epoch"] + 1, state["step"], state["best"], state["initial"]
        set_rng_state(state["rng"])  # last: building the model above drew from the RNGs
        if main_rank:  # preflight checked that only RESUMABLE settings differ; record them
            write_json(paths["config.json"], config)
        log = RunLog(paths["log.jsonl"], [r for r in read_jsonl(paths["log.jsonl"]) if r.get("epoch", -1) <= state["epoch"]])
        if main_rank:
            print(f"resuming {run_dir} at epoch {start_epoch} (best val mR {best['mR']:.2f} at epoch {best['epoch']})")
    else:
        start_epoch, step, best, log = 0, 0, {"mR": -1.0, "epoch": -1}, RunLog(paths["log.jsonl"])
        initial = {s: score(s) for s in evals} if main_rank else {}
        if main_rank:
            write_json(paths["config.json"], config)
            log.write(kind="initial", epoch=-1, **{f"{s}_{k}": v for s, m in initial.items() for k, v in m.items()})
            rows = [(f"before training ({k.split(':')[-1]})", initial[k])
                    for k in test_keys(splits)]
            print(format_table(rows))
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        t0 = time.time()
        step, mean_loss, rate = train_one_epoch(args, epoch, views, model, loader, optimizer, scaler, log, step,
                                                graphs)
        train_seconds = time.time() - t0
        if main_rank:
            val = score("val")
            val_seconds = time.time() - t0 - train_seconds
            if val["mR"] > best["mR"]:
                best = {"mR": val["mR"], "epoch": epoch}
                save_trainable(model, paths["best.pt"], config=config, epoch=epoch, val=val)
            log.write(kind="val", epoch=epoch, step=step, mean_loss=mean_loss, pairs_per_s=rate, lr=lr_at(epoch, args),
                      train_seconds=train_seconds, val_seconds=val_seconds, **val)
            save_trainable(model, paths["last.pt"], optimizer=optimizer.state_dict(), epoch=epoch, step=step,
                           rng=rng_state(), best=best, initial=initial, config=config)
            print(f"epoch {epoch}: loss {mean_loss:.4f}, {rate:.0f} pairs/s, val mR {val['mR']:.2f} "
                  f"(best {best['mR']:.2f} at epoch {best['epoch']}), {time.time() - t0:.0f}s", flush=True)
        if world > 1:
            dist.barrier()
    if not main_rank:
        return {}
    best_state = load_trainable(model, paths["best.pt"])
    t0 = time.time()
    tests = {k: score(k) for k in test_keys(splits)}
    test = tests["test"] if "test" in tests else {k.split(":", 1)[1]: v for k, v in tests.items()}
    results = {"seed": seed, "best_epoch": best_state["epoch"], "val": best_state["val"], "test": test,
               "test_seconds": time.time() - t0, "initial": initial, "run_dir": run_dir}
    write_json(paths["results.json"], results)
    return results


def test_keys(splits: dict) -> list:
    """The test splits: "test" for one dataset, "test:<name>" per test dataset otherwise."""
    return [k for k in splits if k == "test" or k.startswith("test:")]


def mean_std(values: list) -> tuple:
    """mean and sample std (0 for one seed) over seeds of every metric."""
    mean = {k: statistics.fmean(v[k] for v in values) for k in METRICS}
    std = {k: statistics.stdev([v[k] for v in values]) if len(values) > 1 else 0.0 for k in METRICS}
    return mean, std


def summarize_several(args, results: list, splits: dict) -> dict:
    """One row per test dataset: mean +- std over seeds of every metric."""
    names, several = [k.split(":", 1)[1] for k in test_keys(splits)], len(results) > 1
    stats = {n: mean_std([r["test"][n] for r in results]) for n in names}
    chance = {n: chance_recall(torch.as_tensor(splits[f"test:{n}"].txt2img)) for n in names}
    print(f"\ntrained on {args.dataset}, {len(results)} seed(s), model selected on validation mR "
          f"(union of the validation splits); one row per test split:")
    # rows (name, mean) for one seed, (name, mean, std) for several
    print(format_table([(f"{n} {args.method}", *stats[n][:1 + several]) for n in names]))
    print(format_table([(f"{n} before training", results[0]["initial"][f"test:{n}"]) for n in names]
                       + [(f"{n} chance", chance[n]) for n in names]))
    return {"dataset": args.datasets, "test_datasets": names, "method": args.method,
            "seeds": args.seeds, "mean": {n: stats[n][0] for n in names},
            "std": {n: stats[n][1] for n in names}, "chance": chance,
            "dropped_overlap": args.dropped_overlap, "per_seed": results}


def summarize(args, results: list, splits: dict) -> dict:
    """mean +- std (sample std over seeds; 0 for one seed) of every test metric, printed as a table."""
    if "test" not in splits:
        return summarize_several(args, results, splits)
    mean, std = mean_std([r["test"] for r in results])
    chance = chance_recall(torch.as_tensor(splits["test"].txt2img))
    print(f"\n{args.dataset} test split, {len(results)} seed(s), model selected on validation mR:")
    several = len(results) > 1
    print(format_table([("before training", results[0]["initial"]["test"]),
                        (f"{args.method}" + (" (mean +- std)" if several else ""), mean, std if several else None),
                        ("chance", chance)]))
    return {"dataset": args.dataset, "method": args.method, "seeds": args.seeds, "mean": mean, "std": std,
            "chance": chance, "per_seed": results}


def setup(args):
    """Start the process group under torchrun; fill in the defaults that depend on other flags."""
    if args.method == "zero_shot":  # before any process group: under torchrun all ranks stop alike
        raise ValueError("--method zero_shot trains nothing; "
                         "evaluate it with `python eval.py --zero-shot`")
    resolve_method_options(args)  # a flag the method lacks fails before any file is written
    args.world_size, args.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device)
    if args.world_size == 1 and device.type == "cuda" and device.index is not None:
        # cuda:N: current before anything is allocated there (the pin-memory thread, GradScaler,
        # the CUDA-graph pool and autocast all use the current device, cuda:0 until told otherwise)
        torch.cuda.set_device(args.device)
    if args.world_size > 1:
        if args.device.startswith("cuda"):
            torch.cuda.set_device(args.local_rank)
            args.device = f"cuda:{args.local_rank}"
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.batch_size % args.world_size:
            raise ValueError(f"--batch-size {args.batch_size} is the global batch; it must divide by the "
                             f"{args.world_size} processes")
    on_cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16" if on_cuda else "fp32")
    args.cuda_graphs = (args.cuda_graphs and on_cuda and args.world_size == 1 and args.precision != "fp16"
                        and not args.compile)
    args.eval_batch_size = args.eval_batch_size or (512 if on_cuda else 64)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if on_cuda else 0
    args.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision] if on_cuda else None
    args.lr = args.lr if args.lr is not None else default_lr(args.method)
    args.dataset = "+".join(args.datasets)  # one name as before; several: rsitmd+rsicd
    transfer = f"-to-{'+'.join(args.test_dataset)}" if args.test_dataset else ""
    args.output = args.output or os.path.join("runs", f"{args.dataset}{transfer}-{args.method}")


# settings that may differ on --resume: none changes the numbers of the epochs run or to come
# (--epochs extends or shortens the run; the eval batch and the image cache give identical results)
RESUMABLE = ("epochs", "workers", "print_freq", "eval_batch_size", "cache_images", "seeds",
             "resume", "overwrite", "output", "rank", "local_rank")


def run_config(args, seed: int, options: dict) -> dict:
    """config.json of one seed (less the environment): every setting, resolved."""
    return {**{k: v for k, v in vars(args).items() if k not in ("amp_dtype",)}, "seed": seed,
            "method_options": options}


def check_resume_config(old: dict, new: dict, path: str) -> None:
    """A ValueError listing every setting that differs from the run's config.json (`path`),
    except those in RESUMABLE: a resumed run must continue the run it resumes."""
    new = json.loads(json.dumps(new))  # as stored: tuples become lists
    absent = "(not set)"
    changed = [f"{k.replace('_', '-')} {old.get(k, absent)!r} -> {new.get(k, absent)!r}"
               for k in sorted((set(old) | set(new)) - set(RESUMABLE) - {"environment"})
               if old.get(k, absent) != new.get(k, absent)]
    if changed:
        raise ValueError(f"--resume with settings that differ from {path}: {'; '.join(changed)}. "
                         f"Only --epochs, --workers, --print-freq, --eval-batch-size, "
                         f"--no-cache-images, --seeds and --output may change on resume; use another "
                         f"--output for a new run")


def check_arguments(args) -> None:
    """Errors that need no data, model or disk access, before anything slow starts."""
    for flag in ("epochs", "batch_size", "print_freq", "captions_per_image"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: "
                             f"expected a positive number")
    check_folder_writable(args.output)


def preflight(args, splits: dict) -> None:
    """Everything that can fail before the run folder is made or emptied (--overwrite): every image
    opens, the backbone loads and the method trains something, --resume keeps the settings."""
    names = list(dict.fromkeys(args.datasets + (args.test_dataset or [])))
    hint = "run " + ", ".join("`{}`".format(check_command(
        n, args.data_root, args.layout or DATASETS[n][0], args.image_dir, args.captions_per_image))
        for n in names)
    verify_images(splits, hint=hint)
    _, _, options = build_model(args, verbose=False)
    for seed in args.seeds if args.resume else ():
        path = os.path.join(args.output, f"seed{seed}", "config.json")
        last = os.path.join(args.output, f"seed{seed}", "last.pt")
        if os.path.isfile(last) and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {path} to compare the settings of the run "
                                 f"to resume: {e}") from e
            check_resume_config(old, run_config(args, seed, options), path)


def resolve_clip(args) -> str:
    """--clip, else ViT-B/32; the demo's default is a tiny CLIP pre-trained offline once and cached."""
    if args.clip is not None:
        return args.clip
    if args.dataset != "demo":
        return "ViT-B/32"
    from mrs_adapter.demo_backbone import default_path, load_or_pretrain
    path = default_path(args.data_root)
    if args.rank == 0:
        load_or_pretrain(path)
    if args.world_size > 1:
        dist.barrier()
    return path


def load_data(args) -> dict:
    """One dataset: its {train, val, test} splits as published. Several datasets or --test-dataset:
    the union of the training and of the validation splits, and "test:<name>" per test dataset;
    training and validation images that are exact or near copies of a test image are dropped
    (overlap.py; selecting on a validation image that is also a test image leaks too)."""
    names, tests = args.datasets, args.test_dataset or args.datasets
    every = list(dict.fromkeys(names + tests))
    if len(every) > 1 and (args.layout or args.image_dir):
        raise ValueError(f"--layout / --image-dir describe one dataset; {', '.join(every)} were "
                         f"named (lay each out under --data-root as README 'Data' says)")
    loaded = {n: load_splits(n, args.data_root, args.layout, args.image_dir, verbose=args.rank == 0,
                             captions_per_image=args.captions_per_image) for n in every}
    args.dropped_overlap = None
    if len(names) == 1 and not args.test_dataset:
        return loaded[names[0]]
    splits = {s: union_splits(s, [loaded[n][s] for n in names]) for s in ("train", "val")}
    test = {f"test:{n}": loaded[n]["test"] for n in tests}
    if not args.keep_overlap:
        references = [p for split in test.values() for p in split.image_paths]
        before = {s: len(splits[s].image_paths) for s in splits}
        cache = default_cache(args.data_root)
        splits, args.dropped_overlap = drop_copies(splits, references, cache)
        if args.rank == 0:
            dropped = args.dropped_overlap
            print(f"dropped {dropped['train']} of {before['train']} training and "
                  f"{dropped['val']} of {before['val']} validation images: exact or near copies "
                  f"of images in the test splits of {', '.join(tests)} (--keep-overlap keeps them)")
    if args.rank == 0:
        print(f"{args.dataset}: {splits['train']}; {splits['val']}; "
              + "; ".join(f"{k}: {len(v.image_paths)} images" for k, v in test.items()))
    return {**splits, **test}


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    setup(args)
    check_arguments(args)
    splits = load_data(args)
    args.clip = resolve_clip(args)
    if args.rank == 0:
        preflight(args, splits)  # nothing of an old run is removed before this passes
        prepare_run_dir(args.output, args.resume, args.overwrite)
    if args.world_size > 1:
        dist.barrier()
    results = []
    for seed in args.seeds:
        if args.rank == 0:
            print(f"\n=== seed {seed} (python {seed}, numpy {seed + 1}, torch {seed + 2}) -> {args.output}/seed{seed}")
        results.append(run_seed(args, seed, splits, os.path.join(args.output, f"seed{seed}")))
    summary = summarize(args, results, splits) if args.rank == 0 else {}
    if args.rank == 0:
        write_json(os.path.join(args.output, "results.json"), summary)
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError, DownloadError) as e:
        sys.exit(f"error: {e}")
