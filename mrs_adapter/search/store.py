"""The search index folder on disk (index.py builds it, query.py reads it).

index.json names the model, the image folder, the tiling and every file with its first row and
number of tiles; the tiles' records (boxes, bounds, footprints) are columns beside the
embeddings (tile_store.py). index.json is the commit point: `commit` writes a new
embeddings-<n>.npy and its columns first and index.json last, so a crash leaves the previous
index whole. A run in progress saves parts/part-<n>.npy, its columns and part-<n>.json every N
images (the .json last: a part without it is incomplete and ignored), so a killed run continues
where it stopped. A run holds index.lock; the commit removes only files the index
wrote: the embeddings it replaced and the parts it absorbed, never anything else in the folder.
"""
import contextlib
import glob
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..atomic import atomic_write, write_json
from . import tile_store
from .tile_store import column_path

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

SAME_MODEL = ("backbone_sha256", "activation", "method", "checkpoint_sha256")
WRITTEN_BY = "mrs-adapter search"
LOCK = "index.lock"
# Temporary files of atomic_write (<name>.<8 random characters>.tmp) that a killed run leaves
MINE = re.compile(r"^(index\.json|(embeddings|part)-\d{6}(\.(box|bounds|footprint))?\.npy"
                  r"|part-\d{6}\.json|embeddings-\d{6}\.rasters\.json)(\.\w{8}\.tmp)?$")
EMBEDDINGS = re.compile(r"^embeddings-\d{6}\.npy$")
_NONE = type(None)
FORMAT = 2  # 1: every tile's box, bounds and footprint in index.json; 2: in columns
FIELDS = {"written_by": str, "format": int, "model": dict, "images": str, "tile": int,
          "stride": int, "dim": (int, _NONE), "rows": int, "embeddings": (str, _NONE),
          "columns": list, "rasters": bool, "generation": int, "next_part": int, "files": dict,
          "skipped": dict}
ENTRY = {"size": int, "mtime_ns": int, "first": int, "tiles": int}
# An entry may also hold: reader ("pillow" / "rasterio"), crs, dropped (tiles over --max-nodata);
# in a part's .json also raster (raster.Scene.record()), which a commit moves to the records file
# (tile_store.records_path).
DEFAULT_RASTER = {"bands": None, "gsd": None, "stretch": None, "max_nodata": 0.5}


def check_same_model(recorded: Dict, identity: Dict, where: str, uses: str = "this run uses",
                     advice: str = "Use that model, or another index folder"):
    """Refuse to mix embeddings of two models: an index answers only queries of its own model."""
    differ = [k for k in SAME_MODEL if recorded.get(k) != identity.get(k)]
    if differ:
        was = ", ".join(f"{k}: {recorded.get(k)}" for k in differ)
        now = ", ".join(f"{k}: {identity.get(k)}" for k in differ)
        raise ValueError(f"{where} was built with another model ({was}); {uses} {now}. {advice}")


def damaged(path: str, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; it was edited or damaged: restore it, or build the index "
                      f"again into a new folder")


def check_files(path: str, files, rows: int):
    """Each entry of `files` is {size, mtime_ns, first, tiles}, and the entries' rows, in order
    of `first`, run from 0 to `rows` without gap or overlap. Every query runs this over every
    file: the common case (all well) is one pass of plain comparisons."""
    def whole(e) -> bool:
        return type(e) is dict and type(e.get("size")) is int and \
            type(e.get("mtime_ns")) is int and type(e.get("first")) is int and \
            type(e.get("tiles")) is int and e["tiles"] >= 0
    if not all(whole(e) for e in files.values()):
        rel, e = next((rel, e) for rel, e in files.items() if not whole(e))
        raise damaged(path, f"the entry of {rel!r} should be {{size, mtime_ns, first, tiles}}, "
                            f"found {e!r:.200}")
    _check_rows(path, files, rows, [e["tiles"] for e in files.values()])


