"""Evaluate zero-shot CLIP or a trained checkpoint on remote sensing image-text retrieval.

The protocol of docs/method.md §6:
every image of the split is embedded once and every caption once;
the cosine similarity matrix gives the paper's row
(i2t R@1/5/10 | t2i R@1/5/10 | mR, Tables II-IV), printed and written as JSON.
--visualize draws a few text queries with their top-5 images.

    python eval.py --dataset rsitmd --data-root data --zero-shot
    python eval.py --dataset rsitmd --data-root data --checkpoint runs/rsitmd/best.pt
"""
import argparse
import json
import os
import textwrap
from typing import Dict, List, Optional

import torch
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

from mrs_adapter import atomic, clip
from mrs_adapter.atomic import atomic_write, has_mark
from mrs_adapter.data import CAPTIONS_PER_IMAGE, DATASETS, Split, load_splits
from mrs_adapter.datasets import default_workers, eval_loaders, read_image
from mrs_adapter.demo import scenes as demo
from mrs_adapter.methods import METHODS
from mrs_adapter.metrics import AMP_DTYPES, encode_dataset, format_table, recall_at_k
from mrs_adapter.run.checks import check_counts, check_device, disk_full, refuse_repeats
from mrs_adapter.run.rebuild import apply_checkpoint, load_backbone, read_train_checkpoint
from mrs_adapter.weights.download import DownloadError

WRITTEN_BY = "mrs-adapter eval.py"  # marks the JSON files this script may overwrite


WORKERS_HELP = ("DataLoader workers (default: min(8, CPUs) on CUDA; 0 on CPU, where the encoder "
                "needs the cores; measured in speed_bench.py)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--dataset", dest="datasets", nargs="+", required=True, choices=sorted(DATASETS),
      help="several: each one's split evaluated on its own, one row per dataset")
    a("--data-root", default="data",
      help="folder holding the datasets (README 'Data'); default: data")
    a("--layout", choices=["precomp", "json"], help="default: the dataset's usual layout")
    a("--image-dir", help="default: <data-root>/<dataset>_images")
    a("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE,
      help="captions of each image in a one-name-per-image list (default 5)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--checkpoint",
                      help="best.pt written by train.py (trainable tensors + config)")
    what.add_argument("--zero-shot", action="store_true",
                      help="plain CLIP, the paper's zero-shot rows")
    a("--clip", help="CLIP name (the paper: ViT-B/32) or a local weights file; "
                     "default: the checkpoint's, else ViT-B/32")
    a("--clip-activation", choices=clip.ACTIVATIONS,
      help="CLIP's MLP activation; default: the checkpoint's, else a named "
           "backbone's own, else QuickGELU")
    a("--clip-sha256",
      help="the sha256 the CLIP weights must have; with --checkpoint, the way to "
           "evaluate on weights other than the recorded ones on purpose")
    a("--method", choices=sorted(METHODS),
      help="optional check: the checkpoint's method must be this "
           "(--zero-shot is --method zero_shot)")
    a("--precision", choices=["fp32", "bf16", "fp16"],
      help="autocast dtype on CUDA (default: the checkpoint's training precision; "
           "zero-shot: bf16); the CPU evaluates in fp32")
    a("--split", default="test", choices=["test", "val"])
    a("--batch-size", type=int, default=64,
      help="eval batch 64, as published (docs/method.md §4)")
    a("--workers", type=int, help=WORKERS_HELP)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--json", help="metrics file; default: beside the checkpoint, or under results/")
    a("--visualize", metavar="OUT.png", help="draw text queries with their top-5 images")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """argv -> the options; values and combinations that cannot work refused before any load."""
    p = _parser()
    args = p.parse_args(argv)
    refuse_repeats("--dataset", args.datasets)
    check_counts({"--batch-size": (args.batch_size, 1), "--workers": (args.workers, 0)})
    check_device(args.device)
    if args.method == "zero_shot" and args.checkpoint:
        p.error(f"--method zero_shot evaluates plain CLIP, not --checkpoint {args.checkpoint}; "
                "give one of them")
    if args.zero_shot and args.method not in (None, "zero_shot"):
        p.error(f"--zero-shot evaluates plain CLIP, not --method {args.method}; "
                "for a trained method give its --checkpoint")
    args.zero_shot = args.zero_shot or args.method == "zero_shot"
    if not (args.checkpoint or args.zero_shot):
        p.error("one of --checkpoint or --zero-shot (--method zero_shot) is required")
    if args.precision not in (None, "fp32") and not args.device.startswith("cuda"):
        p.error(f"--precision {args.precision} needs a CUDA --device (autocast runs on CUDA only "
                f"here); --device {args.device} evaluates in fp32")
    args.dataset = "+".join(args.datasets)  # one name as before; several: rsitmd+rsicd
    if args.workers is None:
        args.workers = default_workers(args.device)
    return args


