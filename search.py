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
import os
import sys
import textwrap
from typing import Dict, List, Optional

import torch
from PIL import Image, ImageDraw, ImageOps

from mrs_adapter.atomic import atomic_write, write_json
from mrs_adapter.datasets import default_workers
from mrs_adapter.search import index as search
from mrs_adapter.search import query as search_query
from mrs_adapter.search.store import check_same_model
from mrs_adapter.weights.download import DownloadError


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("index", "query"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", help="best.pt of train.py (query: default the index's)")
        s.add_argument("--clip", help="CLIP name (ViT-B/32) or weights file: the zero-shot model, "
                                      "or the backbone of --checkpoint (default: the checkpoint's)")
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


def run_index(args) -> int:
    if args.tile < 1 or not 0 < args.stride <= args.tile:
        raise ValueError(f"--tile {args.tile} --stride {args.stride}: expected 0 < stride <= tile")
    if args.workers is None:
        args.workers = default_workers(args.device)
    model, preprocess, identity = search.load_model(args.checkpoint, args.clip, args.device)
    result = search.build_index(args.images, args.out, model, preprocess, identity, args.tile,
                                args.stride, args.batch_size, args.workers, args.save_every,
                                args.device)
    return 0 if result["rows"] else 1


def run_query(args) -> List[Dict]:
    index = search_query.SearchIndex(args.index)
    recorded = index.manifest["model"]
    checkpoint = args.checkpoint or recorded["checkpoint"]
    backbone = args.clip or recorded["backbone"]
    model, preprocess, identity = search.load_model(checkpoint, backbone, args.device)
    check_same_model(recorded, identity, f"index {args.index}")
    query = search_query.embed_query(model, preprocess, args.device, args.text, args.image)
    hits = index.search(query, args.top)
    for h in hits:
        box = f"  {h['box']}" if h["box"] else ""
        print(f"{h['rank']:>4}  {h['score']:.4f}  {h['path']}{box}")
    if args.json:
        write_json(args.json, hits)
    if args.sheet:
        title = args.text or f"image: {os.path.basename(args.image)}"
        contact_sheet(title, args.image, hits, args.sheet)
        print(f"wrote {args.sheet}")
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
    atomic_write(path, lambda f: canvas.save(f, format="PNG", optimize=True), mode="wb")


def main(argv: Optional[List[str]] = None):
    args = parse_args(argv)
    if args.command == "index":
        return run_index(args)
    if args.command == "query":
        return run_query(args)
    npy, manifest = search_query.export(args.index, args.out)
    print(f"wrote {npy} and {manifest}")
    return 0


if __name__ == "__main__":
    try:
        result = main()
    except (FileNotFoundError, FileExistsError, ValueError, DownloadError) as e:
        raise SystemExit(f"error: {e}")
    sys.exit(result if isinstance(result, int) else 0)