def _check_rows(path: str, files, rows: int, counts: List[int]):
    """The files' rows (first, counts), in order of first, run from 0 to `rows`."""
    firsts = np.array([e["first"] for e in files.values()], np.int64)
    counts = np.array(counts, np.int64)
    order = np.argsort(firsts, kind="stable")
    expected = np.concatenate([[0], np.cumsum(counts[order])])
    wrong = np.flatnonzero(firsts[order] != expected[:-1])
    if len(wrong):
        i, names = order[wrong[0]], list(files)
        raise damaged(path, f"{names[i]!r} starts at row {firsts[i]}, expected "
                            f"{expected[wrong[0]]}")
    if expected[-1] != rows:
        raise damaged(path, f"its files hold {expected[-1]} rows, but it says rows: {rows}")


def _check_columns_listed(path: str, columns):
    if columns not in (tile_store.names(False), tile_store.names(True)):
        raise damaged(path, f"columns should be {tile_store.names(False)} or "
                             f"{tile_store.names(True)}, found {columns!r:.100}")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:  # also a UnicodeDecodeError
            raise damaged(path, f"not valid JSON ({e})") from None


def read_manifest(folder: str, format_1: bool = False) -> Optional[Dict]:
    """index.json of `folder`, checked key by key (None if there is none). An index of format 1
    (every tile's record in index.json, before the columns) is refused, naming the command that
    converts it, unless `format_1` (migrate reads it so; then its "format" says which)."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("written_by") != WRITTEN_BY:
        raise ValueError(f"{path} is not a search index written by search.py")
    version = manifest.setdefault("format", 1)
    if version == 1 and not format_1:
        raise ValueError(f"index {folder} was written by an earlier search.py, with every tile's "
                         f"record in index.json; run `python search.py migrate {folder}` once to "
                         f"move them into columns (nothing is embedded again), then run this "
                         f"command again")
    if version not in (1, FORMAT):
        raise ValueError(f"{path} is of format {version!r}; this search.py reads format "
                         f"{FORMAT} (and migrates 1): use the mrs-adapter that wrote it")
    fields = FIELDS if version == FORMAT else {k: v for k, v in FIELDS.items()
                                               if k not in ("columns", "rasters")}
    for key, kind in fields.items():
        if not isinstance(manifest.get(key), kind):
            raise damaged(path, f"{key!r} is {manifest.get(key)!r:.100}, expected "
                                 f"{getattr(kind, '__name__', 'a number or null')}")
    missing = [k for k in SAME_MODEL + ("backbone", "checkpoint") if k not in manifest["model"]]
    if missing:
        raise damaged(path, f"its model lacks {missing}")
    replaced = manifest.get("replaced", [])
    names = [manifest["embeddings"] or "embeddings-000000.npy"] + (
        replaced if isinstance(replaced, list) else [replaced])
    if not all(isinstance(n, str) and EMBEDDINGS.match(n) for n in names):  # files it may remove
        raise damaged(path, f"embeddings / replaced name other files than embeddings-<n>.npy: "
                             f"{names!r:.200}")
    if version == 1:
        check_files_format_1(path, manifest["files"], manifest["rows"])
    else:
        _check_columns_listed(path, manifest["columns"])
        check_files(path, manifest["files"], manifest["rows"])
    return manifest


def check_files_format_1(path: str, files, rows: int):
    """check_files for format 1: entries {size, mtime_ns, first, boxes (null or 4 integers
    each)}, with bounds and footprints null or one per box."""
    fields = dict(ENTRY, boxes=list)
    del fields["tiles"]
    for rel, e in files.items():
        if not isinstance(e, dict) or any(not isinstance(e.get(k), t) for k, t in fields.items()):
            raise damaged(path, f"the entry of {rel!r} should be {{size, mtime_ns, first, boxes}}"
                                 f", found {e!r:.200}")
        if any(b is not None and (not isinstance(b, list) or len(b) != 4) for b in e["boxes"]):
            raise damaged(path, f"the boxes of {rel!r} should be null or [left, top, right, "
                                 f"bottom] each, found {e['boxes']!r:.200}")
        for key in ("bounds", "footprints"):
            if e.get(key) is not None and (not isinstance(e[key], list)
                                           or len(e[key]) != len(e["boxes"])):
                raise damaged(path, f"the {key} of {rel!r} should be null or one per box "
                                     f"({len(e['boxes'])}), found {e[key]!r:.200}")
    _check_rows(path, files, rows, [len(e["boxes"]) for e in files.values()])


def _mapped(path: str, listed_in: str) -> np.ndarray:
    """The .npy `path` memory-mapped; an error naming it where it is missing or not whole."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing, though {listed_in} lists it; build the index "
                                f"again into a new folder") from None
    except (ValueError, OSError) as e:  # a truncated file: "mmap length is greater than ..."
        raise damaged(path, f"not a whole .npy file ({e})") from None