def eval_precision(args: argparse.Namespace, trained: str) -> str:
    """(options, training precision) -> --precision, else the training run's; fp32 on the CPU.

    train.py's default: bf16 on CUDA.
    """
    return args.precision or (trained if args.device.startswith("cuda") else "fp32")


def build_model_for_eval(args: argparse.Namespace):
    """Options -> (model in eval mode on args.device, its preprocess, what was evaluated).

    For --zero-shot or --checkpoint. What was evaluated:
    {"clip": the name or file, "backbone": clip.load's record of it, "precision"}.
    """
    clip_flag = args.clip
    if clip_flag is None and args.dataset == "demo" and args.checkpoint is None:
        # offline: the demo's tiny CLIP, pretrained here once
        from mrs_adapter.demo.backbone import default_path, load_or_pretrain
        clip_flag = load_or_pretrain(default_path(args.data_root))
    if args.zero_shot:
        precision = eval_precision(args, "bf16")
        model, preprocess = clip.load(clip_flag or "ViT-B/32", args.device,
                                      activation=args.clip_activation, sha256=args.clip_sha256)
    else:
        ckpt, config = read_train_checkpoint(args.checkpoint)  # before loading a backbone for it
        precision = eval_precision(args, config.get("precision") or "bf16")
        # the CLIP it was trained on; --clip where the weights moved, --clip-sha256 other weights
        model, preprocess = load_backbone(config, clip_flag, args.clip_activation,
                                          args.clip_sha256, where=args.checkpoint)
    backbone = model.backbone
    print(clip.describe(backbone))
    if not args.zero_shot:
        model = apply_checkpoint(model, ckpt, args.method).to(args.device).eval()
    return model, preprocess, {"clip": backbone["clip"], "backbone": backbone,
                               "precision": precision}


def published_check(args: argparse.Namespace, backbone: Optional[Dict], metrics: Dict[str, float],
                    dataset: str):
    """(options, backbone, metrics, dataset) -> the published zero-shot mR, printed; or None.

    With --zero-shot on test, where one is published,
    the backbone's published mR on `dataset` is printed beside ours:
    a wrong file or MLP activation shows as a gap of points.
    """
    if not args.zero_shot or not backbone or args.split != "test":
        return None
    published = clip.published_mr(backbone.get("name") or backbone["clip"]).get(dataset)
    if published is not None:
        name, ours = backbone.get("name") or backbone["clip"], metrics["mR"]
        print(f"published zero-shot mR of {name} on {dataset} test: {published:.2f}; "
              f"ours {ours:.2f} ({ours - published:+.2f} points; more than about one point apart "
              f"suggests another file, MLP activation or split than the publication's)")
    return published


def default_json_path(args: argparse.Namespace, clip_name: str) -> str:
    """Beside the checkpoint, or results/zeroshot_<CLIP>_<dataset>_<split>.json."""
    if args.checkpoint:
        folder = os.path.dirname(os.path.abspath(args.checkpoint))
        return os.path.join(folder, f"eval_{args.dataset}_{args.split}.json")
    name = (os.path.splitext(os.path.basename(clip_name))[0] if os.path.isfile(clip_name)
            else clip_name.replace("/", "-").replace("@", "-"))
    return os.path.join("results", f"zeroshot_{name}_{args.dataset}_{args.split}.json")


def written_by_us(path: str) -> bool:
    """Whether `path` is a JSON file or a PNG image this script wrote (both carry WRITTEN_BY)."""
    return has_mark(path, WRITTEN_BY)


def check_output(path: str, flag: str):
    """Before any evaluation: `path` can be written and, if it exists, this script wrote it."""
    atomic.check_output(path, flag, written_by_us, "eval.py")


def write_json(path: str, payload: Dict):
    """Atomic write (temp file + os.replace); refuses to replace a file eval.py did not write."""
    check_output(path, "--json")
    atomic_write(path, lambda f: json.dump(payload, f, indent=2))


