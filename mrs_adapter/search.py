"""Search a folder of your own aerial images by text or by image (README 'Search your own images').

Every image (or, for large scenes, every tile) is embedded once by CLIP's image tower, with or
without a trained PETL method, exactly as eval.py embeds test images (method.md 6); a query is
one text or image embedding ranked against them by cosine similarity. The index is a folder:
index.json (model, files, tile boxes; the commit point) and embeddings-<n>.npy (float16, one
row per tile, memory-mapped when queried). Runs save parts/ every N images, so a killed run
continues where it stopped, and a second run embeds only new or changed files.
"""
import glob
import json
import os
import time
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import clip
from .adapter import load_trainable_state_dict, read_checkpoint
from .data import read_image, split_at_to_tensor
from .download import sha256_of
from .methods import apply_method
from .runfiles import atomic_write, write_json
from .tokenizer import tokenize

EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
# The retrieval sets' scenes are 256 px (RSITMD, UCM) or 224 px (RSICD), and CLIP sees 224 px:
# a 256 px tile shows a large image at the scale the model was trained on.
# Stride 192 = 25% overlap, so an object cut by one tile border lies whole in a neighbour if it
# is at most 64 px wide; images up to 1.5 tiles (384 px) stay whole (the crop keeps >= 2/3).
TILE, STRIDE, WHOLE_UP_TO = 256, 192, 1.5
SAVE_EVERY = 1000
SAME_MODEL = ("backbone_sha256", "activation", "method", "checkpoint_sha256")
WRITTEN_BY = "mrs-adapter search"
Box = Optional[Tuple[int, int, int, int]]  # (left, top, right, bottom) in pixels; None = whole


def load_model(checkpoint: Optional[str] = None, clip_name: Optional[str] = None, device="cpu"):
    """(model in eval mode, preprocess, identity): a train.py checkpoint rebuilt as eval.py does
    (its backbone, or `clip_name`), or plain CLIP `clip_name` (zero-shot)."""
    ckpt = read_checkpoint(checkpoint) if checkpoint else {}
    config = (ckpt.get("config") if isinstance(ckpt, dict) else None) or {}
    if checkpoint and ("trainable" not in ckpt or "method" not in config):
        raise ValueError(f"{checkpoint} is not a train.py checkpoint (expected 'trainable' and "
                         f"config['method'])")
    clip_name = clip_name or config.get("clip") or "ViT-B/32"
    model, preprocess = clip.load(clip_name, "cpu")
    is_file = clip_name not in clip.available_models()
    path = os.path.abspath(os.path.expanduser(clip_name))
    identity = {"backbone": path if is_file else clip_name,
                "backbone_sha256": sha256_of(path) if is_file else clip._MODELS[clip_name][0],
                "activation": getattr(model, "activation", "quickgelu"),
                "method": config.get("method", "zero_shot"),
                "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
                "checkpoint_sha256": sha256_of(checkpoint) if checkpoint else None}
    if checkpoint:
        options = config.get("method_options") or {}
        model = apply_method(model, config["method"], options, verbose=False)
        load_trainable_state_dict(model, ckpt["trainable"])
    return model.to(device).eval(), preprocess, identity


def check_same_model(recorded: Dict, identity: Dict, where: str):
    differ = [k for k in SAME_MODEL if recorded.get(k) != identity.get(k)]
    if differ:
        was = ", ".join(f"{k}: {recorded.get(k)}" for k in differ)
        now = ", ".join(f"{k}: {identity.get(k)}" for k in differ)
        raise ValueError(f"{where} was built with another model ({was}); this run uses {now}. "
                         f"Use that model, or another index folder")


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
    """The decoded PIL image, through the package's one image reader (data.read_image)."""
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