def open_rows(path: str, rows: int, dim: Optional[int], listed_in: str) -> np.ndarray:
    """The (rows, dim) float16 embeddings in `path`, memory-mapped; an error naming the file if it
    holds anything else (say, fewer rows than `listed_in` records: part of the index unsearched)."""
    embeddings = _mapped(path, listed_in)
    if (embeddings.ndim != 2 or embeddings.shape[0] != rows or embeddings.dtype != np.float16
            or rows and dim is not None and embeddings.shape[1] != dim):  # 0 rows: any width
        raise damaged(path, f"it holds {embeddings.shape} {embeddings.dtype}, but {listed_in} "
                             f"records {rows} rows of {dim} float16")
    return embeddings


def open_columns(npy: str, rows: int, present: Sequence[str],
                 listed_in: str) -> Dict[str, np.ndarray]:
    """The tile columns `present` (tile_store.COLUMNS) of the embeddings file `npy`,
    memory-mapped; an error naming the file where one holds other than `rows` rows of its shape
    and dtype."""
    columns = {}
    for name in present:
        path, (shape, dtype) = column_path(npy, name), tile_store.COLUMNS[name]
        values = _mapped(path, listed_in)
        if values.shape != (rows, *shape) or values.dtype != np.dtype(dtype):
            raise damaged(path, f"it holds {values.shape} {values.dtype}, but {listed_in} records "
                                f"{rows} rows of {shape} {np.dtype(dtype)}")
        columns[name] = values
    return columns


def write_npy(path: str, chunks, n_rows: int, dim: int):
    """Stream float16 row chunks into a .npy file, atomically."""
    def write(f):
        header = {"descr": "<f2", "fortran_order": False, "shape": (n_rows, dim)}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype="<f2").tobytes())
    atomic_write(path, write, mode="wb")


def check_index_folder(out: str, images: str):
    """Refuse an index folder inside the image folder, or an existing folder that is neither empty
    nor an index (its files are the user's): before anything is written there."""
    real_out, real_images = os.path.realpath(out), os.path.realpath(images)
    if os.path.commonpath([real_out, real_images]) == real_images:
        raise ValueError(f"--out {out} is inside the image folder {images}; choose a folder "
                         f"outside it")
    if os.path.isdir(out) and not os.path.isfile(os.path.join(out, "index.json")):
        # what a first run leaves before its index.json exists: the lock, a temporary index.json
        foreign = sorted(n for n in os.listdir(out)
                         if n != LOCK and not (n.startswith("index.json.") and MINE.match(n)))
        if foreign:
            raise ValueError(f"--out {out} holds {len(foreign)} file(s) or folder(s) not written "
                             f"by search.py (e.g. {foreign[0]}) and no index.json; choose a new "
                             f"or empty folder")