def visualize(sims: torch.Tensor, split: Split, path: str, n_queries: int = 4, k: int = 5,
              thumb: int = 96):
    """sims (N_img, N_cap), split -> a PNG at `path`: evenly spaced text queries, top-k images.

    Each row: the caption, then its top-k images;
    the correct image is framed green, the others grey.
    """
    n_cap = sims.shape[1]
    spacing = (n_cap - 1) / max(1, n_queries - 1)
    queries = sorted({round(q * spacing) for q in range(min(n_queries, n_cap))})
    pad, text_h = 6, 40
    row_h = text_h + thumb + 2 * pad
    canvas = Image.new("RGB", (pad + k * (thumb + pad), row_h * len(queries)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, j in enumerate(queries):
        y = r * row_h + pad
        lines = textwrap.wrap(f"{j}: {split.captions[j]}", width=(canvas.width - 2 * pad) // 6)[:3]
        draw.text((pad, y), "\n".join(lines), fill="black")
        for c, i in enumerate(sims[:, j].topk(min(k, sims.shape[0])).indices.tolist()):
            tile = read_image(split.image_paths[i],
                              lambda image: ImageOps.fit(image, (thumb - 6, thumb - 6)))
            colour = "lime" if i == split.txt2img[j] else "grey"
            framed = ImageOps.expand(tile, border=3, fill=colour)
            canvas.paste(framed, (pad + c * (thumb + pad), y + text_h))
    info = PngImagePlugin.PngInfo()
    info.add_text("written_by", WRITTEN_BY)  # a later run may replace this file, and only this kind
    atomic_write(path, lambda f: canvas.save(f, format="PNG", pnginfo=info), mode="wb")


def evaluate_splits(args: argparse.Namespace, model, preprocess, splits: Dict[str, Split],
                    used: Dict):
    """Splits -> ({dataset: the paper's metrics}, the last split's similarities (N_img, N_cap)).

    Each image and each caption of a split is embedded once.
    `used`: build_model_for_eval's.
    """
    amp = AMP_DTYPES[used["precision"]]
    results, what = {}, "zero-shot" if args.zero_shot else args.checkpoint
    for name, split in splits.items():
        loaders = eval_loaders(split, preprocess, model.context_length, args.batch_size,
                               args.workers)
        img, txt = encode_dataset(model, *loaders, args.device, amp)  # each image / caption once
        sims = (img @ txt.t()).cpu()  # (N_img, N_cap) cosine similarities
        results[name] = recall_at_k(sims, torch.tensor(split.txt2img))
        print(f"{name} {split} | CLIP {used['clip']} {what} ({used['precision']})")
    return results, sims


def report(args: argparse.Namespace, path: str, splits: Dict[str, Split],
           results: Dict[str, Dict[str, float]], used: Dict) -> Dict:
    """Results -> the JSON's metrics: one dataset's dict, or {dataset: dict} for several.

    Prints the table (and published zero-shot figures) and writes the JSON.
    `used`: build_model_for_eval's.
    """
    several = len(splits) > 1
    print(format_table([(f"{name} {args.split}" if several else args.split, m)
                        for name, m in results.items()]))
    published = {name: published_check(args, used["backbone"], m, name)
                 for name, m in results.items()}
    split = next(iter(splits.values()))
    counts = ({"n_images": {n: len(s.image_paths) for n, s in splits.items()},
               "n_captions": {n: len(s.captions) for n, s in splits.items()}} if several else
              {"n_images": len(split.image_paths), "n_captions": len(split.captions)})
    metrics = results if several else results[args.datasets[0]]
    write_json(path, {"written_by": WRITTEN_BY, "metrics": metrics,
                      "dataset": args.datasets if several else args.dataset, "split": args.split,
                      **counts, "clip": used["clip"], "checkpoint": args.checkpoint,
                      "zero_shot": args.zero_shot, "precision": used["precision"],
                      "backbone": used["backbone"],
                      "published_zero_shot_mR": published if several else published[args.dataset]})
    print(f"wrote {path}")
    return metrics


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if len(args.datasets) > 1 and (args.layout or args.image_dir or args.visualize):
        raise ValueError("--layout, --image-dir and --visualize describe one dataset; "
                         f"{args.dataset.replace('+', ', ')} were named")
    if "demo" in args.datasets:
        demo.prepare(args.data_root, args.layout, args.image_dir)
    splits = {name: load_splits(name, args.data_root, args.layout, args.image_dir,
                                captions_per_image=args.captions_per_image)[args.split]
              for name in args.datasets}  # data errors before the model is built
    model, preprocess, used = build_model_for_eval(args)
    path = args.json or default_json_path(args, used["clip"])  # the CLIP actually used
    check_output(path, "--json")  # before the evaluation, not after it
    if args.visualize:
        check_output(args.visualize, "--visualize")
    results, sims = evaluate_splits(args, model, preprocess, splits, used)
    metrics = report(args, path, splits, results, used)
    if args.visualize:  # one dataset only (refused above for several)
        visualize(sims, next(iter(splits.values())), args.visualize)
        print(f"wrote {args.visualize}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, DownloadError) as e:  # OSError: also files not found, a full disk
        if isinstance(e, OSError):
            e = disk_full(e, "the file it would replace is whole (written under a temporary name, "
                             "then renamed); free some space and run the same command again")
        raise SystemExit(f"error: {e}")
