"""Search a folder of your own aerial images by text or by image (README 'Search your own images').

Every image (or, for large scenes, every tile) is embedded once by CLIP's image tower, with or
without a trained PETL method, exactly as eval.py embeds test images (docs/method.md §6); a
query is one text or image embedding ranked against them by cosine similarity. The index is a
folder (store.py): index.json (model, files, tile boxes; the commit point) and
embeddings-<n>.npy (float16, one row per tile, memory-mapped when queried). Runs save parts/
every N images, so a killed run continues where it stopped, and a second run embeds only new
or changed files.
"""
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .. import clip
from ..datasets import read_image, split_at_to_tensor
from ..metrics import encode_batches
from ..run.rebuild import apply_checkpoint, load_backbone, read_train_checkpoint
from ..weights.download import sha256_of
from .store import Part, commit, next_part_number, open_index, part_numbers, reusable_rows

EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
# The retrieval sets' scenes are 256 px (RSITMD, UCM) or 224 px (RSICD), and CLIP sees 224 px:
# a 256 px tile shows a large image at the scale the model was trained on.
# Stride 192 = 25% overlap, so an object cut by one tile border lies whole in a neighbour if it
# is at most 64 px wide; images up to 1.5 tiles (384 px) stay whole (the crop keeps >= 2/3).
TILE, STRIDE, WHOLE_UP_TO = 256, 192, 1.5
SAVE_EVERY = 1000
Box = Optional[Tuple[int, int, int, int]]  # (left, top, right, bottom) in pixels; None = whole


def load_model(checkpoint: Optional[str] = None, clip_name: Optional[str] = None, device="cpu"):
    """(model in eval mode, preprocess, identity): a train.py checkpoint rebuilt as eval.py does
    (its recorded backbone, or `clip_name` where the weights moved), or plain CLIP `clip_name`."""
    ckpt, config = read_train_checkpoint(checkpoint) if checkpoint else ({}, {})
    if checkpoint:
        model, preprocess = load_backbone(config, clip_name, where=checkpoint)
        backbone = model.backbone  # read before a method's head may wrap the CLIP
        model = apply_checkpoint(model, ckpt)
    else:
        model, preprocess = clip.load(clip_name or "ViT-B/32", "cpu")
        backbone = model.backbone
    named = backbone["clip"] in clip.available_models()
    identity = {"backbone": backbone["clip"] if named else backbone["path"],
                "backbone_sha256": backbone["sha256"],
                "activation": backbone["activation"],
                "method": config.get("method", "zero_shot"),
                "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
                "checkpoint_sha256": sha256_of(checkpoint) if checkpoint else None}
    return model.to(device).eval(), preprocess, identity



