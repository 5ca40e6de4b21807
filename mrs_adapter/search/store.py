"""The search index folder on disk (index.py builds it, query.py reads it).

index.json names the model, the image folder, the tiling and every file with its first row and
tile boxes; it is the commit point: `commit` writes a new embeddings-<n>.npy first and index.json
last, so a crash leaves the previous index whole. A run in progress saves parts/part-<n>.npy and
.json every N images (the .json last: a part without it is incomplete and ignored), so a killed
run continues where it stopped; the commit removes the parts it absorbed.
"""
import glob
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..atomic import atomic_write, write_json

SAME_MODEL = ("backbone_sha256", "activation", "method", "checkpoint_sha256")
WRITTEN_BY = "mrs-adapter search"


def check_same_model(recorded: Dict, identity: Dict, where: str):
    """Refuse to mix embeddings of two models: an index answers only queries of its own model."""
    differ = [k for k in SAME_MODEL if recorded.get(k) != identity.get(k)]
    if differ:
        was = ", ".join(f"{k}: {recorded.get(k)}" for k in differ)
        now = ", ".join(f"{k}: {identity.get(k)}" for k in differ)
        raise ValueError(f"{where} was built with another model ({was}); this run uses {now}. "
                         f"Use that model, or another index folder")


def read_manifest(folder: str) -> Optional[Dict]:
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("written_by") != WRITTEN_BY:
        raise ValueError(f"{path} is not a search index written by search.py")
    return manifest


def write_npy(path: str, chunks, n_rows: int, dim: int):
    """Stream float16 row chunks into a .npy file, atomically."""
    def write(f):
        header = {"descr": "<f2", "fortran_order": False, "shape": (n_rows, dim)}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype="<f2").tobytes())
    atomic_write(path, write, mode="wb")


def part_numbers(folder: str) -> List[int]:
    """Numbers of the complete saved parts (each part's json is written after its .npy, so a part
    without json is incomplete and ignored), ascending."""
    paths = glob.glob(os.path.join(folder, "parts", "part-*.json"))
    return sorted(int(os.path.basename(path)[5:-5]) for path in paths)


def next_part_number(folder: str, manifest: Dict) -> int:
    """The number for the next part: after every saved one and every one a commit absorbed."""
    return max(part_numbers(folder) + [manifest["next_part"] - 1]) + 1


def saved_parts(folder: str, after: int) -> List[Tuple[int, Dict]]:
    """Complete saved parts of unfinished runs numbered >= after: [(number, its json)]."""
    parts = []
    for number in part_numbers(folder):
        if number >= after:
            with open(part_path(folder, number, "json")) as f:
                parts.append((number, json.load(f)))
    return parts


def part_path(folder: str, number: int, ext: str) -> str:
    return os.path.join(folder, "parts", f"part-{number:06d}.{ext}")


def open_index(out: str, images: str, identity: Dict, tile: int, stride: int) -> Dict:
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


def reusable_rows(out: str, manifest: Dict, stats: Dict) -> Dict[str, Tuple[str, int, list]]:
    """Files already embedded whose size and mtime are unchanged: path -> (npy file, first row,
    boxes); from the committed index, then from the parts of an interrupted run (newer wins)."""
    sources = {}
    stored = [(os.path.join(out, manifest["embeddings"] or ""), manifest["files"])]
    stored += [(part_path(out, n, "npy"), part["files"])
               for n, part in saved_parts(out, manifest["next_part"])]
    for npy, files in stored:
        for rel, e in files.items():
            if stats.get(rel) == [e["size"], e["mtime_ns"]]:
                sources[rel] = (npy, e["first"], e["boxes"])
    return sources


class Part:
    """Rows embedded since the last save; `save` writes them as parts/part-<n>.npy + .json."""

    def __init__(self, out: str, number: int):
        self.out, self.number, self.rows, self.files, self.n_rows = out, number, [], {}, 0

    def add(self, rel: str, stat: list, boxes: List, rows: np.ndarray):
        self.files[rel] = {"size": stat[0], "mtime_ns": stat[1], "first": self.n_rows,
                           "boxes": [None if b is None else list(b) for b in boxes]}
        self.rows.append(rows)
        self.n_rows += len(rows)

    def save(self, sources: Dict) -> "Part":
        if self.files:
            rows = np.concatenate(self.rows)
            npy = part_path(self.out, self.number, "npy")
            write_npy(npy, [rows], len(rows), rows.shape[1])
            write_json(part_path(self.out, self.number, "json"),  # last: marks the part complete
                       {"files": self.files, "rows": len(rows)})
            sources.update({rel: (npy, e["first"], e["boxes"]) for rel, e in self.files.items()})
        return Part(self.out, self.number + 1) if self.files else self


def commit(out: str, manifest: Dict, sources: Dict, stats: Dict, skipped: Dict) -> Dict:
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
        write_npy(os.path.join(out, name), chunks, first, dim)
    manifest = dict(manifest, dim=dim, rows=first, embeddings=name, generation=generation,
                    files=files, skipped=skipped, next_part=next_part_number(out, manifest))
    write_json(os.path.join(out, "index.json"), manifest)
    del maps
    replaced = glob.glob(os.path.join(out, "embeddings-*.npy"))
    for path in replaced + glob.glob(os.path.join(out, "parts", "*")):
        if os.path.basename(path) != name:
            os.remove(path)
    return manifest

