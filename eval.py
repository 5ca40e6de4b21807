"""Evaluate zero-shot CLIP or a trained checkpoint on remote sensing image-text retrieval (method.md 6).

Every image of the split is embedded once and every caption once; the cosine similarity matrix
gives the paper's row (i2t R@1/5/10 | t2i R@1/5/10 | mR, Tables II-IV), printed and written
as JSON. --visualize draws a few text queries with their top-5 images.

    python eval.py --dataset rsitmd --data-root data --zero-shot
    python eval.py --dataset rsitmd --data-root data --checkpoint runs/rsitmd/best.pt
"""
import argparse
import json
import os
import textwrap
from typing import Dict, List, Optional

import torch
from PIL import Image, ImageDraw, ImageOps

from mrs_adapter import clip
from mrs_adapter.adapter import load_trainable_state_dict, read_checkpoint
from mrs_adapter.data import DATASETS, Split, eval_loaders, load_splits
from mrs_adapter.download import DownloadError
from mrs_adapter.methods import METHODS, apply_method
from mrs_adapter.metrics import encode_dataset, format_table, recall_at_k
from mrs_adapter.runfiles import atomic_write

WRITTEN_BY = "mrs-adapter eval.py"  # marks the JSON files this script may overwrite


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", dest="datasets", nargs="+", required=True, choices=sorted(DATASETS),
                   help="several: each one's split evaluated on its own, one row per dataset")
    p.add_argument("--data-root", default="data", help="folder holding the datasets (README 'Data'); default: data")
    p.add_argument("--layout", choices=["precomp", "json"], help="default: the dataset's usual layout")
    p.add_argument("--image-dir", help="default: <data-root>/<dataset>_images")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="best.pt written by train.py (trainable tensors + config)")
    what.add_argument("--zero-shot", action="store_true", help="plain CLIP, the paper's zero-shot rows")
    p.add_argument("--clip", help="CLIP name (the paper: ViT-B/32) or a local weights file; "
                                  "default: the checkpoint's, else ViT-B/32")
    p.add_argument("--method", choices=sorted(METHODS), help="optional check: the checkpoint's method must be this "
                                                         "(--zero-shot is --method zero_shot)")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--batch-size", type=int, default=64, help="eval batch 64, as published (method.md 4)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: min(8, CPUs) on CUDA; 0 on CPU, "
                                                "where the encoder needs the cores; measured in bench.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="metrics file; default: beside the checkpoint, or under results/")
    p.add_argument("--visualize", metavar="OUT.png", help="draw text queries with their top-5 images")
    args = p.parse_args(argv)
    args.dataset = "+".join(args.datasets)  # one name as before; several: rsitmd+rsicd
    return args


def apply_checkpoint(model: torch.nn.Module, ckpt: Dict, method: Optional[str] = None) -> torch.nn.Module:
    """Compose the PETL method named in ckpt["config"] into `model` (as train.py built it) and load
    ckpt["trainable"] strictly: a missing, unexpected or mis-shaped tensor is an error."""
    config = ckpt.get("config") or {}
    if "trainable" not in ckpt or "method" not in config:
        raise ValueError(f"not a train.py checkpoint: expected 'trainable' and config['method'], "
                         f"found {sorted(ckpt)} and config keys {sorted(config)}")
    if method is not None and method != config["method"]:
        raise ValueError(f"--method {method} given, but the checkpoint was trained with {config['method']}")
    model = apply_method(model, config["method"], config.get("method_options") or {})
    load_trainable_state_dict(model, ckpt["trainable"])
    return model


def build_model_for_eval(args: argparse.Namespace):
    """(model in eval mode on args.device, its preprocess) for --zero-shot or --checkpoint."""
    if args.clip is None and args.dataset == "demo" and args.checkpoint is None:  # offline: the demo's tiny CLIP
        from mrs_adapter.demo_backbone import default_path, load_or_pretrain
        args.clip = load_or_pretrain(default_path(args.data_root))
    if args.zero_shot or args.method == "zero_shot":
        args.clip = args.clip or "ViT-B/32"
        return clip.load(args.clip, args.device)
    ckpt = read_checkpoint(args.checkpoint)
    args.clip = args.clip or ckpt.get("config", {}).get("clip", "ViT-B/32")
    model, preprocess = clip.load(args.clip, "cpu")
    return apply_checkpoint(model, ckpt, args.method).to(args.device).eval(), preprocess