@contextlib.contextmanager
def index_lock(out: str, log=print):
    """Hold <out>/index.lock for one run, so that a second run into the same index at once is
    refused (naming the holder's pid). The operating system's lock (flock) goes with the process
    however it ends, so a killed run leaves no lock; the pid it leaves in the file is reported."""
    if fcntl is None:
        log(f"note: no file lock on this platform; run one `index` into {out} at a time")
        yield
        return
    path = os.path.join(out, LOCK)
    os.makedirs(out, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FileExistsError(f"index {out} is being written by another run (process "
                                  f"{f.read().strip() or 'unknown'}, lock {path}); wait for it to "
                                  f"end, or use another --out") from None
        f.seek(0)
        if f.read().strip():
            log(f"index {out}: the last run into it ended without finishing (killed?); its "
                f"lock is recovered and its saved parts are used")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)  # a clean end; the lock itself ends with the file's closing
            f.flush()


def part_numbers(folder: str) -> List[int]:
    """Numbers of the complete saved parts (each part's json is written after its .npy, so a part
    without json is incomplete and ignored), ascending."""
    paths = glob.glob(os.path.join(folder, "parts", "part-*.json"))
    names = (os.path.basename(path) for path in paths)
    return sorted(int(name[5:-5]) for name in names if MINE.match(name) and name[5:-5].isdigit())


def next_part_number(folder: str, manifest: Dict) -> int:
    """The number for the next part: after every saved one and every one a commit absorbed."""
    return max(part_numbers(folder) + [manifest["next_part"] - 1]) + 1


def saved_parts(folder: str, after: int) -> List[Tuple[int, Dict]]:
    """Complete saved parts of unfinished runs numbered >= after: [(number, its json)]."""
    return [(number, read_part(part_path(folder, number, "json")))
            for number in part_numbers(folder) if number >= after]


def read_part(path: str, format_1: bool = False) -> Dict:
    """A part's json {files, rows, columns}, checked; with `format_1`, a part an earlier
    search.py saved ({files, rows}, every tile's record in its entries) is taken too."""
    part = read_json(path)
    if not isinstance(part, dict) or not isinstance(part.get("files"), dict) \
            or not isinstance(part.get("rows"), int):
        raise damaged(path, "expected {files, rows, columns}")
    if format_1 and "columns" not in part:
        check_files_format_1(path, part["files"], part["rows"])
    else:
        _check_columns_listed(path, part.get("columns"))
        check_files(path, part["files"], part["rows"])
    return part


def part_path(folder: str, number: int, ext: str) -> str:
    return os.path.join(folder, "parts", f"part-{number:06d}.{ext}")


def open_index(out: str, images: str, identity: Dict, tile: int, stride: int,
               raster: Dict = DEFAULT_RASTER) -> Dict:
    """The index's manifest, created (with its model) before anything is embedded; refuses a
    folder built from another model, image folder, tiling or GeoTIFF reading (`raster`: --bands,
    --gsd, --stretch, --max-nodata; an index written before they existed used the defaults)."""
    manifest = read_manifest(out)
    if manifest is None:
        manifest = new_manifest(identity, images, tile, stride, raster)
        write_json(os.path.join(out, "index.json"), manifest)
        return manifest
    check_same_model(manifest["model"], identity, f"index {out}")
    if manifest["images"] != os.path.abspath(images):
        raise ValueError(f"index {out} was built with images {manifest['images']}, not "
                         f"{os.path.abspath(images)}; use the same images, or another --out")
    different = differing_setting(manifest, tile, stride, raster)
    if different:
        flag, was, now = different
        raise ValueError(f"index {out} was built with {flag} {was}, not {now}; use the same "
                         f"{flag}, or another --out")
    return manifest


