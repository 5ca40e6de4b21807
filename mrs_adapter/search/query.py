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
from .index import encode_images
from .store import open_rows, read_manifest, write_npy

HIT = ("rank", "score", "path", "box")  # one hit of a query, as --json writes it
EXPORT_WRITTEN_BY = "mrs-adapter search.py export"


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
        for attempt in range(2):
            manifest = read_manifest(folder)
            if manifest is None:
                raise FileNotFoundError(f"no search index in {folder} (expected "
                                        f"{folder}/index.json; make one with `python search.py "
                                        f"index`)")
            if not manifest["rows"]:
                raise ValueError(f"index {folder} holds no images")
            try:
                self.embeddings = open_rows(os.path.join(folder, manifest["embeddings"]),
                                            manifest["rows"], manifest["dim"],
                                            os.path.join(folder, "index.json"))
                break
            except FileNotFoundError:  # an index run may have committed a newer one just now
                if attempt:
                    raise
        self.folder, self.manifest = folder, manifest
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
        return [dict(zip(HIT, (r + 1, float(s), *self.entry(row))))
                for r, (row, s) in enumerate(zip(rows, scores))]


def is_hits_file(path: str) -> bool:
    """Whether `path` holds what `search.py query --json` writes: a list of hits, each exactly
    {rank, score, path, box} (a bare list, as documented, so it carries no written_by mark)."""
    try:
        with open(path, encoding="utf-8") as f:
            hits = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(hits, list) and bool(hits) and all(
        isinstance(h, dict) and sorted(h) == sorted(HIT) for h in hits)


@torch.no_grad()
def embed_query(model, preprocess, device, text: Optional[str] = None,
                image: Optional[str] = None) -> np.ndarray:
    """(E,) float32 L2-normalised embedding of a text or of a whole image (no tiling)."""
    if text is not None:
        if not text.strip():
            raise ValueError("the query text is empty; give a text, or --image PATH")
        tokens = tokenize([text], model.context_length).to(device)
        return F.normalize(model.encode_text(tokens).float(), dim=-1)[0].cpu().numpy()
    x = read_image(image, preprocess)[None]
    return encode_images(model, x, device)[0]


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
