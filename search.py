"""Search a folder of your own aerial images by text or image, with a best.pt or zero-shot CLIP.

    python search.py index IMAGES_DIR --out INDEX_DIR --checkpoint runs/rsitmd/best.pt
    python search.py index IMAGES_DIR --out INDEX_DIR --clip ViT-B/32          # zero-shot
    python search.py query INDEX_DIR "a baseball field beside a highway" --top 20 --sheet hits.png
    python search.py query INDEX_DIR --image my_scene.tif --json hits.json
    python search.py export INDEX_DIR --out emb.npy                            # + emb.manifest.json

Archive scale (docs/search.md "Many processes, many machines"):
    torchrun --nproc_per_node=4 search.py index IMAGES_DIR --out INDEX_DIR --clip ViT-B/32
    python search.py merge INDEX_NORTH INDEX_SOUTH --out INDEX_ALL   # indexes built separately
    python search.py ann INDEX_ALL      # FAISS index (pip install -e ".[ann]"); docs/scale.md
    python search.py migrate OLD_INDEX  # an index of an earlier version: tile records to columns

GeoTIFF / COG (pip install -e ".[geo]"; docs/geotiff.md): read by window, bands, stretch, nodata,
coordinates; hits as GeoJSON, a map, refined queries (docs/search-outputs.md):
    python search.py index SCENES --out INDEX --clip ViT-B/32 --gsd 0.5 --bands 3 2 1
    python search.py query INDEX "a marina" --geojson hits.geojson --map hits.png
    python search.py query INDEX "a marina" --like hits.json:1,4 --unlike hits.json:7
    python search.py query INDEX "a marina" --within 14.2 40.8 14.3 40.9 --min-score 0.25
    python search.py export INDEX --geoparquet emb.parquet

Large images are cut into --tile px tiles every --stride px (mrs_adapter/search/grid.py says why
256 / 192); a rerun embeds only new or changed files, and an interrupted run continues.
"""
import argparse
import errno
import os
import sys
import textwrap
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin

from mrs_adapter import clip
from mrs_adapter.atomic import (
    atomic_write,
    check_folder_writable,
    check_output,
    has_mark,
)
from mrs_adapter.datasets import default_workers
from mrs_adapter.run import distributed
from mrs_adapter.search import ann
from mrs_adapter.search import hits as hit_files
from mrs_adapter.search import index as search
from mrs_adapter.search import query as search_query
from mrs_adapter.search.hit_map import draw_map
from mrs_adapter.search.merge import merge_indexes
from mrs_adapter.search.outputs import written_by_us
from mrs_adapter.search.readers import RasterioMissing, choose_reader
from mrs_adapter.search.refine import FORMULA, combine_query, describe_query
from mrs_adapter.search.store import (
    DEFAULT_RASTER,
    check_index_folder,
    check_same_model,
    index_lock,
    migrate,
)
from mrs_adapter.search.tiling import RasterOptions, picture
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
    merge = sub.add_parser("merge", help="join indexes built separately into a new one",
                           description="Join indexes built separately (other machines, a job "
                                       "array) into a new index. They must share the model, "
                                       "--tile, --stride and the GeoTIFF flags; the new index's "
                                       "image folder is the deepest folder holding all of "
                                       "theirs, and its paths are relative to it.")
    merge.add_argument("indexes", nargs="+", metavar="INDEX",
                       help="index folders written by `search.py index` (two or more)")
    merge.add_argument("--out", required=True, help="the merged index: a new or empty folder")
    ann_cmd = sub.add_parser("ann", help="build or extend an approximate (FAISS) index of an index",
                             description="Build an approximate nearest-neighbour index (FAISS: "
                                         "HNSW below 100,000 rows, IVF-PQ from there; pip install "
                                         "-e \".[ann]\") in the index folder, for queries of "
                                         "large indexes; its candidates are re-scored exactly. "
                                         "Rerun after an `index` run: it says whether it extends "
                                         "or rebuilds. docs/scale.md")
    ann_cmd.add_argument("index", help="index folder written by `search.py index`")
    ann_cmd.add_argument("--kind", choices=("hnsw", "ivfpq"),
                         help="the ANN kind (default: chosen by the number of rows)")
    migrate = sub.add_parser("migrate", help="move an earlier index's tile records into columns",
                             description="Convert an index written before the tile columns "
                                         "(every tile's box, bounds and footprint in index.json, "
                                         "read whole by every query) to the columns beside its "
                                         "embeddings; nothing is embedded again, and a killed "
                                         "migrate can be run again.")
    migrate.add_argument("index", help="index folder written by an earlier `search.py index`")
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
    add_raster_flags(index)
    add_query_flags(query)
    export.add_argument("index")
    export.add_argument("--out", help="embeddings .npy (float16); the manifest goes beside it as "
                                      "<name>.manifest.json")
    export.add_argument("--geoparquet", help="GeoParquet: one row per tile with its WKB "
                                             "footprint and embedding (docs/search-outputs.md)")
    args = p.parse_args(argv)
    if args.command == "index" and not (args.checkpoint or args.clip):
        p.error("index needs --checkpoint best.pt or --clip NAME_OR_FILE (zero-shot)")
    if args.command == "query" and not (args.text or args.image or args.like):
        p.error("query needs a text, --image PATH or --like FILE:RANK")
    if args.command == "merge" and len(args.indexes) < 2:
        p.error("merge needs two or more index folders")
    if args.command == "export" and not (args.out or args.geoparquet):
        p.error("export needs --out EMB.npy or --geoparquet EMB.parquet (or both)")
    return args