def new_manifest(identity: Dict, images: str, tile: int, stride: int, raster: Dict) -> Dict:
    """The manifest of an index that holds nothing yet."""
    return {"written_by": WRITTEN_BY, "format": FORMAT, "model": identity,
            "images": os.path.abspath(images), "tile": tile, "stride": stride, "dim": None,
            "rows": 0, "embeddings": None, "columns": tile_store.names(False), "rasters": False,
            "generation": 0, "next_part": 0, "files": {}, "skipped": {}, "raster": raster}


def differing_setting(manifest: Dict, tile: int, stride: int,
                      raster: Dict) -> Optional[Tuple[str, str, str]]:
    """(flag, its value in `manifest`, the value given) of the first tiling or GeoTIFF setting
    (--tile, --stride, --bands, --gsd, --stretch, --max-nodata) that differs, else None; an index
    written before the GeoTIFF flags existed used their defaults."""
    recorded = dict(DEFAULT_RASTER, **manifest.get("raster", {}), tile=manifest["tile"],
                    stride=manifest["stride"])
    for key, value in dict(tile=tile, stride=stride, **raster).items():
        if recorded.get(key) != value:
            return "--" + key.replace("_", "-"), _flag_value(recorded.get(key)), _flag_value(value)
    return None


def _flag_value(value) -> str:
    if value is None:
        return "(not given)"
    return " ".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def reusable_rows(out: str, manifest: Dict, stats: Dict) -> Dict[str, Tuple]:
    """Files already embedded whose size and mtime are unchanged: path -> (npy file, first row,
    entry, its columns' names); from the committed index, then from the parts of an interrupted
    run (newer wins). Every embeddings file and its columns must hold the rows its json records."""
    stored = []
    if manifest["embeddings"]:
        stored.append((os.path.join(out, manifest["embeddings"]), manifest["rows"],
                       with_rasters(out, manifest), manifest["columns"],
                       os.path.join(out, "index.json")))
    stored += [(part_path(out, n, "npy"), part["rows"], part["files"], part["columns"],
                part_path(out, n, "json")) for n, part in saved_parts(out, manifest["next_part"])]
    sources = {}
    for npy, rows, files, columns, listed_in in stored:
        open_rows(npy, rows, manifest["dim"], listed_in)
        open_columns(npy, rows, columns, listed_in)
        for rel, e in files.items():
            if stats.get(rel) == [e["size"], e["mtime_ns"]]:
                sources[rel] = (npy, e["first"], e, tuple(columns))
    return sources


def read_rasters(folder: str, manifest: Dict) -> Dict[str, Dict]:
    """{path: raster record} of the index's GeoTIFFs (tile_store.records_path), checked."""
    if not manifest["rasters"]:
        return {}
    path = tile_store.records_path(os.path.join(folder, manifest["embeddings"]))
    try:
        records = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing, though {folder}/index.json lists it: if an "
                                f"`index` run has just committed, run this command again; "
                                f"otherwise build the index again into a new folder") from None
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()) \
            or not set(records) <= set(manifest["files"]):
        raise damaged(path, "expected {path of an indexed file: its raster record}")
    return records


def with_rasters(folder: str, manifest: Dict) -> Dict[str, Dict]:
    """The manifest's file entries, each GeoTIFF's with its raster record, as parts hold them."""
    records = read_rasters(folder, manifest)
    return {rel: dict(e, raster=records[rel]) if rel in records else e
            for rel, e in manifest["files"].items()}


