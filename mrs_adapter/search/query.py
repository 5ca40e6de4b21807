"""Querying a search index: the top-k rows of a memory-mapped embedding matrix, a text or image
embedded as a query, and the export of the embeddings with one entry per row.
"""
import json
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import has_mark, write_json
from ..datasets import read_image
from ..tokenizer import tokenize
from . import ann
from .hits import within_mask
from .index import encode_images
from .outputs import written_by_us
from .pages import take
from .readers import choose_reader
from .store import open_columns, open_rows, read_manifest, read_rasters, write_npy
from .tile_store import NO_BOX, box_of, place_of
from .tiling import RasterOptions, picture

HIT = ("rank", "score", "path", "box")  # one hit of a query, as --json writes it
EXPORT_WRITTEN_BY = "mrs-adapter search.py export"


def top_k(embeddings: np.ndarray, query: np.ndarray, k: int, block: int = 1 << 18,
          keep: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the k rows of `embeddings` (N, E) float16, memory-mapped, with the highest
    dot product with `query` (E,), best first; ties by row. keep: (N,) bool, the rows that may be
    returned (--within); None: all.

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
            if keep is not None:
                approx[torch.from_numpy(~keep[start:start + block])] = -float("inf")
            kth = approx.topk(min(k, len(approx))).values[-1]
            near = torch.nonzero(approx >= max(kth - slack, -2)).flatten().numpy() + start
            exact = ann.float32(embeddings[near]) @ q32
            best_rows = np.concatenate([best_rows, near])
            best_scores = np.concatenate([best_scores, exact.numpy()])
            order = np.lexsort((best_rows, -best_scores))[:k]
            best_rows, best_scores = best_rows[order], best_scores[order]
    return best_rows, best_scores


def at_least(embeddings: np.ndarray, query: np.ndarray, min_score: float, block: int = 1 << 18,
             keep: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of every row whose exact fp32 score is >= min_score (--min-score), best
    first, ties by row; as top_k, fp16 scores pick the candidates within SLACK, fp32 decides."""
    slack = 1e-3
    q32 = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    found_rows, found_scores = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for start in range(0, len(embeddings), block):
            approx = (torch.from_numpy(embeddings[start:start + block]) @ q32.half()).float()
            near = approx >= min_score - slack
            if keep is not None:
                near &= torch.from_numpy(keep[start:start + block])
            near = torch.nonzero(near).flatten().numpy() + start
            exact = (ann.float32(embeddings[near]) @ q32).numpy()
            found_rows.append(near[exact >= min_score])
            found_scores.append(exact[exact >= min_score])
    rows, scores = np.concatenate(found_rows), np.concatenate(found_scores)
    order = np.lexsort((rows, -scores))
    return rows[order], scores[order]


class SearchIndex:
    """An index folder opened for queries: embeddings and the tiles' columns memory-mapped, rows
    mapped to their file (index.json's per-file records), box and place (crs, bounds, WGS84
    footprint). A query reads index.json and, of the columns, its hits' rows only."""

    def __init__(self, folder: str):
        for attempt in range(2):
            manifest = read_manifest(folder)
            if manifest is None:
                raise FileNotFoundError(f"no search index in {folder} (expected "
                                        f"{folder}/index.json; make one with `python search.py "
                                        f"index`)")
            if not manifest["rows"]:
                raise ValueError(f"index {folder} holds no images")
            npy, listed_in = (os.path.join(folder, manifest["embeddings"]),
                              os.path.join(folder, "index.json"))
            try:
                self.embeddings = open_rows(npy, manifest["rows"], manifest["dim"], listed_in)
                self.columns = open_columns(npy, manifest["rows"], manifest["columns"],
                                            listed_in)
                break
            except FileNotFoundError:  # an index run may have committed a newer one just now
                if attempt:
                    raise
        self.folder, self.manifest, self.how, self._rasters = folder, manifest, "", None
        rels, files = list(manifest["files"]), manifest["files"].values()
        held = np.flatnonzero([e["tiles"] > 0 for e in files])  # the files with rows
        firsts = np.array([e["first"] for e in files], np.int64)[held]
        order = np.argsort(firsts, kind="stable")
        self.paths, self.firsts = [rels[i] for i in held[order]], firsts[order]

    def _locate(self, row: int) -> Tuple[str, Dict]:
        rel = self.paths[int(np.searchsorted(self.firsts, row, side="right")) - 1]
        return rel, self.manifest["files"][rel]

    def entry(self, row: int) -> Tuple[str, Optional[List[int]]]:
        """(image path, box or None) of embedding row `row`."""
        rel, _ = self._locate(row)
        return os.path.join(self.manifest["images"], rel), box_of(self.columns["box"][row])

    def hit(self, row: int, rank: int, score: float) -> Dict:
        """The hit of `row` (hits.HIT_KEYS): rank, score, path, box, crs, bounds, footprint."""
        return self.hits([row], [score], rank)[0]

    def hits(self, rows, scores, first_rank: int = 1) -> List[Dict]:
        """The hits of `rows` (with their `scores`), ranked from `first_rank`: each column read
        once for all of them, its pages asked of the kernel together (pages.take)."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        records = {}
        for name, column in self.columns.items():
            records[name] = np.empty((len(rows), *column.shape[1:]), column.dtype)
            records[name][order] = take(column, rows[order])
        found = []
        for i, (row, score) in enumerate(zip(rows, scores)):
            rel, e = self._locate(row)
            bounds, footprint = place_of(records, i)
            found.append({"rank": first_rank + i, "score": float(score),
                          "path": os.path.join(self.manifest["images"], rel),
                          "box": box_of(records["box"][i]),
                          "crs": e.get("crs") if footprint is not None else None,
                          "bounds": bounds, "footprint": footprint})
        return found

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """(n, E) float16 embeddings of `rows` (ascending), their pages asked for together
        (pages.take)."""
        return take(self.embeddings, rows)

    def raster_record(self, rel: str) -> Optional[Dict]:
        """How the GeoTIFF `rel` was read (raster.Scene.record()), or None (a plain image); the
        records are read on the first call (tile_store.records_path)."""
        if self._rasters is None:
            self._rasters = read_rasters(self.folder, self.manifest)
        return self._rasters.get(rel)

    def boxes(self, rel: str) -> List[Optional[List[int]]]:
        """The boxes of the tiles of file `rel` (relative to the image folder), in row order."""
        e = self.manifest["files"][rel]
        return [box_of(b) for b in self.columns["box"][e["first"]:e["first"] + e["tiles"]]]

    def footprint_mask(self, box, block: int = 1 << 16) -> np.ndarray:
        """(rows,) bool: the rows whose footprint meets the lon/lat box (--within); the footprint
        column is read a block of rows at a time."""
        keep = np.zeros(len(self.embeddings), bool)
        rings = self.columns.get("footprint")
        for start in range(0, len(keep) if rings is not None else 0, block):
            chunk = np.asarray(rings[start:start + block])
            placed = ~np.isnan(chunk[:, 0, 0])
            if placed.any():
                keep[start:start + block][placed] = within_mask(chunk[placed], box)
        return keep

    def row_of(self, path: str, box) -> Optional[int]:
        """The row of the tile `box` of image `path` (as a hit names it), or None."""
        root = self.manifest["images"]
        rel = os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
        e = self.manifest["files"].get(rel)
        if e is None or not e["tiles"]:
            return None
        boxes = self.columns["box"][e["first"]:e["first"] + e["tiles"]]
        wanted = np.full(4, NO_BOX) if box is None else np.asarray(box)
        found = np.flatnonzero((boxes == wanted).all(1))
        return int(e["first"] + found[0]) if len(found) else None

    def parts(self) -> List[Tuple[str, int]]:
        """[(embeddings .npy, rows)]: what an ANN index (ann.py) covers and is checked against."""
        return [(os.path.join(self.folder, self.manifest["embeddings"]), self.manifest["rows"])]

    def search(self, query: np.ndarray, k: int = 20, min_score: Optional[float] = None,
               within=None, exact: bool = False) -> List[Dict]:
        """The hits of `query` (E,): the top k, or every row scoring >= min_score; only rows
        whose footprint meets the lon/lat box `within` (west, south, east, north) when given.

        A top k without `within` goes through the folder's ANN index (ann.py) when there is one
        and it is current, its candidates re-scored exactly; otherwise, or with `exact`, every
        row is scored. self.how says which, and why (empty: exact, with nothing to say)."""
        keep = None if within is None else self.footprint_mask(within)
        if keep is not None and not keep.any():
            return []
        if min_score is not None:
            rows, scores = at_least(self.embeddings, query, min_score, keep=keep)
        else:
            index = None if exact or keep is not None else self._ann()
            if index is None:
                rows, scores = top_k(self.embeddings, query, k, keep=keep)
            else:
                rows, scores = ann.search(index, self.rows, query, k)
        return self.hits(rows, scores)

    def _ann(self):
        """The current ANN index, or None; sets self.how (a missing ANN is mentioned only where
        one would pay: from ann.HNSW_MAX_ROWS rows)."""
        index, why = ann.open_ann(self.folder, self.parts())
        if index is not None:
            self.how = (f"ANN ({index.info['kind']}, built for {index.rows:,} rows): "
                        f"its candidates re-scored exactly" + (f"; {why}" if why else ""))
        elif os.path.exists(os.path.join(self.folder, ann.ANN_JSON)) or \
                self.manifest["rows"] >= ann.HNSW_MAX_ROWS:
            self.how = f"exact search of all {self.manifest['rows']:,} rows: {why}"
        return index


def is_hits_file(path: str) -> bool:
    """Whether `path` holds hits `search.py query` wrote: a --json or --geojson file carrying
    outputs.WRITTEN_BY, or the bare list [{rank, score, path, box}, ...] --json wrote before."""
    if written_by_us(path):
        return True
    try:
        with open(path, encoding="utf-8") as f:
            hits = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(hits, list) and bool(hits) and all(
        isinstance(h, dict) and sorted(h) == sorted(HIT) for h in hits)


@torch.no_grad()
def embed_text(model, device, text: str) -> np.ndarray:
    """(E,) float32 L2-normalised embedding of a text."""
    if not text.strip():
        raise ValueError("the query text is empty; give a text, or --image PATH")
    tokens = tokenize([text], model.context_length).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)[0].cpu().numpy()


def embed_image(model, preprocess, device, path: str,
                options: RasterOptions = RasterOptions()) -> np.ndarray:
    """(E,) float32 L2-normalised embedding of a whole image (no tiling), read as the index reads
    it: a GeoTIFF through rasterio with the index's `options` (its overview, at most 1024 px)."""
    if choose_reader(path) == "pillow":
        x = read_image(path, preprocess)  # as before: the decoded image, resized once
    else:
        x = preprocess(picture(path, None, None, max_side=1024, options=options)[0])
    return encode_images(model, x[None], device)[0]


def embed_query(model, preprocess, device, text: Optional[str] = None,
                image: Optional[str] = None) -> np.ndarray:
    """(E,) float32 L2-normalised embedding of a text or of a whole image (no tiling)."""
    if text is not None:
        return embed_text(model, device, text)
    return embed_image(model, preprocess, device, image)


def manifest_path(npy: str) -> str:
    return os.path.splitext(npy)[0] + ".manifest.json"


def is_export_manifest(path: str) -> bool:
    """Whether `path` is a manifest `export` wrote (marked; before the mark: {model, entries})."""
    if has_mark(path, EXPORT_WRITTEN_BY):
        return True
    try:
        with open(path, encoding="utf-8") as f:
            return sorted(json.load(f)) == ["entries", "model"]
    except (OSError, ValueError, TypeError):
        return False


def is_export(npy: str) -> bool:
    """Whether `npy` is embeddings `export` wrote: its manifest beside it is export's and names it
    (an unmarked one, before the mark, names no file)."""
    manifest = manifest_path(npy)
    if not is_export_manifest(manifest):
        return False
    with open(manifest, encoding="utf-8") as f:
        return json.load(f).get("embeddings", os.path.basename(npy)) == os.path.basename(npy)


def export(folder: str, out: str) -> Tuple[str, str]:
    """Copy the embeddings to `out` (float16 .npy) and write `<out>.manifest.json` beside it:
    the model and one {"path", "box"} per row, in row order."""
    index = SearchIndex(folder)
    emb = index.embeddings
    write_npy(out, (emb[i:i + 65536] for i in range(0, len(emb), 65536)), len(emb), emb.shape[1])
    entries = [dict(zip(("path", "box"), index.entry(row))) for row in range(len(emb))]
    write_json(manifest_path(out), {"written_by": EXPORT_WRITTEN_BY,
                                    "embeddings": os.path.basename(out),
                                    "model": index.manifest["model"], "entries": entries})
    return out, manifest_path(out)


def export_geoparquet(folder: str, out: str, batch: int = 65536) -> int:
    """Write the index's rows to `out` as GeoParquet (geoparquet.py: id, path, box, WKB
    footprint, embedding; the model in the file's metadata), a batch of rows at a time; returns
    the number of rows."""
    from .geoparquet import write_geoparquet
    index = SearchIndex(folder)
    emb, manifest = index.embeddings, index.manifest

    def batches():
        for start in range(0, len(emb), batch):
            rows = np.arange(start, min(start + batch, len(emb)))
            hits = index.hits(rows, np.zeros(len(rows)))
            yield {"path": [h["path"] for h in hits], "box": [h["box"] for h in hits],
                   "footprint": [h["footprint"] for h in hits],
                   "embedding": np.asarray(emb[start:start + batch], dtype=np.float32)}
    gsd = manifest.get("raster", {}).get("gsd")
    return write_geoparquet(out, batches(), manifest["model"], emb.shape[1], manifest["tile"],
                            manifest["stride"], "float16", gsd)
