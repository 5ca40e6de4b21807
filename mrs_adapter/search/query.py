"""Querying a search index: the top-k rows of a memory-mapped embedding matrix, a text or image
embedded as a query, and the export of the embeddings with one entry per row.
"""
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_json
from ..datasets import read_image
from ..tokenizer import tokenize
from .index import encode_images
from .store import read_manifest, write_npy


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
    write_npy(out, (emb[i:i + 65536] for i in range(0, len(emb), 65536)), len(emb), emb.shape[1])
    entries = [dict(zip(("path", "box"), index.entry(row))) for row in range(len(emb))]
    manifest_path = os.path.splitext(out)[0] + ".manifest.json"
    write_json(manifest_path, {"model": index.manifest["model"], "entries": entries})
    return out, manifest_path