def add_raster_flags(index):
    """index's GeoTIFF flags (docs/geotiff.md; read with rasterio, the [geo] extra)."""
    index.add_argument("--bands", type=int, nargs="+", metavar="N",
                       help="GeoTIFF bands shown as red, green, blue, 1-based as GDAL numbers "
                            "them (one: gray); default the bands named red, green, blue, else "
                            "1 2 3")
    index.add_argument("--gsd", type=float, metavar="METRES",
                       help="resample every scene to this ground sampling distance before "
                            "tiling (UCM, the finest training set, is 0.3 m)")
    index.add_argument("--stretch", type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="map MIN..MAX to 0..255 in every scene that is not 8-bit (default: "
                            "each scene's 2nd-98th percentiles of its valid pixels)")
    index.add_argument("--max-nodata", type=float, default=DEFAULT_RASTER["max_nodata"],
                       help="leave out tiles with more than this fraction of nodata (0.5)")


def add_query_flags(query):
    """query's inputs (positives, negatives: docs/search-outputs.md) and outputs."""
    query.add_argument("index", help="index folder written by `search.py index`")
    query.add_argument("text", nargs="*", help="text queries (positives)")
    query.add_argument("--image", action="append", default=[], metavar="PATH",
                       help="an image as a positive example (repeatable)")
    query.add_argument("--not", dest="negative", action="append", default=[], metavar="PATH",
                       help="an image as a negative example (repeatable)")
    query.add_argument("--like", action="append", default=[], metavar="FILE:R1,R2",
                       help="hits of an earlier query (its --json or --geojson) as positives")
    query.add_argument("--unlike", action="append", default=[], metavar="FILE:R",
                       help=f"hits of an earlier query as negatives. Several examples: "
                            f"{FORMULA}")
    query.add_argument("--top", type=int, default=20)
    query.add_argument("--min-score", type=float, metavar="S",
                       help="every hit scoring at least S (however many), instead of --top")
    query.add_argument("--within", type=float, nargs=4, metavar=("WEST", "SOUTH", "EAST",
                                                                  "NORTH"),
                       help="only tiles whose WGS84 footprint meets this lon/lat box")
    query.add_argument("--json", help="write the hits (rank, score, path, box, crs, bounds, "
                                      "footprint) here")
    query.add_argument("--geojson", help="write the hits as an RFC 7946 FeatureCollection")
    query.add_argument("--map", help="draw the hits' outlines on each scene's overview (PNG)")
    query.add_argument("--sheet", help="draw the query and its hits with scores into this PNG")
    query.add_argument("--exact", action="store_true",
                       help="score every row, even where the index has a current ANN index")


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
    counts = {"index": ("batch_size", "save_every"), "query": ("top",)}
    for flag in counts.get(args.command, ()):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a "
                             f"positive number")
    if args.command in ("index", "query"):
        check_device(args.device)
    if args.command == "index":
        if args.tile < 1 or not 0 < args.stride <= args.tile:
            raise ValueError(f"--tile {args.tile} --stride {args.stride}: expected "
                             f"0 < stride <= tile")
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers {args.workers}: expected 0 (decode in the main process) "
                             f"or more")
        raster_options(args)  # its errors, before anything is read
        if not os.path.isdir(args.images):
            raise FileNotFoundError(f"image folder not found: {args.images}")
        check_folder_writable(args.out, "--out")
        check_index_folder(args.out, args.images)
    elif args.command == "query":
        check_query(args)
    elif args.command == "merge":
        check_folder_writable(args.out, "--out")
    elif args.command in ("ann", "migrate"):
        if not os.path.isfile(os.path.join(args.index, "index.json")):
            raise FileNotFoundError(f"no search index in {args.index} (expected "
                                    f"{args.index}/index.json; make one with `search.py index`)")
    else:  # export
        if args.out:
            check_output(args.out, "--out", search_query.is_export, "search.py export")
            check_output(search_query.manifest_path(args.out), "--out (its manifest)",
                         search_query.is_export_manifest, "search.py export")
        if args.geoparquet:
            check_output(args.geoparquet, "--geoparquet", written_by_us, "search.py export")


