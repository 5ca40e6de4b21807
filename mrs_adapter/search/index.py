"""Search a folder of your own aerial images by text or by image (README 'Search your own images').

Every image (or, for large scenes, every tile) is embedded once by CLIP's image tower, with or
without a trained PETL method, exactly as eval.py embeds test images (docs/method.md §6); a
query is one text or image embedding ranked against them by cosine similarity. The index is a
folder (store.py): index.json (model, files; the commit point), embeddings-<n>.npy (float16,
one row per tile, memory-mapped when queried) and the tiles' boxes and places in columns beside
it (tile_store.py). Runs save parts/
every N images, so a killed run continues where it stopped, and a second run embeds only new
or changed files. A large scene's tiles reach the encoder a batch at a time (tiling.py: a
GeoTIFF read a window per tile, a Pillow image decoded whole; then a few batches); files and
folders that cannot be read are skipped and listed, and a run that would drop more than half of
the index at once is refused without --prune.
"""
import contextlib
import ctypes
import os
import time
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import clip
from ..datasets import read_image, split_at_to_tensor
from ..metrics import encode_batches
from ..run import distributed
from ..run.distributed import everyone, from_rank0, together
from ..run.rebuild import apply_checkpoint, load_backbone, read_train_checkpoint
from ..weights.download import sha256_of
from . import ann, tile_store
from .grid import STRIDE, TILE, tile_boxes  # noqa: F401 (tile_boxes: as before)
from .readers import RasterioMissing
from .scan import file_stats, list_images, unseen  # noqa: F401 (list_images: as before)
from .shard import pixel_count, share_by_pixels
from .store import (
    Part,
    check_index_folder,
    commit,
    index_lock,
    next_part_number,
    open_index,
    part_numbers,
    reusable_rows,
)
from .tiling import Chunk, RasterOptions, file_chunks, read_tiles  # noqa: F401 (read_tiles)

SAVE_EVERY = 1000
# Under torchrun the processes meet only before and after embedding their shares: the first to
# finish (or fail) waits there for the last, so the wait may be long (torch's default: 30 min)
MEET_TIMEOUT = timedelta(hours=24)


def load_model(checkpoint: Optional[str] = None, clip_name: Optional[str] = None, device="cpu",
               activation: Optional[str] = None, sha256: Optional[str] = None,
               activation_from: Optional[str] = None, log=print):
    """(model in eval mode, preprocess, identity): a train.py checkpoint rebuilt as eval.py does
    (its recorded backbone, or `clip_name` where the weights moved), or plain CLIP `clip_name`;
    `activation` and `sha256` as train.py's --clip-activation and --clip-sha256. Logs which
    weights and MLP activation are used (clip.describe), as train.py and eval.py do."""
    ckpt, config = read_train_checkpoint(checkpoint) if checkpoint else ({}, {})
    if checkpoint:
        model, preprocess = load_backbone(config, clip_name, activation, sha256, where=checkpoint)
        backbone = model.backbone  # read before a method's head may wrap the CLIP
        model = apply_checkpoint(model, ckpt)
    else:
        model, preprocess = clip.load(clip_name or "ViT-B/32", "cpu", activation=activation,
                                      sha256=sha256)
        backbone = model.backbone
    if activation_from:
        backbone["activation_from"] = activation_from
    log(clip.describe(backbone))
    named = backbone["clip"] in clip.available_models()
    identity = {"backbone": backbone["clip"] if named else backbone["path"],
                "backbone_sha256": backbone["sha256"],
                "activation": backbone["activation"],
                "method": config.get("method", "zero_shot"),
                "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
                "checkpoint_sha256": sha256_of(checkpoint) if checkpoint else None}
    return model.to(device).eval(), preprocess, identity


def open_image(path: str):
    """The decoded PIL image, through the package's one image reader (datasets.read_image)."""
    return read_image(path, lambda image: image.copy())  # read_image closes the file