def list_images(root: str) -> List[str]:
    """Image files under `root`, recursively, as sorted '/'-separated paths relative to it."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            if name.lower().endswith(EXTENSIONS):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


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


def read_tiles(path: str, decode, tile: int, stride: int) -> Tuple[torch.Tensor, List[Box]]:
    """(T, C, H, W) uint8 tiles of one image after `decode` (resize + crop, the steps before
    ToTensor), and their boxes."""
    image = open_image(path)
    boxes = tile_boxes(*image.size, tile, stride)
    tiles = [np.asarray(decode(image if box is None else image.crop(box)), dtype=np.uint8)
             for box in boxes]  # (H, W, C) each
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous(), boxes


class _Tiles(Dataset):
    """Item i: (i, uint8 tiles, boxes, None), or (i, None, None, error) for an unreadable file."""

    def __init__(self, root: str, files: List[str], decode, tile: int, stride: int):
        self.root, self.files, self.decode = root, files, decode
        self.tile, self.stride = tile, stride

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            path = os.path.join(self.root, self.files[i])
            tiles, boxes = read_tiles(path, self.decode, self.tile, self.stride)
            return i, tiles, boxes, None
        except (OSError, ValueError, SyntaxError) as e:
            return i, None, None, str(e)


def encode_images(model, x: torch.Tensor, device) -> np.ndarray:
    """L2-normalised image embeddings, float32 (N, E), as eval.py computes them (bf16 on CUDA)."""
    device = torch.device(device)
    return encode_batches(model.encode_image, [x], device, torch.bfloat16).cpu().numpy()


def _embed_pending(model, finish, pending: List, part: Part, batch_size: int, device):
    """Encode the tiles of `pending` [(rel, stat, boxes, uint8 tiles)] in batches into `part`."""
    if not pending:
        return
    x = finish(torch.cat([t for _, _, _, t in pending]))
    rows = np.concatenate([encode_images(model, x[i:i + batch_size], device).astype(np.float16)
                           for i in range(0, len(x), batch_size)])
    first = 0
    for rel, stat, boxes, _ in pending:
        part.add(rel, stat, boxes, rows[first:first + len(boxes)])
        first += len(boxes)
    pending.clear()


def _progress(done: int, total: int, tiles: int, start: float, log):
    rate = done / max(time.time() - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    log(f"  {done}/{total} images, {tiles} tiles, {rate:.1f} images/s, ETA {eta:.0f}s")


def file_stats(images: str) -> Dict[str, List[int]]:
    """[size, mtime_ns] of every image under `images`: a file whose pair is unchanged since it
    was embedded is not read again."""
    stats = {}
    for rel in list_images(images):
        st = os.stat(os.path.join(images, rel))
        stats[rel] = [st.st_size, st.st_mtime_ns]
    return stats


def build_index(images: str, out: str, model, preprocess, identity: Dict, tile: int = TILE,
                stride: int = STRIDE, batch_size: int = 64, workers: int = 0,
                save_every: int = SAVE_EVERY, device="cpu", log=print) -> Dict:
    """Embed every new or changed image under `images` into the index folder `out` (see the module
    docstring); returns counts, the skipped files with their errors, and images/s."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    manifest = open_index(out, images, identity, tile, stride)
    stats = file_stats(images)
    sources = reusable_rows(out, manifest, stats)
    skipped = {rel: e for rel, e in manifest["skipped"].items()
               if stats.get(rel) == [e["size"], e["mtime_ns"]]}  # unreadable, unchanged since
    todo = [rel for rel in stats if rel not in sources and rel not in skipped]
    saved_before = bool(part_numbers(out))  # parts of an interrupted run: commit even if no news
    part = Part(out, next_part_number(out, manifest))
    decode, finish = split_at_to_tensor(preprocess)  # workers decode + resize + crop; we normalise
    loader = DataLoader(_Tiles(images, todo, decode, tile, stride), batch_size=None,
                        num_workers=workers)  # > 0: processes decode ahead; 0: decoded here
    log(f"indexing {len(todo)} new or changed of {len(stats)} images under {images} "
        f"({len(sources)} already embedded, {len(skipped)} known unreadable)")
    pending, n_tiles, since_save, start, last = [], 0, 0, time.time(), time.time()
    for done, (i, tiles, boxes, error) in enumerate(loader, 1):
        if error is not None:
            size, mtime_ns = stats[todo[i]]
            skipped[todo[i]] = {"size": size, "mtime_ns": mtime_ns, "error": error}
            log(f"  skipped {todo[i]}: {error}")
        else:
            pending.append((todo[i], stats[todo[i]], boxes, tiles))
            n_tiles, since_save = n_tiles + len(boxes), since_save + 1
        if sum(len(p[2]) for p in pending) >= batch_size or since_save >= save_every:
            _embed_pending(model, finish, pending, part, batch_size, device)
        if since_save >= save_every:  # a killed run keeps these; the rerun continues after them
            part, since_save = part.save(sources), 0
        if time.time() - last > 2 or done == len(todo):
            _progress(done, len(todo), n_tiles, start, log)
            last = time.time()
    _embed_pending(model, finish, pending, part, batch_size, device)
    part.save(sources)
    seconds = time.time() - start
    deleted = [rel for rel in manifest["files"] if rel not in stats]
    if todo or deleted or saved_before or skipped != manifest["skipped"]:
        manifest = commit(out, manifest, sources, stats, skipped)
    embedded = sum(1 for rel in todo if rel not in skipped)
    log(f"index {out}: {manifest['rows']} entries from {len(manifest['files'])} images "
        f"({embedded} embedded now, {len(deleted)} removed); {len(skipped)} unreadable file(s) "
        f"skipped" + "".join(f"\n  {rel}: {e['error']}" for rel, e in skipped.items()))
    return {"embedded": embedded, "tiles": n_tiles, "deleted": deleted, "rows": manifest["rows"],
            "skipped": {rel: e["error"] for rel, e in skipped.items()}, "seconds": seconds,
            "images_per_s": len(todo) / max(seconds, 1e-9)}
