"""Search a folder of your own aerial images by text or image, with a best.pt or zero-shot CLIP.

    python search.py index IMAGES_DIR --out INDEX_DIR --checkpoint runs/rsitmd/best.pt
    python search.py index IMAGES_DIR --out INDEX_DIR --clip ViT-B/32          # zero-shot
    python search.py query INDEX_DIR "a baseball field beside a highway" --top 20 --sheet hits.png
    python search.py query INDEX_DIR --image my_scene.tif --json hits.json
    python search.py export INDEX_DIR --out emb.npy                            # + emb.manifest.json

Large images are cut into --tile px tiles every --stride px (mrs_adapter/search/index.py says why
256 / 192); a rerun embeds only new or changed files, and an interrupted run continues.
"""
import argparse
import errno
import os
import sys
import textwrap
from typing import Dict, List, Optional

import torch
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

from mrs_adapter import clip
from mrs_adapter.atomic import (
    atomic_write,
    check_folder_writable,
    check_output,
    has_mark,
    write_json,
)
from mrs_adapter.datasets import default_workers
from mrs_adapter.search import index as search
from mrs_adapter.search import query as search_query
from mrs_adapter.search.store import check_index_folder, check_same_model
from mrs_adapter.tokenizer import token_count
from mrs_adapter.weights.download import DownloadError

SHEET_WRITTEN_BY = "mrs-adapter search.py query"  # in the sheet's PNG text: a rerun may replace it
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("index", "query"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", help="best.pt of train.py (query: default the index's)")
        s.add_argument("--clip", help="CLIP name (ViT-B/32) or weights file: the zero-shot model, "
                                      "or the backbone of --checkpoint (default: the checkpoint's)")
        s.add_argument("--clip-activation", choices=clip.ACTIVATIONS,
                       help="CLIP's MLP activation, as in train.py (default: the checkpoint's, "
                            "else a named backbone's own, else QuickGELU; e.g. gelu for SkyCLIP "
                            "ViT-B/32; query: the index's)")
        s.add_argument("--clip-sha256", help="the sha256 the CLIP weights must have")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    index, query, export = sub.choices["index"], sub.choices["query"], sub.add_parser("export")
    index.add_argument("images", help="folder of .tif/.tiff/.jpg/.jpeg/.png images (recursive)")
    index.add_argument("--out", required=True, help="index folder (created, or updated)")
    index.add_argument("--tile", type=int, default=search.TILE, help="tile side, px (256)")
    index.add_argument("--stride", type=int, default=search.STRIDE, help="tile step, px (192)")
    index.add_argument("--batch-size", type=int, default=64)
    index.add_argument("--workers", type=int,
                       help="image decoding processes that run ahead of the encoder (default: "
                            "min(8, CPUs) on CUDA; 0 on CPU, where the encoder's threads already "
                            "use every core and a decoding process would only compete with them)")
    index.add_argument("--save-every", type=int, default=search.SAVE_EVERY,
                       help="save what is embedded every N images, so an interrupted run continues")
    index.add_argument("--prune", action="store_true",
                       help="allow this run to remove more than half of the indexed images "
                            "(without it, an empty, unmounted or unreadable folder is refused)")
    query.add_argument("index", help="index folder written by `search.py index`")
    query.add_argument("text", nargs="?", help="the text query")
    query.add_argument("--image", help="query by this image instead of a text")
    query.add_argument("--top", type=int, default=20)
    query.add_argument("--json", help="write [{rank, score, path, box}, ...] here")
    query.add_argument("--sheet", help="draw the query and its hits with scores into this PNG")
    export.add_argument("index")
    export.add_argument("--out", required=True, help="embeddings .npy (float16); the manifest goes "
                                                     "beside it as <name>.manifest.json")
    args = p.parse_args(argv)
    if args.command == "index" and not (args.checkpoint or args.clip):
        p.error("index needs --checkpoint best.pt or --clip NAME_OR_FILE (zero-shot)")
    if args.command == "query" and (args.text is None) == (args.image is None):
        p.error("query needs a text or --image PATH (one of them)")
    return args


def check_device(device: str):
    """A ValueError naming --device unless torch can use it here."""
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device torch knows (e.g. cpu, cuda, "
                         f"cuda:1)") from None
    if where.type == "cuda":
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found <= (where.index or 0):
            raise ValueError(f"--device {device}: torch sees {found} CUDA GPU(s) here; use "
                             f"--device cpu" + (f" or cuda:0 to cuda:{found - 1}" if found else ""))


def check_arguments(args):
    """Errors that need no model or image, each naming its flag, before anything is loaded or
    written; an output that exists must be one this script wrote."""
    counts = {"index": ("batch_size", "save_every"), "query": ("top",), "export": ()}
    for flag in counts[args.command]:
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a "
                             f"positive number")
    if args.command != "export":
        check_device(args.device)
    if args.command == "index":
        if args.tile < 1 or not 0 < args.stride <= args.tile:
            raise ValueError(f"--tile {args.tile} --stride {args.stride}: expected "
                             f"0 < stride <= tile")
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers {args.workers}: expected 0 (decode in the main process) "
                             f"or more")
        if not os.path.isdir(args.images):
            raise FileNotFoundError(f"image folder not found: {args.images}")
        check_folder_writable(args.out, "--out")
        check_index_folder(args.out, args.images)
    elif args.command == "query":
        if args.text is not None and not args.text.strip():
            raise ValueError("the query text is empty; give a text, or --image PATH")
        if args.json:
            check_output(args.json, "--json", search_query.is_hits_file, "search.py query")
        if args.sheet:
            check_output(args.sheet, "--sheet", lambda path: has_mark(path, SHEET_WRITTEN_BY),
                         "search.py query")
    else:
        check_output(args.out, "--out", search_query.is_export, "search.py export")
        check_output(search_query.manifest_path(args.out), "--out (its manifest)",
                     search_query.is_export_manifest, "search.py export")