@torch.no_grad()
def encode_images(model, x: torch.Tensor, device) -> np.ndarray:
    """L2-normalised image embeddings, float32 (N, E), as metrics.encode_dataset computes them."""
    device = torch.device(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return F.normalize(model.encode_image(x.to(device)).float(), dim=-1).cpu().numpy()


# ---- the index folder ------------------------------------------------------------------------

def read_manifest(folder: str) -> Optional[Dict]:
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("written_by") != WRITTEN_BY:
        raise ValueError(f"{path} is not a search index written by search.py")
    return manifest


def _write_npy(path: str, chunks, n_rows: int, dim: int):
    """Stream float16 row chunks into a .npy file, atomically."""
    def write(f):
        header = {"descr": "<f2", "fortran_order": False, "shape": (n_rows, dim)}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype="<f2").tobytes())
    atomic_write(path, write, mode="wb")


def _parts(folder: str, after: int) -> List[Tuple[int, Dict]]:
    """Saved parts of unfinished runs numbered >= after: [(number, its json)]; each part's json
    is written after its .npy, so a part without json is incomplete and ignored."""
    parts = []
    for path in sorted(glob.glob(os.path.join(folder, "parts", "part-*.json"))):
        number = int(os.path.basename(path)[5:-5])
        if number >= after:
            with open(path) as f:
                parts.append((number, json.load(f)))
    return parts


def _part_path(folder: str, number: int, ext: str) -> str:
    return os.path.join(folder, "parts", f"part-{number:06d}.{ext}")


def _open_index(out: str, images: str, identity: Dict, tile: int, stride: int) -> Dict:
    """The index's manifest, created (with its model) before anything is embedded; refuses a
    folder built from another model, image folder or tiling."""
    manifest = read_manifest(out)
    if manifest is None:
        manifest = {"written_by": WRITTEN_BY, "model": identity, "images": os.path.abspath(images),
                    "tile": tile, "stride": stride, "dim": None, "rows": 0, "embeddings": None,
                    "generation": 0, "next_part": 0, "files": {}, "skipped": {}}
        write_json(os.path.join(out, "index.json"), manifest)
        return manifest
    check_same_model(manifest["model"], identity, f"index {out}")
    for key, value in (("images", os.path.abspath(images)), ("tile", tile), ("stride", stride)):
        if manifest[key] != value:
            raise ValueError(f"index {out} was built with {key} {manifest[key]}, not {value}; "
                             f"use the same {key}, or another --out")
    return manifest


def _reusable(out: str, manifest: Dict, stats: Dict) -> Dict[str, Tuple[str, int, list]]:
    """Files already embedded whose size and mtime are unchanged: path -> (npy file, first row,
    boxes); from the committed index, then from the parts of an interrupted run (newer wins)."""
    sources = {}
    stored = [(os.path.join(out, manifest["embeddings"] or ""), manifest["files"])]
    stored += [(_part_path(out, n, "npy"), part["files"])
               for n, part in _parts(out, manifest["next_part"])]
    for npy, files in stored:
        for rel, e in files.items():
            if stats.get(rel) == [e["size"], e["mtime_ns"]]:
                sources[rel] = (npy, e["first"], e["boxes"])
    return sources


class _Part:
    """Rows embedded since the last save; `save` writes them as parts/part-<n>.npy + .json."""

    def __init__(self, out: str, number: int):
        self.out, self.number, self.rows, self.files = out, number, [], {}

    def add(self, rel: str, stat: list, boxes: List[Box], rows: np.ndarray):
        first = sum(len(r) for r in self.rows)
        self.files[rel] = {"size": stat[0], "mtime_ns": stat[1], "first": first,
                           "boxes": [None if b is None else list(b) for b in boxes]}
        self.rows.append(rows)

    def save(self, sources: Dict) -> "_Part":
        if self.files:
            rows = np.concatenate(self.rows)
            npy = _part_path(self.out, self.number, "npy")
            _write_npy(npy, [rows], len(rows), rows.shape[1])
            write_json(_part_path(self.out, self.number, "json"),  # last: marks the part complete
                       {"files": self.files, "rows": len(rows)})
            sources.update({rel: (npy, e["first"], e["boxes"]) for rel, e in self.files.items()})
        return _Part(self.out, self.number + 1) if self.files else self


def _embed_pending(model, finish, pending: List, part: _Part, batch_size: int, device):
    """Encode the tiles of `pending` [(rel, stat, boxes, uint8 tiles)] in batches into `part`."""
    if not pending:
        return
    x = finish(torch.cat([t for _, _, _, t in pending]).to(torch.get_default_dtype()).div(255))
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