def check_query(args):
    """query's inputs and outputs, before the model is loaded."""
    if any(not text.strip() for text in args.text):
        raise ValueError("a query text is empty; give a text, or --image PATH")
    if args.min_score is not None and not -1.0 <= args.min_score <= 1.0:
        raise ValueError(f"--min-score {args.min_score:g}: expected a cosine score from -1 to 1")
    if args.within:
        args.within = hit_files.check_lonlat_box(*args.within)
    for flag in ("like", "unlike"):
        for ref in getattr(args, flag):
            hit_files.parse_ref(ref, f"--{flag}")
    for path in args.image + args.negative:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
    outputs = {"--json": (args.json, search_query.is_hits_file),
               "--geojson": (args.geojson, written_by_us), "--map": (args.map, written_by_us),
               "--sheet": (args.sheet, lambda path: has_mark(path, SHEET_WRITTEN_BY))}
    for flag, (path, ours) in outputs.items():
        if path:
            check_output(path, flag, ours, "search.py query")


def raster_options(args) -> RasterOptions:
    """index's GeoTIFF flags as RasterOptions; an error naming the flag for a bad value."""
    if args.bands is not None and (len(args.bands) not in (1, 3) or min(args.bands) < 1):
        raise ValueError(f"--bands {' '.join(map(str, args.bands))}: expected 1 or 3 band "
                         f"numbers from 1 (as GDAL numbers them)")
    if args.gsd is not None and not args.gsd > 0:
        raise ValueError(f"--gsd {args.gsd:g}: expected metres per pixel above 0")
    if args.stretch is not None and not args.stretch[0] < args.stretch[1]:
        raise ValueError(f"--stretch {args.stretch[0]:g} {args.stretch[1]:g}: expected MIN "
                         f"below MAX")
    if not 0.0 <= args.max_nodata <= 1.0:
        raise ValueError(f"--max-nodata {args.max_nodata:g}: expected a fraction from 0 to 1")
    return RasterOptions(tuple(args.bands) if args.bands else None, args.gsd,
                         tuple(args.stretch) if args.stretch else None, args.max_nodata)


def if_disk_full(e: OSError, safe: str):
    """A full disk as one line naming the file and saying what stays safe (other errors pass)."""
    if e.errno in DISK_FULL:
        raise OSError(e.errno, f"no space left on the device to write "
                               f"{e.filename or 'its files'}: {safe}; free some space and run "
                               f"the same command again") from e


def run_index(args) -> int:
    """Under torchrun each process embeds a share of the files on its own device (cuda:<local
    rank>); --batch-size and --workers are per process."""
    args.device = distributed.start(args.device, None, search.MEET_TIMEOUT).device
    if args.workers is None:
        args.workers = default_workers(args.device)
    log = print if distributed.rank() == 0 else lambda *a: None  # which weights: said once
    model, preprocess, identity = distributed.together(lambda: search.load_model(
        args.checkpoint, args.clip, args.device, args.clip_activation, args.clip_sha256, log=log))
    try:
        result = search.build_index(args.images, args.out, model, preprocess, identity,
                                    args.tile, args.stride, args.batch_size, args.workers,
                                    args.save_every, args.device, prune=args.prune,
                                    options=raster_options(args))
    except OSError as e:
        if_disk_full(e, f"the index in {args.out} is as last committed, and the images embedded "
                        f"before the last save stay in its parts/ for the next run")
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    info, _ = ann.read_info(args.out)
    if distributed.rank() == 0 and info and result["rows"]:
        parts = search_query.SearchIndex(args.out).parts()
        why, rows = ann.stale(info, parts), sum(n for _, n in parts)
        if why:
            print(f"note: the ANN index of {args.out} is {why}; queries score every row until "
                  f"`search.py ann {args.out}` rebuilds it")
        elif rows > info["rows"]:
            print(f"note: the ANN index of {args.out} covers {info['rows']:,} of {rows:,} rows; "
                  f"queries score the new ones exactly until `search.py ann {args.out}` adds "
                  f"them")
    return 0 if result["rows"] else 1