def _errors() -> tuple:
    """What a file that cannot be read raises: Pillow's and the package's errors, rasterio's
    (when installed) and RasterioMissing (an ImportError naming the file and the extra)."""
    errors = (OSError, ValueError, SyntaxError, MemoryError, RasterioMissing)
    try:
        from rasterio.errors import RasterioError
    except ImportError:
        return errors
    return errors + (RasterioError,)


def _as_is(items):
    return items  # DataLoader's collate_fn: a Chunk passes through as it is


class _TileStream(IterableDataset):
    """Items (i, Chunk, None) of files[i], at most `chunk` tiles each, or (i, None, error) for a
    file that cannot be read. With W loader processes, process w reads files w, w + W, ...: each
    holds one scene's reader (Pillow: the decoded image) and its prefetched chunks."""

    def __init__(self, root: str, files: List[str], decode, tile: int, stride: int, chunk: int,
                 options: RasterOptions):
        self.root, self.files, self.decode = root, files, decode
        self.tile, self.stride, self.chunk, self.options = tile, stride, chunk, options

    def __iter__(self):
        worker, errors = get_worker_info(), _errors()
        mine = range(len(self.files)) if worker is None else \
            range(worker.id, len(self.files), worker.num_workers)
        for i in mine:
            path = os.path.join(self.root, self.files[i])
            try:
                for chunk in file_chunks(path, self.decode, self.tile, self.stride, self.chunk,
                                         self.options):
                    yield i, chunk, None
            except errors as e:
                yield i, None, str(e) or type(e).__name__


def encode_images(model, x: torch.Tensor, device) -> np.ndarray:
    """L2-normalised image embeddings, float32 (N, E), as eval.py computes them (bf16 on CUDA)."""
    device = torch.device(device)
    return encode_batches(model.encode_image, [x], device, torch.bfloat16).cpu().numpy()


class _Encoder:
    """Tiles of any images, encoded `batch_size` at a time: small images share a batch, a large
    one fills several. Tiles wait as uint8; only the batch being encoded is float. `add` and
    `flush` return the rows encoded: [(i, first, (k, E) float16)]."""

    def __init__(self, model, finish, batch_size: int, device):
        self.model, self.finish, self.batch_size, self.device = model, finish, batch_size, device
        self.waiting, self.count = [], 0  # [(i, first, uint8 tiles)], their number of tiles

    def add(self, i: int, first: int, tiles: torch.Tensor) -> List:
        self.waiting.append((i, first, tiles))
        self.count += len(tiles)
        encoded = []
        while self.count >= self.batch_size:
            encoded += self._encode(self.batch_size)
        return encoded

    def flush(self) -> List:
        return self._encode(self.count) if self.count else []

    def _encode(self, n: int) -> List:
        pieces, owners = [], []
        while n:
            i, first, tiles = self.waiting[0]
            k = min(n, len(tiles))
            pieces.append(tiles[:k])
            owners.append((i, first, k))
            self.waiting[0] = (i, first + k, tiles[k:])
            if k == len(tiles):
                self.waiting.pop(0)
            n, self.count = n - k, self.count - k
        x = self.finish(torch.cat(pieces))
        rows = encode_images(self.model, x, self.device).astype(np.float16)
        starts = np.cumsum([0] + [k for _, _, k in owners])
        return [(i, first, rows[a:a + k]) for (i, first, k), a in zip(owners, starts)]


