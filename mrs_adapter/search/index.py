"""Search a folder of your own aerial images by text or by image (README 'Search your own images').

Every image (or, for large scenes, every tile) is embedded once by CLIP's image tower, with or
without a trained PETL method, exactly as eval.py embeds test images (docs/method.md §6); a
query is one text or image embedding ranked against them by cosine similarity. The index is a
folder (store.py): index.json (model, files, tile boxes; the commit point) and
embeddings-<n>.npy (float16, one row per tile, memory-mapped when queried). Runs save parts/
every N images, so a killed run continues where it stopped, and a second run embeds only new
or changed files. A large scene's tiles reach the encoder a batch at a time (memory: the
decoded image and a few batches); files and folders that cannot be read are skipped and listed,
and a run that would drop more than half of the index at once is refused without --prune.
"""
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import clip
from ..datasets import read_image, split_at_to_tensor
from ..metrics import encode_batches
from ..run.rebuild import apply_checkpoint, load_backbone, read_train_checkpoint
from ..weights.download import sha256_of
from .scan import file_stats, list_images, unseen  # noqa: F401 (list_images: as before)
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

# The retrieval sets' scenes are 256 px (RSITMD, UCM) or 224 px (RSICD), and CLIP sees 224 px:
# a 256 px tile shows a large image at the scale the model was trained on.
# Stride 192 = 25% overlap, so an object cut by one tile border lies whole in a neighbour if it
# is at most 64 px wide; images up to 1.5 tiles (384 px) stay whole (the crop keeps >= 2/3).
TILE, STRIDE, WHOLE_UP_TO = 256, 192, 1.5
SAVE_EVERY = 1000
Box = Optional[Tuple[int, int, int, int]]  # (left, top, right, bottom) in pixels; None = whole


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


def _starts(length: int, tile: int, stride: int) -> List[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # the last tile flush with the edge
    return starts


def tile_boxes(width: int, height: int, tile: int = TILE, stride: int = STRIDE) -> List[Box]:
    """[None] for an image of at most WHOLE_UP_TO tiles a side; else boxes of `tile` px every
    `stride` px, row by row, the last row and column flush with the edge: together they cover it."""
    if max(width, height) <= WHOLE_UP_TO * tile:
        return [None]
    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]


def _copy(image):
    return image.copy()  # read_image closes the file; keep the decoded pixels


def open_image(path: str):
    """The decoded PIL image, through the package's one image reader (datasets.read_image)."""
    return read_image(path, _copy)


def iter_tiles(path: str, decode, tile: int, stride: int, chunk: int):
    """(first, n, boxes, (T, C, H, W) uint8 tiles after `decode`) of one image, `chunk` tiles at a
    time, boxes [first, first + T) of its n: however large the scene, only the decoded image
    (3 bytes a pixel) and one chunk are held, never all its tiles at once."""
    pixels = read_image(path, np.asarray)  # (H, W, 3) uint8, the image closed
    boxes = tile_boxes(pixels.shape[1], pixels.shape[0], tile, stride)
    for first in range(0, len(boxes), chunk):
        tiles = [np.asarray(decode(Image.fromarray(pixels if box is None else
                                                   pixels[box[1]:box[3], box[0]:box[2]])),
                            dtype=np.uint8) for box in boxes[first:first + chunk]]  # (H, W, C)
        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()  # (T, C, H, W)
        yield first, len(boxes), boxes[first:first + chunk], x


def read_tiles(path: str, decode, tile: int, stride: int) -> Tuple[torch.Tensor, List[Box]]:
    """(T, C, H, W) uint8 tiles of one image after `decode` (resize + crop, the steps before
    ToTensor), and their boxes: all of them at once (a test and the benchmark; `index` streams)."""
    chunks = list(iter_tiles(path, decode, tile, stride, chunk=256))
    return torch.cat([x for *_, x in chunks]), [b for _, _, boxes, _ in chunks for b in boxes]


class _TileStream(IterableDataset):
    """Items (i, first, n, boxes, uint8 tiles, None) of files[i], at most `chunk` tiles each, or
    (i, 0, 0, None, None, error) for an unreadable file. With W loader processes, process w reads
    files w, w + W, ...: each holds one decoded image and its prefetched chunks."""

    def __init__(self, root: str, files: List[str], decode, tile: int, stride: int, chunk: int):
        self.root, self.files, self.decode = root, files, decode
        self.tile, self.stride, self.chunk = tile, stride, chunk

    def __iter__(self):
        worker = get_worker_info()
        mine = range(len(self.files)) if worker is None else \
            range(worker.id, len(self.files), worker.num_workers)
        for i in mine:
            path = os.path.join(self.root, self.files[i])
            try:
                for item in iter_tiles(path, self.decode, self.tile, self.stride, self.chunk):
                    yield (i, *item, None)
            except (OSError, ValueError, SyntaxError, MemoryError) as e:
                yield i, 0, 0, None, None, str(e) or type(e).__name__


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
    """One image's tile boxes and rows while its tiles are being encoded."""

    def __init__(self, n: int):
        self.boxes, self.rows, self.left = [None] * n, None, n

    def put(self, first: int, rows: np.ndarray) -> bool:
        """Store rows [first, first + k); True once every row is in."""
        if self.rows is None:
            self.rows = np.empty((len(self.boxes), rows.shape[1]), np.float16)
        self.rows[first:first + len(rows)] = rows
        self.left -= len(rows)
        return self.left == 0