def query_examples(args, index, model, preprocess):
    """(positives, negatives): [(label, (E,) embedding)] of the texts, --image, --like (the
    rows the index holds for those hits) and --not, --unlike."""
    options = RasterOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in
                               index.manifest.get("raster", DEFAULT_RASTER).items()})

    def image(path):
        return f"image {path}", search_query.embed_image(model, preprocess, args.device, path,
                                                         options)

    def hits(ref, flag):
        found = []
        for hit in hit_files.hits_by_rank(ref, flag):
            row = index.row_of(hit["path"], hit.get("box"))
            if row is None:
                raise ValueError(f"{flag} {ref}: rank {hit['rank']} ({hit['path']} "
                                 f"{hit.get('box')}) is not in index {args.index}")
            label = f"{ref.rpartition(':')[0]}:{hit['rank']} ({hit['path']} {hit.get('box')})"
            found.append((label, np.asarray(index.embeddings[row], np.float32)))
        return found

    positives = [(f'text "{t}"', search_query.embed_text(model, args.device, t))
                 for t in args.text]
    positives += [image(path) for path in args.image]
    positives += [h for ref in args.like for h in hits(ref, "--like")]
    negatives = [image(path) for path in args.negative]
    negatives += [h for ref in args.unlike for h in hits(ref, "--unlike")]
    return positives, negatives


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
    for text in args.text:
        if token_count(text) > model.context_length:
            print(f"warning: the query text is {token_count(text)} tokens, more than the "
                  f"model's {model.context_length}-token context: only its first "
                  f"{model.context_length - 2} tokens are used")
    positives, negatives = query_examples(args, index, model, preprocess)
    described = describe_query([p for p, _ in positives], [n for n, _ in negatives])
    single = len(positives) + len(negatives) == 1
    if not single:
        print(described)
    query = combine_query([e for _, e in positives], [e for _, e in negatives])
    hits = index.search(query, args.top, args.min_score, args.within, args.exact)
    if index.how:
        print(index.how)
    if not hits:
        print("no hit" + (" in the --within box (only georeferenced tiles can be in it)"
                          if args.within else " at or above --min-score"))
    for h in hits:
        box = f"  {h['box']}" if h["box"] else ""
        print(f"{h['rank']:>4}  {h['score']:.4f}  {h['path']}{box}")
    try:
        write_hits(args, index, hits, positives[0][0] if single else described)
    except OSError as e:
        if_disk_full(e, "that file was not written, and nothing it would replace is lost")
        raise
    return hits


def write_hits(args, index, hits: List[Dict], described: str):
    """--json, --geojson, --sheet and --map of the hits."""
    if args.json:
        hit_files.write_hits_json(args.json, hits, described)
    if args.geojson:
        unplaced = hit_files.write_geojson(args.geojson, hits, described)
        print(f"wrote {args.geojson}" + (f" ({unplaced} hit(s) without georeferencing: null "
                                         f"geometry)" if unplaced else ""))
    records = {h["path"]: index.raster_record(index_rel(index, h["path"]))  # read for pictures
               for h in hits} if args.sheet or args.map else {}
    if args.sheet:
        title = " ".join(args.text) or f"image: {os.path.basename((args.image or ['?'])[0])}"
        contact_sheet(title, (args.image or [None])[0], hits, args.sheet, records)
        print(f"wrote {args.sheet}")
    if args.map and hits:
        draw_map(args.map, map_scenes(hits, records))
        print(f"wrote {args.map}")


def index_rel(index, path: str) -> str:
    return os.path.relpath(path, index.manifest["images"]).replace(os.sep, "/")