def build_index(images: str, out: str, model, preprocess, identity: Dict, tile: int = TILE,
                stride: int = STRIDE, batch_size: int = 64, workers: int = 0,
                save_every: int = SAVE_EVERY, device="cpu", log=print) -> Dict:
    """Embed every new or changed image under `images` into the index folder `out` (see the module
    docstring); returns counts, the skipped files with their errors, and images/s."""
    if not os.path.isdir(images):
        raise FileNotFoundError(f"image folder not found: {images}")
    manifest = _open_index(out, images, identity, tile, stride)
    stats = {}
    for rel in list_images(images):
        st = os.stat(os.path.join(images, rel))
        stats[rel] = [st.st_size, st.st_mtime_ns]
    sources = _reusable(out, manifest, stats)
    skipped = {rel: e for rel, e in manifest["skipped"].items()
               if stats.get(rel) == [e["size"], e["mtime_ns"]]}  # unreadable, unchanged since
    todo = [rel for rel in stats if rel not in sources and rel not in skipped]
    numbers = [n for n, _ in _parts(out, 0)]
    part = _Part(out, max(numbers + [manifest["next_part"] - 1]) + 1)
    decode, finish = split_at_to_tensor(preprocess)  # workers decode + resize + crop; we normalise
    loader = DataLoader(_Tiles(images, todo, decode, tile, stride), batch_size=None,
                        num_workers=workers)  # workers decode the next images while we encode
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
    if todo or deleted or numbers or skipped != manifest["skipped"]:
        manifest = _commit(out, manifest, sources, stats, skipped)
    embedded = sum(1 for rel in todo if rel not in skipped)
    log(f"index {out}: {manifest['rows']} entries from {len(manifest['files'])} images "
        f"({embedded} embedded now, {len(deleted)} removed); {len(skipped)} unreadable file(s) "
        f"skipped" + "".join(f"\n  {rel}: {e['error']}" for rel, e in skipped.items()))
    return {"embedded": embedded, "tiles": n_tiles, "deleted": deleted, "rows": manifest["rows"],
            "skipped": {rel: e["error"] for rel, e in skipped.items()}, "seconds": seconds,
            "images_per_s": len(todo) / max(seconds, 1e-9)}


def _commit(out: str, manifest: Dict, sources: Dict, stats: Dict, skipped: Dict) -> Dict:
    """Write all rows, sorted by path, to a new embeddings-<n>.npy, then index.json naming it (the
    commit point: a crash before it leaves the previous index), then remove what it replaced."""
    order = sorted(sources)
    files, first = {}, 0
    for rel in order:
        boxes = sources[rel][2]
        files[rel] = {"size": stats[rel][0], "mtime_ns": stats[rel][1], "first": first,
                      "boxes": boxes}
        first += len(boxes)
    maps = {npy: np.load(npy, mmap_mode="r") for npy in {sources[rel][0] for rel in order}}
    dim = manifest["dim"] or (next(iter(maps.values())).shape[1] if maps else None)
    generation = manifest["generation"] + 1
    name = f"embeddings-{generation:06d}.npy" if dim else None
    if name:
        chunks = (maps[npy][start:start + len(boxes)]
                  for npy, start, boxes in (sources[rel] for rel in order))
        _write_npy(os.path.join(out, name), chunks, first, dim)
    numbers = [n for n, _ in _parts(out, 0)]
    manifest = dict(manifest, dim=dim, rows=first, embeddings=name, generation=generation,
                    files=files, skipped=skipped,
                    next_part=max(numbers + [manifest["next_part"] - 1]) + 1)
    write_json(os.path.join(out, "index.json"), manifest)
    del maps
    replaced = glob.glob(os.path.join(out, "embeddings-*.npy"))
    for path in replaced + glob.glob(os.path.join(out, "parts", "*")):
        if os.path.basename(path) != name:
            os.remove(path)
    return manifest


# ---- queries ---------------------------------------------------------------------------------