def default_json_path(args: argparse.Namespace) -> str:
    if args.checkpoint:
        return os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_{args.dataset}_{args.split}.json")
    clip_name = args.clip or "ViT-B/32"
    name = (os.path.splitext(os.path.basename(clip_name))[0] if os.path.isfile(clip_name)
            else clip_name.replace("/", "-").replace("@", "-"))
    return os.path.join("results", f"zeroshot_{name}_{args.dataset}_{args.split}.json")


def write_json(path: str, payload: Dict):
    """Atomic write (temp file + os.replace); refuses to replace a file this script did not write."""
    if os.path.exists(path):
        try:
            with open(path) as f:
                ours = json.load(f).get("written_by") == WRITTEN_BY
        except (ValueError, AttributeError, OSError):
            ours = False
        if not ours:
            raise FileExistsError(f"{path} exists and was not written by eval.py; choose another --json")
    atomic_write(path, lambda f: json.dump(payload, f, indent=2))


def visualize(sims: torch.Tensor, split: Split, path: str, n_queries: int = 4, k: int = 5, thumb: int = 96):
    """A PNG: for evenly spaced text queries, the caption and its top-k images; the correct image
    is framed green, the others grey."""
    n_cap = sims.shape[1]
    queries = sorted({round(q * (n_cap - 1) / max(1, n_queries - 1)) for q in range(min(n_queries, n_cap))})
    pad, text_h = 6, 40
    row_h = text_h + thumb + 2 * pad
    canvas = Image.new("RGB", (pad + k * (thumb + pad), row_h * len(queries)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, j in enumerate(queries):
        y = r * row_h + pad
        lines = textwrap.wrap(f"{j}: {split.captions[j]}", width=(canvas.width - 2 * pad) // 6)[:3]
        draw.text((pad, y), "\n".join(lines), fill="black")
        for c, i in enumerate(sims[:, j].topk(min(k, sims.shape[0])).indices.tolist()):
            with Image.open(split.image_paths[i]) as image:
                tile = ImageOps.fit(image.convert("RGB"), (thumb - 6, thumb - 6))
            framed = ImageOps.expand(tile, border=3, fill="lime" if i == split.txt2img[j] else "grey")
            canvas.paste(framed, (pad + c * (thumb + pad), y + text_h))
    atomic_write(path, lambda f: canvas.save(f, format="PNG"), mode="wb")


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if args.device.startswith("cuda") else 0
    if len(args.datasets) > 1 and (args.layout or args.image_dir or args.visualize):
        raise ValueError("--layout, --image-dir and --visualize describe one dataset; "
                         f"{args.dataset.replace('+', ', ')} were named")
    splits = {name: load_splits(name, args.data_root, args.layout, args.image_dir)[args.split]
              for name in args.datasets}  # data errors before the model is built
    model, preprocess = build_model_for_eval(args)
    results, what = {}, "zero-shot" if args.zero_shot else args.checkpoint
    for name, split in splits.items():
        loaders = eval_loaders(split, preprocess, model.context_length, args.batch_size,
                               args.workers)
        img, txt = encode_dataset(model, *loaders, args.device)  # each image / caption once
        sims = (img @ txt.t()).cpu()  # (N_img, N_cap) cosine similarities
        results[name] = recall_at_k(sims, torch.tensor(split.txt2img))
        print(f"{name} {split} | CLIP {args.clip} {what}")
    several = len(splits) > 1
    print(format_table([(f"{name} {args.split}" if several else args.split, m)
                        for name, m in results.items()]))
    path, split = args.json or default_json_path(args), next(iter(splits.values()))
    counts = ({"n_images": {n: len(s.image_paths) for n, s in splits.items()},
               "n_captions": {n: len(s.captions) for n, s in splits.items()}} if several else
              {"n_images": len(split.image_paths), "n_captions": len(split.captions)})
    metrics = results if several else results[args.datasets[0]]
    write_json(path, {"written_by": WRITTEN_BY, "metrics": metrics,
                      "dataset": args.datasets if several else args.dataset, "split": args.split,
                      **counts, "clip": args.clip, "checkpoint": args.checkpoint,
                      "zero_shot": args.zero_shot})
    print(f"wrote {path}")
    if args.visualize:
        visualize(sims, split, args.visualize)
        print(f"wrote {args.visualize}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, DownloadError) as e:
        raise SystemExit(f"error: {e}")
