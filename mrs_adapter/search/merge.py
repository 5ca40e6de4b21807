"""Indexes built separately (other machines, a job array) joined into one: `search.py merge`.

An index records paths relative to its image folder. The merged index's image folder is the
deepest folder holding all of theirs (os.path.commonpath): indexes of images/north and
images/south merge into an index of images whose paths are north/..., south/..., as one run
over images would have written them, so a later `search.py index images --out MERGED` goes on
from it. The inputs must agree on the model, the tiling and the GeoTIFF reading; a file two of
them hold (folders that overlap) must be the same file (size, mtime), and its rows are taken
from the first. The merged index is written as a commit writes one (store.commit): embeddings
first, index.json last, into a new or empty folder.
"""
import os
from typing import Dict, List

from .store import (
    DEFAULT_RASTER,
    check_index_folder,
    check_same_model,
    commit,
    differing_setting,
    index_lock,
    new_manifest,
    open_columns,
    open_rows,
    read_manifest,
    with_rasters,
)


def read_inputs(indexes: List[str]) -> List[Dict]:
    """Their manifests, refused unless they agree on the model, tiling and GeoTIFF reading."""
    manifests = []
    for folder in indexes:
        manifest = read_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"{folder} holds no index.json; expected an index folder "
                                    f"written by `search.py index`")
        manifests.append(manifest)
    first, raster = manifests[0], dict(DEFAULT_RASTER, **manifests[0].get("raster", {}))
    for folder, manifest in zip(indexes[1:], manifests[1:]):
        check_same_model(manifest["model"], first["model"], f"index {folder}",
                         f"index {indexes[0]} uses", "Only indexes of one model can be merged")
        different = differing_setting(manifest, first["tile"], first["stride"], raster)
        if different:
            flag, was, now = different
            raise ValueError(f"index {folder} was built with {flag} {was}, index {indexes[0]} "
                             f"with {flag} {now}; only indexes of one tiling and GeoTIFF reading "
                             f"can be merged")
    return manifests


def merge_indexes(indexes: List[str], out: str, log=print) -> Dict:
    """Write the index of all files of `indexes` into `out` (see the module docstring); returns
    its manifest."""
    manifests = read_inputs(indexes)
    images = os.path.commonpath([m["images"] for m in manifests])
    if os.path.dirname(images) == images:
        folders = ", ".join(m["images"] for m in manifests)
        raise ValueError(f"the image folders of the indexes ({folders}) share no folder but "
                         f"{images}; merge indexes of folders under one image folder (e.g. "
                         f"images/north, images/south)")
    check_index_folder(out, images)
    if read_manifest(out) is not None:
        raise ValueError(f"--out {out} holds an index; merge writes a new one: choose a new or "
                         f"empty folder")
    sources, stats, skipped, owner = {}, {}, {}, {}
    for folder, manifest in zip(indexes, manifests):
        npy = os.path.join(folder, manifest["embeddings"] or "")
        if manifest["embeddings"]:  # checked now: the files are read by the commit
            listed_in = os.path.join(folder, "index.json")
            open_rows(npy, manifest["rows"], manifest["dim"], listed_in)
            open_columns(npy, manifest["rows"], manifest["columns"], listed_in)
        prefix = os.path.relpath(manifest["images"], images).replace(os.sep, "/")
        recorded = dict(manifest["skipped"], **with_rasters(folder, manifest))
        for rel, e in recorded.items():
            path, stat = rel if prefix == "." else f"{prefix}/{rel}", [e["size"], e["mtime_ns"]]
            if stats.setdefault(path, stat) != stat:
                raise ValueError(f"{os.path.join(images, path)} is in index {owner[path]} with "
                                 f"size {stats[path][0]}, mtime_ns {stats[path][1]} and in index "
                                 f"{folder} with size {stat[0]}, mtime_ns {stat[1]}: two versions "
                                 f"of one file; index it again in one of them, then merge")
            owner.setdefault(path, folder)
            if rel in manifest["files"]:
                sources.setdefault(path, (npy, e["first"], e, tuple(manifest["columns"])))
            else:
                skipped.setdefault(path, e)
    skipped = {path: e for path, e in skipped.items() if path not in sources}
    first = manifests[0]
    merged = new_manifest(first["model"], images, first["tile"], first["stride"],
                          dict(DEFAULT_RASTER, **first.get("raster", {})))
    with index_lock(out, log):
        merged = commit(out, merged, sources, stats, skipped)
    log(f"index {out}: {merged['rows']} entries from {len(merged['files'])} images of "
        f"{len(indexes)} indexes, paths relative to {images}; {len(skipped)} unreadable file(s) "
        f"listed as skipped")
    return merged
