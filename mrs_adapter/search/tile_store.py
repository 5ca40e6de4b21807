"""The tiles' records beside their embeddings: one row per tile in memory-mapped columns.

An embeddings file X.npy (the committed embeddings-<n>.npy, or a run's parts/part-<n>.npy) has
its tiles' records row for row in

  X.box.npy        (N, 4) int32       left, top, right, bottom in full-resolution pixels;
                                      -1 x 4: the whole image (not tiled)
  X.bounds.npy     (N, 4) float64     minx, miny, maxx, maxy in the file's CRS (index.json
                                      records it per file); NaN: no georeferencing
  X.footprint.npy  (N, 5, 2) float64  the footprint in WGS84 lon/lat, a closed
                                      counter-clockwise ring; NaN: no georeferencing

box always; bounds and footprint where the index holds a georeferenced file (index.json's
"columns" names those present). index.json keeps what belongs to a file (size, mtime, first row,
number of tiles, reader, CRS, tiles dropped), so a query reads one short record per file and, of
the columns, only its hits' rows; --within reads the footprint column a block at a time. 16 bytes a
plain tile, 128 a placed one, where a JSON record took ~100 and ~645.

How each GeoTIFF was read (its raster.Scene record: bands, stretch, fill, transform, ...; ~700
bytes a file) is kept beside the committed embeddings too, in X.rasters.json ({path: record};
a part keeps them in its .json), read only by what draws a hit's pixels (--sheet, --map):
parsing those records made up ~90% of reading an index.json of 3,700 scenes.

The columns and the records are written before the index.json (or part .json) that names them,
which stays the commit point. Indexes written before the columns existed (format 1: every tile's
box, bounds and footprint in index.json) are converted by `search.py migrate` (store.migrate).
"""
import os
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..atomic import atomic_write

COLUMNS = {"box": ((4,), np.int32), "bounds": ((4,), np.float64),
           "footprint": ((5, 2), np.float64)}  # name -> (shape of a row, dtype)
PLACES = ("bounds", "footprint")
NO_BOX = -1


def column_path(npy: str, name: str) -> str:
    """X.npy -> X.<name>.npy."""
    return npy[:-len(".npy")] + f".{name}.npy"


def names(placed: bool) -> List[str]:
    return ["box", *PLACES] if placed else ["box"]


def empty(name: str, n: int) -> np.ndarray:
    """n rows of column `name` that say "none": -1 boxes, NaN places."""
    shape, dtype = COLUMNS[name]
    return np.full((n, *shape), NO_BOX if name == "box" else np.nan, dtype)


def from_records(boxes: Sequence[Optional[Sequence[int]]],
                 places: Optional[Sequence[Optional[Dict]]]) -> Dict[str, np.ndarray]:
    """The columns of one file's tiles: `boxes` (None: the whole image) and `places` (one
    {"bounds", "footprint"} or None per box; None for a file without georeferencing)."""
    columns = {"box": empty("box", len(boxes))}
    for t, box in enumerate(boxes):
        if box is not None:
            columns["box"][t] = box
    if places is not None and any(p is not None for p in places):
        for name in PLACES:
            columns[name] = empty(name, len(boxes))
        for t, place in enumerate(places):
            if place is not None:
                columns["bounds"][t] = place["bounds"]
                columns["footprint"][t] = place["footprint"]
    return columns


def concatenate(pieces: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """The columns of several files' tiles (from_records' results) one after the other; bounds
    and footprint where any piece has them, "none" rows for the pieces without."""
    placed = any("footprint" in p for p in pieces)
    return {name: np.concatenate([p.get(name, empty(name, len(p["box"]))) for p in pieces]
                                 or [empty(name, 0)]) for name in names(placed)}


def box_of(row: np.ndarray) -> Optional[List[int]]:
    """A box column row as a hit names it: [left, top, right, bottom], or None (whole image)."""
    return None if row[0] == NO_BOX else [int(v) for v in row]


def place_of(columns: Dict[str, np.ndarray], row: int):
    """(bounds, footprint ring) of `row` as lists, or (None, None) where it has no place."""
    if "footprint" not in columns or np.isnan(columns["footprint"][row, 0, 0]):
        return None, None
    return ([float(v) for v in columns["bounds"][row]],
            [[float(lon), float(lat)] for lon, lat in columns["footprint"][row]])


def records_path(npy: str) -> str:
    """X.npy -> X.rasters.json: the raster records of the files whose rows X holds."""
    return npy[:-len(".npy")] + ".rasters.json"


def split_records(files: Dict[str, Dict]):
    """({path: entry without "raster"}, {path: raster record}) of index entries."""
    records = {rel: e["raster"] for rel, e in files.items() if e.get("raster") is not None}
    return {rel: {k: v for k, v in e.items() if k != "raster"} for rel, e in files.items()}, \
        records


def write_column(path: str, name: str, chunks: Iterable[np.ndarray], n_rows: int):
    """Stream row chunks of column `name` into the .npy `path`, atomically."""
    shape, dtype = COLUMNS[name]
    dtype = np.dtype(dtype).newbyteorder("<")

    def write(f):
        header = {"descr": dtype.str, "fortran_order": False, "shape": (n_rows, *shape)}
        np.lib.format.write_array_header_1_0(f, header)
        written = 0
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            written += len(chunk)
        if written != n_rows:
            raise AssertionError(f"{path}: {written} rows written, {n_rows} announced")
    atomic_write(path, write, mode="wb")


def write_columns(npy: str, columns: Dict[str, np.ndarray]):
    """Write whole in-memory columns beside the embeddings file `npy`."""
    for name, values in columns.items():
        write_column(column_path(npy, name), name, [values], len(values))


def columns_of_entries(files: Dict[str, Dict]) -> Dict[str, np.ndarray]:
    """Format 1 -> columns: the boxes, bounds and footprints lists of `files` entries (rel ->
    {first, boxes, [bounds, footprints]}), in row order."""
    pieces = []
    for e in sorted(files.values(), key=lambda e: e["first"]):
        places = None
        if e.get("footprints") is not None:
            places = [None if fp is None else {"bounds": b, "footprint": fp}
                      for b, fp in zip(e["bounds"], e["footprints"])]
        pieces.append(from_records(e["boxes"], places))
    return concatenate(pieces)


def entry_of_format_1(e: Dict) -> Dict:
    """A format-1 file entry without its per-tile lists, with its number of tiles."""
    stripped = {k: v for k, v in e.items() if k not in ("boxes", "bounds", "footprints")}
    return dict(stripped, tiles=len(e["boxes"]))


def remove_columns(npy: str):
    """Remove the columns and raster records of the embeddings file `npy` (those that exist)."""
    for path in [column_path(npy, name) for name in COLUMNS] + [records_path(npy)]:
        if os.path.exists(path):
            os.remove(path)