def top_k(embeddings: np.ndarray, query: np.ndarray, k: int,
          block: int = 1 << 18) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the k rows of `embeddings` (N, E) float16, memory-mapped, with the highest
    dot product with `query` (E,), best first; ties by row.

    Block by block, never a full copy: fp16 x fp16 products (fp32 accumulation, fp16 result) pick
    every row within SLACK of the block's k-th score, and only those are re-scored in fp32. A true
    top-k row is never missed: an fp16 score is within 2^-12 of the fp32 one for |score| <= 1.
    Extra memory: one block of fp16 scores (block * 2 bytes) and the candidates."""
    slack = 1e-3
    q32 = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    q16 = q32.half()
    best_rows, best_scores = np.empty(0, np.int64), np.empty(0, np.float32)
    with warnings.catch_warnings():  # a read-only memmap as a tensor: we never write to it
        warnings.simplefilter("ignore", UserWarning)
        for start in range(0, len(embeddings), block):
            rows = torch.from_numpy(embeddings[start:start + block])
            approx = (rows @ q16).float()  # (block,)
            kth = approx.topk(min(k, len(approx))).values[-1]
            keep = torch.nonzero(approx >= kth - slack).flatten().numpy() + start
            exact = torch.from_numpy(np.asarray(embeddings[keep], dtype=np.float32)) @ q32
            best_rows = np.concatenate([best_rows, keep])
            best_scores = np.concatenate([best_scores, exact.numpy()])
            order = np.lexsort((best_rows, -best_scores))[:k]
            best_rows, best_scores = best_rows[order], best_scores[order]
    return best_rows, best_scores


class SearchIndex:
    """An index folder opened for queries: embeddings memory-mapped, rows mapped to (path, box)."""

    def __init__(self, folder: str):
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"no search index in {folder} (expected {folder}/index.json; "
                                    f"make one with `python search.py index`)")
        if not manifest["rows"]:
            raise ValueError(f"index {folder} holds no images")
        self.folder, self.manifest = folder, manifest
        self.embeddings = np.load(os.path.join(folder, manifest["embeddings"]), mmap_mode="r")
        self.paths = sorted(manifest["files"], key=lambda r: manifest["files"][r]["first"])
        self.firsts = np.array([manifest["files"][r]["first"] for r in self.paths])

    def entry(self, row: int) -> Tuple[str, Optional[List[int]]]:
        """(image path, box or None) of embedding row `row`."""
        j = int(np.searchsorted(self.firsts, row, side="right")) - 1
        rel = self.paths[j]
        box = self.manifest["files"][rel]["boxes"][row - self.firsts[j]]
        return os.path.join(self.manifest["images"], rel), box

    def search(self, query: np.ndarray, k: int = 20) -> List[Dict]:
        rows, scores = top_k(self.embeddings, query, k)
        return [dict(rank=r + 1, score=float(s), **dict(zip(("path", "box"), self.entry(row))))
                for r, (row, s) in enumerate(zip(rows, scores))]


@torch.no_grad()
def embed_query(model, preprocess, device, text: Optional[str] = None,
                image: Optional[str] = None) -> np.ndarray:
    """(E,) float32 L2-normalised embedding of a text or of a whole image (no tiling)."""
    if text is not None:
        tokens = tokenize([text], model.context_length).to(device)
        return F.normalize(model.encode_text(tokens).float(), dim=-1)[0].cpu().numpy()
    x = read_image(image, preprocess)[None]
    return encode_images(model, x, device)[0]


def export(folder: str, out: str) -> Tuple[str, str]:
    """Copy the embeddings to `out` (float16 .npy) and write `<out>.manifest.json` beside it:
    the model and one {"path", "box"} per row, in row order."""
    index = SearchIndex(folder)
    emb = index.embeddings
    _write_npy(out, (emb[i:i + 65536] for i in range(0, len(emb), 65536)), len(emb), emb.shape[1])
    entries = [dict(zip(("path", "box"), index.entry(row))) for row in range(len(emb))]
    manifest_path = os.path.splitext(out)[0] + ".manifest.json"
    write_json(manifest_path, {"model": index.manifest["model"], "entries": entries})
    return out, manifest_path