def if_disk_full(e: OSError, safe: str):
    """A full disk as one line naming the file and saying what stays safe (other errors pass)."""
    if e.errno in DISK_FULL:
        raise OSError(e.errno, f"no space left on the device to write "
                               f"{e.filename or 'its files'}: {safe}; free some space and run "
                               f"the same command again") from e


def run_index(args) -> int:
    if args.workers is None:
        args.workers = default_workers(args.device)
    model, preprocess, identity = search.load_model(args.checkpoint, args.clip, args.device,
                                                    args.clip_activation, args.clip_sha256)
    try:
        result = search.build_index(args.images, args.out, model, preprocess, identity,
                                    args.tile, args.stride, args.batch_size, args.workers,
                                    args.save_every, args.device, prune=args.prune)
    except OSError as e:
        if_disk_full(e, f"the index in {args.out} is as last committed, and the images embedded "
                        f"before the last save stay in its parts/ for the next run")
        raise
    return 0 if result["rows"] else 1


def run_query(args) -> List[Dict]:
    index = search_query.SearchIndex(args.index)
    recorded = index.manifest["model"]
    checkpoint = args.checkpoint or recorded["checkpoint"]
    backbone = args.clip or recorded["backbone"]
    activation = args.clip_activation or recorded["activation"]
    model, preprocess, identity = search.load_model(
        checkpoint, backbone, args.device, activation, args.clip_sha256,
        activation_from=None if args.clip_activation else f"recorded in index {args.index}")
    check_same_model(recorded, identity, f"index {args.index}")
    if args.text is not None and token_count(args.text) > model.context_length:
        print(f"warning: the query text is {token_count(args.text)} tokens, more than the "
              f"model's {model.context_length}-token context: only its first "
              f"{model.context_length - 2} tokens are used")
    query = search_query.embed_query(model, preprocess, args.device, args.text, args.image)
    hits = index.search(query, args.top)
    for h in hits:
        box = f"  {h['box']}" if h["box"] else ""
        print(f"{h['rank']:>4}  {h['score']:.4f}  {h['path']}{box}")
    try:
        if args.json:
            write_json(args.json, hits)
        if args.sheet:
            title = args.text or f"image: {os.path.basename(args.image)}"
            contact_sheet(title, args.image, hits, args.sheet)
            print(f"wrote {args.sheet}")
    except OSError as e:
        if_disk_full(e, "that file was not written, and nothing it would replace is lost")
        raise
    return hits


def contact_sheet(title: str, query_image: Optional[str], hits: List[Dict], path: str,
                  columns: int = 5, thumb: int = 128):
    """A PNG: the query (its text, and the image for an image query), then each hit's image or
    tile with its rank and score."""
    pad, text_h = 6, 30
    cells = ([query_image] if query_image else []) + list(hits)
    names = [cell if isinstance(cell, str) else cell["path"] for cell in cells]
    thumbs = {}
    for name in dict.fromkeys(names):  # tiles of one large scene often rank together: one decode
        image = search.open_image(name)  # 8-bit RGB (datasets.to_rgb8)
        for c in (c for c, n in enumerate(names) if n == name):
            box = None if isinstance(cells[c], str) else cells[c]["box"]
            thumbs[c] = ImageOps.fit(image.crop(tuple(box)) if box else image, (thumb, thumb))
    rows = (len(cells) + columns - 1) // columns
    size = (pad + columns * (thumb + pad), text_h + rows * (thumb + text_h))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    lines = textwrap.wrap(f"query: {title}", (canvas.width - 2 * pad) // 6)[:2]
    draw.text((pad, pad), "\n".join(lines), fill="black")
    for c, (cell, name) in enumerate(zip(cells, names)):
        x, y = pad + (c % columns) * (thumb + pad), text_h + (c // columns) * (thumb + text_h)
        canvas.paste(thumbs[c], (x, y))
        label = "query" if isinstance(cell, str) else f"#{cell['rank']} {cell['score']:.3f}"
        caption = f"{label}\n{os.path.basename(name)[:thumb // 6]}"
        draw.text((x, y + thumb + 2), caption, fill="black")
    info = PngImagePlugin.PngInfo()
    info.add_text("written_by", SHEET_WRITTEN_BY)
    atomic_write(path, lambda f: canvas.save(f, format="PNG", optimize=True, pnginfo=info),
                 mode="wb")


def run_export(args) -> int:
    try:
        npy, manifest = search_query.export(args.index, args.out)
    except OSError as e:
        if_disk_full(e, "that file was not written (nothing it would replace is lost); an export "
                        "is whole once both its .npy and its manifest are written")
        raise
    print(f"wrote {npy} and {manifest}")
    return 0


def main(argv: Optional[List[str]] = None):
    args = parse_args(argv)
    check_arguments(args)
    return {"index": run_index, "query": run_query, "export": run_export}[args.command](args)


def cli(argv: Optional[List[str]] = None) -> int:
    """`main` for the shell: an error the user can act on is one line (exit 1), not a traceback."""
    try:
        result = main(argv)
    except (OSError, ValueError, DownloadError) as e:  # OSError: also files not found, disk full
        raise SystemExit(f"error: {e}")
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(cli())