def _embed(images: str, todo: List[str], stats: Dict, skipped: Dict, model, preprocess,
           part: Part, sources: Dict, tile: int, stride: int, batch_size: int, workers: int,
           save_every: int, device, log) -> Tuple[Part, int]:
    """Embed the files `todo` into parts (saved every `save_every` images); unreadable ones go
    into `skipped`. Returns the part being filled and the number of tiles embedded."""
    decode, finish = split_at_to_tensor(preprocess)  # workers decode + resize + crop; we normalise
    stream = _TileStream(images, todo, decode, tile, stride, chunk=batch_size)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)  # 0: decoded here
    encoder, scenes = _Encoder(model, finish, batch_size, device), {}  # {i: _Scene}
    done, n_tiles, since_save, start, last = 0, 0, 0, time.time(), time.time()

    def finished(encoded):  # rows back from the encoder: a scene whose rows are all in is done
        nonlocal done, n_tiles, since_save
        for i, first, rows in encoded:
            scene = scenes.get(i)  # None: a file that failed after some of its tiles were read
            if scene is not None and scene.put(first, rows):
                part.add(todo[i], stats[todo[i]], scene.boxes, scene.rows)
                del scenes[i]
                done, n_tiles, since_save = done + 1, n_tiles + len(scene.boxes), since_save + 1

    for i, first, n, boxes, tiles, error in loader:
        if error is not None:
            scenes.pop(i, None)
            skipped[todo[i]] = {"size": stats[todo[i]][0], "mtime_ns": stats[todo[i]][1],
                                "error": error}
            log(f"  skipped {todo[i]}: {error}")
            done += 1
        else:
            if i not in scenes:
                scenes[i] = _Scene(n)
            scenes[i].boxes[first:first + len(boxes)] = boxes
            finished(encoder.add(i, first, tiles))
        if since_save >= save_every:  # a killed run keeps these; the rerun continues after them
            part, since_save = part.save(sources), 0
        if time.time() - last > 2:
            _progress(done, len(todo), n_tiles, start, log)
            last = time.time()
    finished(encoder.flush())
    if todo:
        _progress(done, len(todo), n_tiles, start, log)
    return part, n_tiles


def build_index(images: str, out: str, model, preprocess, identity: Dict, tile: int = TILE,
                stride: int = STRIDE, batch_size: int = 64, workers: int = 0,
                save_every: int = SAVE_EVERY, device="cpu", log=print, prune: bool = False) -> Dict:
    """Embed every new or changed image under `images` into the index folder `out` (see the module
    docstring); returns counts, the skipped files with their errors, and images/s. `prune`
    allows a run to drop more than half of the indexed images (see _check_losses)."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    try:
        os.listdir(images)
    except OSError as e:
        raise ValueError(f"cannot list the image folder {images}: {e.strerror}") from None
    check_index_folder(out, images)
    with index_lock(out, log):
        manifest = open_index(out, images, identity, tile, stride)
        problems = {}
        stats = file_stats(images, problems)
        stats.update(unseen(manifest, problems))
        sources = reusable_rows(out, manifest, stats)  # every stored file's rows checked
        _check_losses(manifest, stats, images, out, prune)
        skipped = {rel: e for rel, e in manifest["skipped"].items()
                   if stats.get(rel) == [e["size"], e["mtime_ns"]]}  # unreadable, unchanged since
        todo = [rel for rel in stats if rel not in sources and rel not in skipped]
        saved_before = bool(part_numbers(out))  # an interrupted run's parts: commit even if no news
        log(f"indexing {len(todo)} new or changed of {len(stats)} images under {images} "
            f"({len(sources)} already embedded, {len(skipped)} known unreadable)")
        start = time.time()
        part, n_tiles = _embed(images, todo, stats, skipped, model, preprocess,
                               Part(out, next_part_number(out, manifest)), sources, tile, stride,
                               batch_size, workers, save_every, device, log)
        part.save(sources)
        seconds = time.time() - start
        _check_losses(manifest, sources, images, out, prune,
                      " (what was embedded now is saved in its parts/ for the next run)")
        deleted = [rel for rel in manifest["files"] if rel not in sources]
        if todo or deleted or saved_before or skipped != manifest["skipped"]:
            manifest = commit(out, manifest, sources, stats, skipped)
    embedded = sum(1 for rel in todo if rel not in skipped)
    _summary(out, manifest, embedded, deleted, skipped, problems, log)
    return {"embedded": embedded, "tiles": n_tiles, "deleted": deleted, "rows": manifest["rows"],
            "skipped": dict({rel: e["error"] for rel, e in skipped.items()}, **problems),
            "seconds": seconds, "images_per_s": len(todo) / max(seconds, 1e-9)}


def _summary(out: str, manifest: Dict, embedded: int, deleted: List[str], skipped: Dict,
             problems: Dict[str, str], log):
    folders = [rel for rel in problems if rel.endswith("/")]
    listed = dict({rel: e["error"] for rel, e in skipped.items()}, **problems)
    log(f"index {out}: {manifest['rows']} entries from {len(manifest['files'])} images "
        f"({embedded} embedded now, {len(deleted)} removed); "
        f"{len(listed) - len(folders)} unreadable file(s) skipped"
        + (f", {len(folders)} folder(s) not readable (the index keeps what it holds from them)"
           if folders else "")
        + "".join(f"\n  {rel}: {error}" for rel, error in sorted(listed.items())))