def map_scenes(hits: List[Dict], records: Dict) -> List[Dict]:
    """hit_map's scenes: per file the hits fall in (in order of their best hit), its overview."""
    by_path = {}
    for h in hits:
        by_path.setdefault(h["path"], []).append(h)
    side = 1024 if len(by_path) <= 4 else 512
    scenes = []
    for path, mine in by_path.items():
        overview, scale = picture(path, None, records[path], max_side=side)
        scenes.append({"path": path, "overview": overview, "scale": scale, "hits": mine})
    return scenes


def contact_sheet(title: str, query_image: Optional[str], hits: List[Dict], path: str,
                  records: Optional[Dict] = None, columns: int = 5, thumb: int = 128):
    """A PNG: the query (its text, and the image for an image query), then each hit's image or
    tile with its rank and score; records: path -> its index raster record (GeoTIFFs)."""
    pad, text_h = 6, 30
    cells = ([query_image] if query_image else []) + list(hits)
    names = [cell if isinstance(cell, str) else cell["path"] for cell in cells]
    thumbs, records = {}, records or {}
    for name in dict.fromkeys(names):  # tiles of one large scene often rank together: one decode
        whole = search.open_image(name) if choose_reader(name) == "pillow" else None
        for c in (c for c, n in enumerate(names) if n == name):
            box = None if isinstance(cells[c], str) else cells[c]["box"]
            if whole is not None:  # Pillow: 8-bit RGB (datasets.to_rgb8), cropped
                image = whole.crop(tuple(box)) if box else whole
            else:  # rasterio: the tile's window, shown as it was indexed
                image = picture(name, box, records.get(name), max_side=4 * thumb)[0]
            thumbs[c] = ImageOps.fit(image, (thumb, thumb))
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
        if args.out:
            npy, manifest = search_query.export(args.index, args.out)
            print(f"wrote {npy} and {manifest}")
        if args.geoparquet:
            rows = search_query.export_geoparquet(args.index, args.geoparquet)
            print(f"wrote {args.geoparquet} ({rows} rows)")
    except OSError as e:
        if_disk_full(e, "that file was not written (nothing it would replace is lost); an export "
                        "is whole once both its .npy and its manifest are written")
        raise
    return 0


def run_ann(args) -> int:
    """Build the ANN index of args.index, or extend the current one with the rows it lacks, under
    the index's lock (no `index` run commits meanwhile)."""
    index = search_query.SearchIndex(args.index)
    parts = index.parts()
    del index  # its memory map: the build maps the file itself
    with index_lock(args.index):
        info, _ = ann.read_info(args.index)
        if info is not None and not ann.stale(info, parts) and args.kind in (None, info["kind"]):
            info = ann.extend(args.index, parts)
            print(f"ANN index of {args.index}: {info['kind']}, {info['rows']:,} rows, current")
        else:
            if info is not None:
                print(f"rebuilding the ANN index of {args.index}: "
                      + (ann.stale(info, parts) or f"--kind {args.kind}"))
            ann.build(args.index, parts, kind=args.kind)
    return 0


def run_merge(args) -> int:
    try:
        merged = merge_indexes(args.indexes, args.out)
    except OSError as e:
        if_disk_full(e, f"the indexes merged are unchanged, and {args.out} holds no index yet")
        raise
    return 0 if merged["rows"] else 1


def run_migrate(args) -> int:
    try:
        migrate(args.index)
    except OSError as e:
        if_disk_full(e, f"index {args.index} is as it was (index.json is written last)")
        raise
    return 0


def main(argv: Optional[List[str]] = None):
    args = parse_args(argv)
    check_arguments(args)
    return {"index": run_index, "query": run_query, "export": run_export,
            "merge": run_merge, "ann": run_ann, "migrate": run_migrate}[args.command](args)


def cli(argv: Optional[List[str]] = None) -> int:
    """`main` for the shell: an error the user can act on is one line (exit 1), not a traceback."""
    try:
        result = main(argv)
    except (OSError, ValueError, DownloadError, RasterioMissing) as e:  # OSError: also not found
        # under torchrun every process fails alike (distributed.together); one says why
        raise SystemExit(f"error: {e}" if distributed.reported_here(e) else 1)
    except KeyboardInterrupt as e:  # Ctrl-C: nothing is half-written (atomic writes, parts)
        if distributed.reported_here(e):
            print("interrupted: an index is as last committed, and the images embedded before "
                  "the last save stay in its parts/ for the next run; no output file was "
                  "half-written", file=sys.stderr)
        raise SystemExit(130)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(cli())