class Part:
    """Rows embedded since the last save; `save` writes them as parts/part-<n>.npy, its columns
    (tile_store.py) and part-<n>.json. The parts of one process are numbered number,
    number + step, ...: under torchrun process r of W starts at first + r with step W, so the
    processes' parts never share a number."""

    def __init__(self, out: str, number: int, step: int = 1):
        self.out, self.number, self.step = out, number, step
        self.rows, self.columns, self.files, self.n_rows = [], [], {}, 0

    def add(self, rel: str, stat: list, entry: Dict, rows: Optional[np.ndarray],
            columns: Dict[str, np.ndarray]):
        """File `rel` of [size, mtime_ns] `stat`: its entry (tiles, reader, ...), (tiles, E) rows
        (None when no tile was kept) and its tiles' columns (tile_store.from_records)."""
        self.files[rel] = dict(entry, size=stat[0], mtime_ns=stat[1], first=self.n_rows)
        if rows is not None and len(rows):
            self.rows.append(rows)
            self.columns.append(columns)
            self.n_rows += len(rows)

    def save(self) -> "Part":
        """Write what was added (if anything); the next part to fill."""
        if not self.files:
            return self
        rows = np.concatenate(self.rows) if self.rows else np.empty((0, 0), np.float16)
        npy = part_path(self.out, self.number, "npy")
        write_npy(npy, [rows], len(rows), rows.shape[1])
        columns = tile_store.concatenate(self.columns)
        tile_store.write_columns(npy, columns)
        write_json(part_path(self.out, self.number, "json"),  # last: marks the part complete
                   {"files": self.files, "rows": len(rows), "columns": list(columns)})
        return Part(self.out, self.number + self.step, self.step)


def commit(out: str, manifest: Dict, sources: Dict, stats: Dict, skipped: Dict) -> Dict:
    """Write all rows to a new embeddings-<n>.npy and its columns, then index.json naming them
    (the commit point: a crash before it leaves the previous index), then remove what they
    replaced. `sources`: path -> (npy, first row, entry, its columns' names), reusable_rows'.

    The rows of files kept from the committed embeddings come first, in their order, then the
    others sorted by path: where nothing before them went, the new file starts with the old
    one's rows (`kept_rows` of them), so an ANN index over those stays valid (ann.follow) and
    only the new rows need adding."""
    committed = os.path.join(out, manifest["embeddings"]) if manifest["embeddings"] else None
    kept = sorted((rel for rel in sources if sources[rel][0] == committed),
                  key=lambda rel: sources[rel][1])
    order = kept + sorted(rel for rel in sources if sources[rel][0] != committed)
    kept_rows = 0
    for rel in kept:
        if sources[rel][1] != kept_rows:  # a file before it was removed or changed
            break
        kept_rows += sources[rel][2]["tiles"]
    files, first = {}, 0
    for rel in order:
        entry = sources[rel][2]
        files[rel] = dict(entry, size=stats[rel][0], mtime_ns=stats[rel][1], first=first)
        first += entry["tiles"]
    npys = {sources[rel][0]: sources[rel][3] for rel in order}
    maps = {npy: np.load(npy, mmap_mode="r") for npy in npys}
    columns = {npy: {c: np.load(column_path(npy, c), mmap_mode="r") for c in present}
               for npy, present in npys.items()}
    dim = manifest["dim"] or next((m.shape[1] for m in maps.values() if len(m)), None)
    generation = manifest["generation"] + 1
    name = f"embeddings-{generation:06d}.npy" if dim else None
    names = tile_store.names(any("footprint" in c for c in npys.values()))
    if name:
        pieces = [(npy, start, entry["tiles"]) for npy, start, entry, _ in
                  (sources[rel] for rel in order)]
        write_npy(os.path.join(out, name), (maps[npy][a:a + n] for npy, a, n in pieces), first,
                  dim)
        for column in names:
            tile_store.write_column(
                column_path(os.path.join(out, name), column), column,
                (columns[npy][column][a:a + n] if column in columns[npy]
                 else tile_store.empty(column, n) for npy, a, n in pieces), first)
    files, records = tile_store.split_records(files)
    if name and records:
        write_json(tile_store.records_path(os.path.join(out, name)), records)
    replaced = [n for n in [manifest["embeddings"]] + manifest.get("replaced", [])
                if n and n != name and os.path.exists(os.path.join(out, n))]
    manifest = dict(manifest, dim=dim, rows=first, embeddings=name, columns=names,
                    rasters=bool(name and records), generation=generation, files=files,
                    skipped=skipped, next_part=next_part_number(out, manifest),
                    replaced=replaced,  # removed next; if this run is killed first, by the next
                    kept_rows=kept_rows if name else 0)
    write_json(os.path.join(out, "index.json"), manifest)
    del maps, columns
    _remove_replaced(out, manifest)
    return manifest