def _freed_memory_goes_back():
    """Have glibc (Linux) serve every block over 128 KB by its own mapping, returned when freed.
    By default glibc raises that threshold up to 32 MB as larger blocks are freed, and keeps what
    is freed below it in its heap: an index process then held the tile, band and batch arrays
    it had freed beside the encoder's next batch, and its peak grew with the scene (325 MB over
    a 10,240 px scene; 196 MB with this, 161 MB over 20,480 px). Elsewhere nothing is done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)  # a fixed threshold: no dynamic raise
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)  # free heap top over 128 KB goes back too


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _progress(done: int, total: int, tiles: int, start: float, log):
    rate = done / max(time.time() - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    log(f"  {done}/{total} images, {tiles} tiles, {rate:.1f} images/s, ETA {eta:.0f}s")


def _check_losses(manifest: Dict, kept, images: str, out: str, prune: bool, later: str = ""):
    """Refuse (unless `prune`) to drop more than half of the indexed images at once: an empty,
    unmounted or unreadable image folder must not empty the index."""
    lost = [rel for rel in manifest["files"] if rel not in kept]
    if not prune and 2 * len(lost) > len(manifest["files"]):
        raise ValueError(f"{len(lost)} of the {len(manifest['files'])} images of index {out} are "
                         f"gone from {images} or unreadable (e.g. {lost[0]}): is the folder empty, "
                         f"unmounted or unreadable? The index is unchanged{later}; if they are "
                         f"gone for good, run again with --prune to remove them")


class _Scene:
    """One file's kept tiles (boxes, places) and rows while its chunks are being encoded."""

    def __init__(self):
        self.boxes, self.places, self.rows, self.received = [], [], [], 0
        self.info = None  # the last chunk's: the file's reader, CRS, dropped tiles, record

    def add(self, chunk: Chunk):
        self.boxes += chunk.boxes
        self.places += chunk.places
        if chunk.last:
            self.info = chunk.info

    def put(self, rows: np.ndarray):
        """Rows of the next tiles (the encoder returns a file's tiles in order)."""
        self.rows.append(rows)
        self.received += len(rows)

    @property
    def done(self) -> bool:
        return self.info is not None and self.received == len(self.boxes)

    def entry(self) -> Dict:
        """The file's index entry beside size, mtime_ns and first (store.ENTRY)."""
        entry = {"tiles": len(self.boxes), "reader": self.info["reader"],
                 "crs": self.info["crs"], "dropped": self.info["dropped"]}
        if "raster" in self.info:
            entry["raster"] = self.info["raster"]
        return entry

    def columns(self) -> Dict[str, np.ndarray]:
        """Its tiles' records (tile_store.py): boxes, and bounds and footprints where placed."""
        return tile_store.from_records(self.boxes, self.places)

    def stacked(self) -> Optional[np.ndarray]:
        """(kept tiles, E) float16, or None for a file with no tile kept (all nodata)."""
        return np.concatenate(self.rows) if self.rows else None


def _embed(images: str, todo: List[str], stats: Dict, skipped: Dict, model, preprocess,
           part: Part, settings: Dict, log) -> Tuple[Part, int]:
    """Embed the files `todo` into parts (saved every settings["save_every"] images); unreadable
    ones go into `skipped`. Returns the part being filled and the number of tiles embedded."""
    decode, finish = split_at_to_tensor(preprocess)  # workers decode + resize + crop; we normalise
    batch_size = settings["batch_size"]
    stream = _TileStream(images, todo, decode, settings["tile"], settings["stride"], batch_size,
                         settings["options"])
    loader = DataLoader(stream, batch_size=None, num_workers=settings["workers"],
                        collate_fn=_as_is)  # 0 workers: decoded here
    encoder, scenes = _Encoder(model, finish, batch_size, settings["device"]), {}  # {i: _Scene}
    done, n_tiles, since_save, start, last = 0, 0, 0, time.time(), time.time()

    def finish_scenes(encoded=()):  # rows back from the encoder; a scene with all its rows is done
        nonlocal done, n_tiles, since_save
        for i, _, rows in encoded:
            if i in scenes:  # not: a file that failed after some of its tiles were read
                scenes[i].put(rows)
        for i in [i for i, scene in scenes.items() if scene.done]:
            scene = scenes.pop(i)
            part.add(todo[i], stats[todo[i]], scene.entry(), scene.stacked(), scene.columns())
            done, n_tiles, since_save = done + 1, n_tiles + len(scene.boxes), since_save + 1

    for i, chunk, error in loader:
        if error is not None:
            scenes.pop(i, None)
            skipped[todo[i]] = {"size": stats[todo[i]][0], "mtime_ns": stats[todo[i]][1],
                                "error": error}
            log(f"  skipped {todo[i]}: {error}")
            done += 1
        else:
            scenes.setdefault(i, _Scene()).add(chunk)
            finish_scenes(encoder.add(i, chunk.first, chunk.tiles) if chunk.boxes else ())
        if since_save >= settings["save_every"]:  # a killed run keeps these; a rerun goes on
            part, since_save = part.save(), 0
        if time.time() - last > 2:
            _progress(done, len(todo), n_tiles, start, log)
            last = time.time()
    finish_scenes(encoder.flush())
    if todo:
        _progress(done, len(todo), n_tiles, start, log)
    return part, n_tiles


