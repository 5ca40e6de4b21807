"""Train CLIP + MRS-Adapter with HMMC: the recipe of the paper's tables (docs/method.md §4).

    python train.py --dataset demo                          # offline, ~2 minutes on 2 CPU cores
    python train.py --dataset rsitmd --data-root data --seeds 2 3 4
    torchrun --nproc_per_node=4 train.py --dataset rsicd --data-root data

Each epoch trains on the training split and validates on the validation split (never test).
The checkpoint of best validation mR is kept; the end of the run reports it on test.
Several seeds give mean +- std.
A run folder holds config.json, log.jsonl, last.pt (resumable), best.pt and results.json,
each written atomically.
"""
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from mrs_adapter import clip
from mrs_adapter.atomic import write_json
from mrs_adapter.checkpoint import print_trainable_parameters, save_trainable
from mrs_adapter.datasets import TrainDataset, eval_loaders
from mrs_adapter.demo import scenes as demo_scenes
from mrs_adapter.loss import hmmc_loss, info_nce
from mrs_adapter.methods import apply_method, freeze_unread
from mrs_adapter.metrics import evaluate
from mrs_adapter.run import args as train_args
from mrs_adapter.run import distributed, resume
from mrs_adapter.run.args import Settings, resolve_method_options
from mrs_adapter.run.cuda_graph import GraphedOrEager
from mrs_adapter.run.distributed import counted_once, gather_with_grad, together, world_size
from mrs_adapter.run.files import RUN_FILES, environment, prepare_run_dir
from mrs_adapter.run.resume import (
    NOTHING_HALF_WRITTEN,
    check_resume_config,
    recorded_config,
    run_config,
    stops_explained,
)
from mrs_adapter.run.summary import score_selected, summarize
from mrs_adapter.run.union import check_images, check_splits, load_data, test_keys
from mrs_adapter.weights.download import DownloadError


def get_parser():
    """Every flag, with the paper's defaults and their sources (mrs_adapter/run/args.py)."""
    return train_args.get_parser(__doc__)


class Views(nn.Module):
    """Images, token ids -> v, t (B, E) and, for HMMC, the dropout views v', t' (B, E).

    One training forward (docs/method.md §3).
    """

    def __init__(self, model: nn.Module, feature_dropout: float, both_views: bool):
        super().__init__()
        self.model, self.p, self.both_views = model, feature_dropout, both_views

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        m = self.model
        if not self.both_views:
            return m.encode_image(images), m.encode_text(tokens, trim=False)
        # one pass per tower encodes both views; the loader trimmed the tokens (collate_trimmed)
        v, v_aug = m.encode_image_views(images, self.p)
        t, t_aug = m.encode_text_views(tokens, self.p, trim=False)
        return v, t, v_aug, t_aug


def compute_loss(model: nn.Module, embeddings, objective: str, margin: float, loss_weights):
    """Embeddings (B, E) each -> (loss, {term: value}) on the global batch.

    With several processes the embeddings are gathered first,
    so the hardest negatives are searched in the whole batch.
    """
    if dist.is_initialized():
        embeddings = [gather_with_grad(e) for e in embeddings]
    embeddings = [e.float() for e in embeddings]
    if objective == "info_nce":
        loss = info_nce(*embeddings, counted_once(model.logit_scale))
        return loss, {"info_nce": loss}
    return hmmc_loss(*embeddings, margin=margin, weights=loss_weights, return_terms=True)


def forward_backward(views: nn.Module, model: nn.Module, images, tokens, scaler, objective: str,
                     margin: float, loss_weights, amp_dtype):
    """Images, token ids -> (loss, terms) of one step on the global batch, after its backward.

    amp_dtype None: no autocast.
    """
    # no autocast weight cache: it cannot live in a CUDA graph; each weight is cast once a step
    with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                        cache_enabled=False):
        loss, terms = compute_loss(model, views(images, tokens), objective, margin, loss_weights)
    # DDP averages gradients over ranks; each rank's loss is the global-batch loss whose gradient
    # flows through its own rows only, so x world makes that average the global-batch gradient.
    scaler.scale(loss * world_size()).backward()
    return loss, terms