def _remove_replaced(out: str, manifest: Dict):
    """Remove what the committed index no longer needs, and only files this index wrote: the
    embeddings files it replaced (named in index.json), the parts it absorbed (numbered below
    next_part), and the temporary files of writes a killed run left (the lock is held: no write
    of another run is under way)."""
    for name in manifest["replaced"]:
        tile_store.remove_columns(os.path.join(out, name))
        if os.path.exists(os.path.join(out, name)):  # last: a name still listed may have columns
            os.remove(os.path.join(out, name))
    for name in sorted(os.listdir(out)):
        if name.endswith(".tmp") and MINE.match(name):
            os.remove(os.path.join(out, name))
    parts = os.path.join(out, "parts")
    # .json first: a part whose .json is gone is incomplete, never read again
    for name in sorted(os.listdir(parts) if os.path.isdir(parts) else [], key=lambda n: "npy" in n):
        if MINE.match(name) and name.startswith("part-") and (
                name.endswith(".tmp") or int(name[5:11]) < manifest["next_part"]):
            os.remove(os.path.join(parts, name))


def migrate(folder: str, log=print) -> Dict:
    """`search.py migrate`: convert an index of format 1 (every tile's box, bounds and footprint
    in index.json) to format 2 (columns, tile_store.py). The columns of its embeddings file and
    of each saved part of an interrupted run are written, each part's json rewritten, index.json
    last (the commit point). Nothing is embedded again; a killed migrate leaves an index of
    format 1 (with the parts it converted) and can be run again. Returns the manifest."""
    index_json = os.path.join(folder, "index.json")
    with index_lock(folder, log):
        manifest = read_manifest(folder, format_1=True)
        if manifest is None:
            raise FileNotFoundError(f"no search index in {folder} (expected {index_json})")
        if manifest["format"] == FORMAT:
            log(f"index {folder} is of format {FORMAT} already: nothing to do")
            return manifest
        before = os.path.getsize(index_json)
        for number in part_numbers(folder):
            if number < manifest["next_part"]:
                continue  # absorbed by the commit (removed by the next)
            path = part_path(folder, number, "json")
            part = read_part(path, format_1=True)
            if "columns" in part:
                continue  # converted by a migrate that was killed before index.json
            columns = tile_store.columns_of_entries(part["files"])
            npy = part_path(folder, number, "npy")
            open_rows(npy, part["rows"], manifest["dim"], path)
            tile_store.write_columns(npy, columns)
            write_json(path, {"files": {rel: tile_store.entry_of_format_1(e)
                                        for rel, e in part["files"].items()},
                              "rows": part["rows"], "columns": list(columns)})
        columns = tile_store.columns_of_entries(manifest["files"])
        files, records = tile_store.split_records(
            {rel: tile_store.entry_of_format_1(e) for rel, e in manifest["files"].items()})
        if manifest["embeddings"]:
            npy = os.path.join(folder, manifest["embeddings"])
            open_rows(npy, manifest["rows"], manifest["dim"], index_json)
            tile_store.write_columns(npy, columns)
            if records:
                write_json(tile_store.records_path(npy), records)
        manifest = dict(manifest, format=FORMAT, columns=list(columns), files=files,
                        rasters=bool(manifest["embeddings"] and records))
        write_json(index_json, manifest)
    log(f"index {folder}: the records of {manifest['rows']} tiles of {len(manifest['files'])} "
        f"files moved from index.json into columns ({', '.join(columns)}); index.json "
        f"{before:,} -> {os.path.getsize(index_json):,} bytes")
    return manifest