def build_index(images: str, out: str, model, preprocess, identity: Dict, tile: int = TILE,
                stride: int = STRIDE, batch_size: int = 64, workers: int = 0,
                save_every: int = SAVE_EVERY, device="cpu", log=print, prune: bool = False,
                options: RasterOptions = RasterOptions()) -> Dict:
    """Embed every new or changed image under `images` into the index folder `out` (see the module
    docstring); returns counts, the skipped files with their errors, and images/s.

    prune: allow a run to drop more than half of the indexed images (see _check_losses).
    options: how rasterio shows GeoTIFFs (--bands, --gsd, --stretch, --max-nodata); recorded in
    index.json, and an index answers for one setting.

    Under torchrun (a process group started, distributed.start) every process calls it: rank 0
    alone holds the lock, reads and writes index.json and commits; each process embeds its share
    of the files (balanced by pixels, shard.py) into its own parts. Each step ends with every
    process knowing its outcome (distributed.together): an error anywhere stops all, none waits."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    try:
        os.listdir(images)
    except OSError as e:
        raise ValueError(f"cannot list the image folder {images}: {e.strerror}") from None
    check_index_folder(out, images)
    _freed_memory_goes_back()
    rank, world = distributed.rank(), distributed.world_size()
    with contextlib.ExitStack() as held:  # rank 0's index lock, until the commit
        run = {}  # rank 0's: the manifest, the files and what is reused, until the commit
        plan = from_rank0(together(lambda: _plan(held, run, images, out, identity, tile, stride,
                                                 options, prune, log), every_rank=False))
        mine = _my_share(images, plan["todo"], rank, world)
        settings = dict(tile=tile, stride=stride, batch_size=batch_size, workers=workers,
                        save_every=save_every, device=device, options=options)
        start = time.time()

        def embed():  # into parts plan["part"] + rank, + world, ...: no two processes collide
            skipped = {}
            part, n_tiles = _embed(images, mine, plan["stats"], skipped, model, preprocess,
                                   Part(out, plan["part"] + rank, world), settings,
                                   log if rank == 0 else _quiet)
            part.save()
            return skipped, n_tiles, len(mine)

        shares = everyone(together(embed))  # here every process has saved all it embedded
        seconds = time.time() - start
        return from_rank0(together(lambda: _finish(run, shares, seconds, images, out, prune, log),
                                   every_rank=False))


def _quiet(*args):
    pass  # the progress lines of ranks other than 0: rank 0's stand for all (the shares balance)


def _plan(held: contextlib.ExitStack, run: Dict, images: str, out: str, identity: Dict, tile: int,
          stride: int, options: RasterOptions, prune: bool, log) -> Dict:
    """Rank 0: take the lock, open (or create) the index, find the new or changed files; the
    plan every process needs: {todo, their [size, mtime_ns], the first part number}."""
    held.enter_context(index_lock(out, log))
    manifest = open_index(out, images, identity, tile, stride, options.record())
    problems = {}
    stats = file_stats(images, problems)
    stats.update(unseen(manifest, problems))
    sources = reusable_rows(out, manifest, stats)  # every stored file's rows checked
    _check_losses(manifest, stats, images, out, prune)
    skipped = {rel: e for rel, e in manifest["skipped"].items()
               if stats.get(rel) == [e["size"], e["mtime_ns"]]}  # unreadable, unchanged since
    todo = [rel for rel in stats if rel not in sources and rel not in skipped]
    world = distributed.world_size()
    log(f"indexing {len(todo)} new or changed of {len(stats)} images under {images} "
        f"({len(sources)} already embedded, {len(skipped)} known unreadable)"
        + (f", shared by pixels among {world} processes" if world > 1 and todo else ""))
    run.update(manifest=manifest, stats=stats, problems=problems, skipped=skipped, todo=todo,
               saved_before=bool(part_numbers(out)))  # an interrupted run's: commit even if no news
    return {"todo": todo, "stats": {rel: stats[rel] for rel in todo},
            "part": next_part_number(out, manifest)}


def _my_share(images: str, todo: List[str], rank: int, world: int) -> List[str]:
    """This process's files of `todo`: every process reads the headers of every world-th file,
    then all deal out the same shares (shard.share_by_pixels)."""
    if world == 1:
        return todo
    counted = together(lambda: [pixel_count(os.path.join(images, rel))
                                for rel in todo[rank::world]])
    pixels = [0] * len(todo)
    for r, counts in enumerate(everyone(counted)):
        pixels[r::world] = counts
    return [todo[i] for i in share_by_pixels(pixels, world)[rank]]


def _finish(run: Dict, shares: List, seconds: float, images: str, out: str, prune: bool,
            log) -> Dict:
    """Rank 0, once every process has saved its parts: read them all back, commit, summarise."""
    manifest, stats, todo = run["manifest"], run["stats"], run["todo"]
    skipped = dict(run["skipped"])
    for new, _, _ in shares:
        skipped.update(new)
    sources = reusable_rows(out, manifest, stats)  # the committed index and every saved part
    _check_losses(manifest, sources, images, out, prune,
                  " (what was embedded now is saved in its parts/ for the next run)")
    deleted = [rel for rel in manifest["files"] if rel not in sources]
    if todo or deleted or run["saved_before"] or skipped != manifest["skipped"]:
        committed = manifest["embeddings"] and [(os.path.join(out, manifest["embeddings"]),
                                                  manifest["rows"])]
        had_ann = bool(committed) and ann.current(out, committed)
        manifest = commit(out, manifest, sources, stats, skipped)
        if had_ann and manifest["embeddings"]:  # the rows it covers kept their places: keep it
            ann.follow(out, os.path.join(out, manifest["embeddings"]), manifest["kept_rows"])
    embedded = sum(1 for rel in todo if rel not in skipped)
    if len(shares) > 1 and todo:
        log("shares: " + ", ".join(f"rank {r} {files} images ({tiles} tiles)"
                                   for r, (_, tiles, files) in enumerate(shares)))
    _summary(out, manifest, embedded, deleted, skipped, run["problems"], log)
    return {"embedded": embedded, "tiles": sum(tiles for _, tiles, _ in shares),
            "deleted": deleted, "rows": manifest["rows"],
            "skipped": dict({rel: e["error"] for rel, e in skipped.items()}, **run["problems"]),
            "seconds": seconds, "images_per_s": len(todo) / max(seconds, 1e-9)}


def _summary(out: str, manifest: Dict, embedded: int, deleted: List[str], skipped: Dict,
             problems: Dict[str, str], log):
    folders = [rel for rel in problems if rel.endswith("/")]
    listed = dict({rel: e["error"] for rel, e in skipped.items()}, **problems)
    files = manifest["files"].values()
    dropped = sum(e.get("dropped", 0) for e in files)
    unplaced = sum(e.get("crs") is None for e in files)
    max_nodata = manifest.get("raster", {}).get("max_nodata", 0.5)
    log(f"index {out}: {manifest['rows']} entries from {len(manifest['files'])} images "
        f"({embedded} embedded now, {len(deleted)} removed); "
        f"{len(listed) - len(folders)} unreadable file(s) skipped"
        + (f", {len(folders)} folder(s) not readable (the index keeps what it holds from them)"
           if folders else "")
        + (f"; {dropped} tile(s) more than {max_nodata:g} nodata left out" if dropped else "")
        + (f"; {unplaced} of {len(files)} file(s) without georeferencing (pixel boxes only)"
           if files else "")
        + "".join(f"\n  {rel}: {error}" for rel, error in sorted(listed.items())))