def lr_at(epoch: int, lr: float, decay: float, start: int, every: int) -> float:
    """Epoch -> its learning rate, by step decay (docs/method.md §4).

    x `decay` at the start of epoch `start` and every `every` epochs after.
    """
    if epoch < start:
        return lr
    return lr * decay ** ((epoch - start) // every + 1)


def build_model(run: Settings, verbose: bool = True, device=None):
    """Settings -> (CLIP with the method composed in, preprocess, backbone record).

    - The model is on `device` (default run.device).
    - The backbone record is clip.load's: absolute path, sha256, activation, for config.json.
    """
    model, preprocess = clip.load(run.clip, device="cpu", activation=run.clip_activation,
                                  sha256=run.clip_sha256)
    backbone = model.backbone
    if verbose:
        print(clip.describe(backbone))
    model = apply_method(model, run.method, run.method_options, verbose=False)
    model = freeze_unread(model, run.objective)
    if verbose:
        print(f"method {run.method}: ", end="")
        print_trainable_parameters(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"method {run.method} trains nothing; evaluate it with "
                         f"`python eval.py --zero-shot`")
    return model.to(device or run.device), preprocess, backbone


def collate_trimmed(batch):
    """Items -> (images, token ids (B, L'), image indices): default collation, then CLIP.trim.

    The token columns after the batch's last end token are dropped on the CPU, in the loader,
    so the model need not read the ids on the device.
    """
    images, tokens, index = default_collate(batch)
    return images, clip.CLIP.trim(tokens), index


def training_parts(run: Settings, seed: int, model: nn.Module, train_split, preprocess):
    """(loader, optimizer, scaler, views) of one seed: the recipe's Adam and shuffled batches."""
    world = run.world_size
    train_set = TrainDataset(train_split, preprocess, model.context_length, cache=run.cache_images)
    # the shuffle order depends on (seed, epoch) alone, so a resumed run sees the same batches
    sampler = DistributedSampler(train_set, num_replicas=world, rank=run.rank, shuffle=True,
                                 seed=seed + 2)
    # a recorded step needs fixed shapes, so with CUDA graphs the text keeps its 77 columns
    collate = default_collate if run.cuda_graphs else collate_trimmed
    loader = DataLoader(train_set, run.batch_size // world, sampler=sampler,
                        num_workers=run.workers, collate_fn=collate,
                        pin_memory=run.device.startswith("cuda"),
                        persistent_workers=run.workers > 0)
    trained = [p for p in model.parameters() if p.requires_grad]
    # capturable: Adam keeps its step count on the device, where a recorded step can update it
    optimizer = torch.optim.Adam(trained, lr=run.lr, betas=(0.9, 0.999), weight_decay=0.0,
                                 capturable=run.cuda_graphs)
    scaler = torch.amp.GradScaler("cuda", enabled=run.amp_dtype == torch.float16)  # fp16 only
    views = Views(model, run.feature_dropout, run.objective == "hmmc")
    if world > 1:
        device_ids = [run.local_rank] if run.device.startswith("cuda") else None
        views = DistributedDataParallel(views, device_ids=device_ids)
    if run.compile:
        views = torch.compile(views, dynamic=True)  # text length varies per batch (collate_trimmed)
    return loader, optimizer, scaler, views


def check_finite(window: list, epoch: int):
    """Raise at the first non-finite loss of `window` [(step, loss, terms)], naming step and terms.

    Losses stay on the device between checks (every --print-freq steps and at an epoch's end):
    reading one per step would make the CPU wait for the GPU at every step.
    """
    finite = torch.isfinite(torch.stack([loss for _, loss, _ in window])).tolist()
    if not all(finite):
        step, loss, terms = window[finite.index(False)]
        detail = ", ".join(f"{k} = {v.item():.4g}" for k, v in terms.items())
        kept = (f"The last good checkpoint (last.pt, end of epoch {epoch - 1}) is kept."
                if epoch > 0 else "No checkpoint was written: the first epoch did not finish.")
        raise FloatingPointError(f"epoch {epoch} step {step}: non-finite loss {loss.item()} "
                                 f"({detail}); stopping. {kept}")
    window.clear()


def train_one_epoch(run: Settings, epoch, views, model, loader, optimizer, scaler, log, step,
                    steps):
    """One pass over the training pairs; returns (global step, mean loss, pairs/s).

    steps: a GraphedOrEager, which replays the step from a CUDA graph (--cuda-graphs) or runs it.
    """
    views.train()
    for g in optimizer.param_groups:
        g["lr"] = lr_at(epoch, run.lr, run.lr_decay, run.lr_decay_start, run.lr_decay_every)
    world, n = world_size(), len(loader)
    start, seen, loss_sum, window = time.time(), 0, 0.0, []

    def eager_step(images, tokens):  # forward both views, loss, backward, Adam
        loss, terms = forward_backward(views, model, images, tokens, scaler, run.objective,
                                       run.margin, run.loss_weights, run.amp_dtype)
        scaler.step(optimizer)
        scaler.update()
        return loss, terms

    for i, (images, tokens, _) in enumerate(loader):
        images = images.to(run.device, non_blocking=True)
        tokens = tokens.to(run.device, non_blocking=True)
        step += 1
        loss, terms = steps(eager_step, optimizer, images, tokens)
        seen += images.shape[0] * world
        loss_sum = loss_sum + loss.detach()  # on the device: no wait for the GPU (check_finite)
        window.append((step, loss.detach(), {k: v.detach() for k, v in terms.items()}))
        if (i + 1) % run.print_freq == 0 or i + 1 == n:
            check_finite(window, epoch)
            if (i + 1) % run.print_freq == 0 and run.rank == 0:
                rate = seen / (time.time() - start)
                eta = (n - i - 1) * images.shape[0] * world / rate
                lr, parts = optimizer.param_groups[0]["lr"], " ".join(
                    f"{k} {v.item():.3f}" for k, v in terms.items())
                print(f"epoch {epoch} step {i + 1}/{n} loss {loss.item():.3f} ({parts}) "
                      f"lr {lr:.2e} {rate:.0f} pairs/s eta {eta:.0f}s", flush=True)
                log.write(kind="train", epoch=epoch, step=step, loss=loss.item(), lr=lr,
                          pairs_per_s=rate, **{k: v.item() for k, v in terms.items()})
    return step, float(loss_sum) / max(n, 1), seen / max(time.time() - start, 1e-9)


def run_seed(run: Settings, seed: int, splits: dict, dropped: Optional[dict],
             run_dir: str) -> dict:
    """Train one seed in `run_dir` -> rank 0's results.

    Selects on validation, then tests the selected checkpoint.
    `dropped`: load_data's count of copies of test images dropped, for config.json.
    """
    main_rank = run.rank == 0
    paths = {name: os.path.join(run_dir, name) for name in RUN_FILES}
    resume.seed_everything(seed)
    model, preprocess, backbone = build_model(run, verbose=main_rank)
    loader, optimizer, scaler, views = training_parts(run, seed, model, splits["train"], preprocess)
    steps = GraphedOrEager(run.cuda_graphs, run.batch_size)
    evals = {s: eval_loaders(splits[s], preprocess, model.context_length, run.eval_batch_size,
                             run.workers, run.cache_images)
             for s in ["val"] + test_keys(splits)} if main_rank else {}

    def score(split):
        return evaluate(model, *evals[split], splits[split].txt2img, run.device, run.amp_dtype)

    config = {**run_config(run, seed, backbone, dropped), "environment": environment()}
    start, step, best, initial, log = resume.start_or_resume(run, model, optimizer, paths, config,
                                                             score, test_keys(splits))
    for epoch in range(start, run.epochs):
        loader.sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
        t0 = time.time()
        step, mean_loss, rate = train_one_epoch(run, epoch, views, model, loader, optimizer,
                                                scaler, log, step, steps)
        train_seconds = time.time() - t0
        if main_rank:  # select on validation (the first best on ties); last.pt for --resume
            val = score("val")
            val_seconds = time.time() - t0 - train_seconds
            if val["mR"] > best["mR"]:
                best = {"mR": val["mR"], "epoch": epoch}
                save_trainable(model, paths["best.pt"], config=config, epoch=epoch, val=val)
            log.write(kind="val", epoch=epoch, step=step, mean_loss=mean_loss, pairs_per_s=rate,
                      lr=optimizer.param_groups[0]["lr"], train_seconds=train_seconds,
                      val_seconds=val_seconds, **val)
            resume.save_last(paths["last.pt"], model, optimizer, epoch, step, best, initial, config)
            print(f"epoch {epoch}: loss {mean_loss:.4f}, {rate:.0f} pairs/s, val mR "
                  f"{val['mR']:.2f} (best {best['mR']:.2f} at epoch {best['epoch']}), "
                  f"{time.time() - t0:.0f}s", flush=True)
        if run.world_size > 1:
            dist.barrier()
    return score_selected(seed, model, run_dir, score, initial, splits) if main_rank else {}


def setup(args) -> Settings:
    """Parsed flags -> the run's Settings, resolved once.

    The checks the flags alone allow run first; under torchrun the process group starts here.
    """
    if args.method == "zero_shot":  # before any process group: under torchrun all ranks stop alike
        raise ValueError("--method zero_shot trains nothing; "
                         "evaluate it with `python eval.py --zero-shot`")
    train_args.check_flags(args)  # repeats, counts, the device: the same in every process
    options = resolve_method_options(args)  # a flag the method lacks fails before anything starts
    return train_args.resolve(args, options, distributed.start(args.device, args.batch_size))


def make_shared_inputs(run: Settings) -> None:
    """What rank 0 makes once for every process: the demo set and the demo's CLIP where named."""
    train_args.check_arguments(run)  # the output folder, before anything is generated
    if "demo" in run.datasets + (run.test_dataset or []):
        demo_scenes.prepare(run.data_root, run.layout, run.image_dir)
    train_args.make_demo_clip(run)  # where run.clip is the demo's default: pre-trained once


def preflight(run: Settings, splits: dict, dropped: Optional[dict]) -> None:
    """Check everything that can fail before the run folder is made or emptied (--overwrite).

    - every split holds what a seed needs (after copies of test images are dropped);
    - every image opens;
    - the backbone loads and the method trains something;
    - --resume finds what it continues from, with the same settings.
    """
    check_splits(run, splits, dropped)
    check_images(run, splits)
    _, _, backbone = build_model(run, verbose=False, device="cpu")  # checked, then dropped
    for seed in run.seeds if run.resume else ():
        recorded = recorded_config(os.path.join(run.output, f"seed{seed}"))
        if recorded is not None:  # None: no run to resume, this seed starts afresh
            check_resume_config(recorded[0], run_config(run, seed, backbone, dropped), recorded[1])


def main(argv=None) -> dict:
    run = setup(get_parser().parse_args(argv))  # every setting, resolved once
    # each step below ends with every process knowing its outcome: one error, none left waiting
    together(lambda: make_shared_inputs(run), every_rank=False)
    splits, dropped = together(lambda: load_data(run))
    together(lambda: preflight(run, splits, dropped), every_rank=False)
    # only now, every check passed, is an old run's folder emptied (--overwrite)
    together(lambda: prepare_run_dir(run.output, run.resume, run.overwrite), every_rank=False)
    results = []
    for seed in run.seeds:
        run_dir = os.path.join(run.output, f"seed{seed}")
        if run.rank == 0:
            print(f"\n=== seed {seed} (python {seed}, numpy {seed + 1}, torch {seed + 2}) -> "
                  f"{run_dir}")
        with stops_explained(run_dir, run.epochs):  # Ctrl-C, a full disk: what --resume does
            results.append(run_seed(run, seed, splits, dropped, run_dir))
    summary = summarize(run, results, splits, dropped) if run.rank == 0 else {}
    if run.rank == 0:
        with stops_explained(run_dir, run.epochs):
            write_json(os.path.join(run.output, "results.json"), summary)
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def cli() -> int:
    """`main` for the shell: an error is one line (exit 1), Ctrl-C one line saying where --resume
    continues (exit 130); under torchrun one process reports it."""
    try:
        main()
    except KeyboardInterrupt as e:
        if distributed.reported_here(e):
            print(f"interrupted: {str(e) or NOTHING_HALF_WRITTEN}", file=sys.stderr)
        return 130
    except (OSError, ValueError, FloatingPointError, DownloadError) as e:
        if distributed.reported_here(e):
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
