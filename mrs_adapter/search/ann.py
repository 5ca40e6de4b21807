"""An approximate nearest-neighbour (ANN) index over a search index's embeddings, with FAISS.

The ANN only proposes candidates: every hit is re-scored exactly (float32 dot product of the
query with the row's float16 embedding, as query.top_k scores it), so a hit's score and order
equal brute force's; a true top-k row the ANN does not propose is the only loss (recall).

Which index (`choose`), for rows of dim E (CLIP: 512):
- below HNSW_MAX_ROWS (100,000) rows, HNSW (32 links, 8-bit scalar-quantised rows, inner
  product): no trained partition, so nothing to fit on few rows, and it finds ~every neighbour
  (candidates: 4 x k). Its graph and codes (~0.8 KB/row, < 80 MB here) are read whole per query
  and its build inserts row by row into the graph: 4,500 rows/s measured at 30k rows on 2
  cores, slower as it grows, so an hour or more and ~8 GB at 10M rows.
- from 100,000 rows, IVF-PQ (inner product, codes of the residual to the list's centroid):
  - nlist = 4 sqrt(n) lists (4,000 at 1M, 12,649 at 10M): the low end of faiss's guidance
    (4-16 sqrt(n)), as training and assigning every row cost ~nlist each on 2 cores;
  - PQ with m = E/4 sub-quantizers of 8 bits (128 bytes a row at E = 512): 2 bits a
    dimension. m = 64 (1 bit) cannot rank near-duplicates: on generated clusters of ~10k
    near-duplicate rows (demo/embeddings.py; the density of its 10M rows) recall@20 was 0.69
    with 2,000 candidates and 3% of the lists probed, 0.946 with m = 128. Finer codes (m = 256,
    or 8-bit scalar codes) reached 0.999 where m = 128 reached 0.986 (below), at 2-4x the bytes;
  - nprobe = nlist / 100, at least 16 (1% of the rows scanned at any size): a query's
    neighbours spread over the lists that split its cluster, more of them the more lists.
    With 10M's geometry (1M rows in 100 clusters, 1,265 lists: ~790 rows a list, ~13 lists a
    cluster) 64 lists gave recall 0.96, 128 gave 0.99 (2,000 candidates);
  - candidates = 200 x k (4,000 for k = 20), re-scored exactly (4 MB of float16 rows, a few
    ms): they absorb the codes' ranking noise; 2,000 candidates lost another point of recall;
  - trained on 40 x nlist sampled rows (faiss warns below 39 a list), at least 65,536 (256
    centroids a PQ codebook); 10 k-means iterations, coarse and PQ (25 for the codebooks
    cost 3x the time for 0.7% less error).
  OPQ (a learned rotation) is not used: it balances the variance among sub-vectors, which 4
  dimensions a sub-quantizer already make small, and its training is slow on 2 cores.
  Measured (`speed_bench.py --only scale`, 2 cores): 1M rows: recall@20 1.0, 14 ms a query
  (the ANN opened, searched, its candidates re-scored), built in 71 s; 10M: recall@20 0.999
  (worst query 0.95), 32 ms (brute force: 393 ms), built in 1,182 s (train 364 s, add ~12k
  rows/s); ~1,163 bytes a tile on disk. docs/scale.md has the end-to-end figures.

On disk, in the index folder: ann-<n>.faiss, then ann.json (the commit point, written last)
naming it with the parts it covers (file name, rows, size, mtime_ns), kind and parameters.
Both are written atomically and the old .faiss is removed only after the new ann.json, so a
killed build or extension leaves the previous pair whole (or none), never a mix; the brute-force
path never depends on them. Rows appended after the covered parts are not stale: `extend` adds
them to the trained index without a rebuild, and until then `search` scores them exactly.
Callers should hold the index lock (store.index_lock) while building or extending.
faiss is imported only inside functions: without it, `open_ann` returns None with the reason.
"""
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..atomic import atomic_write, write_json
from .pages import take

ANN_JSON = "ann.json"
WRITTEN_BY = "mrs-adapter search.py ann"
INSTALL = 'pip install -e ".[ann]"'
HNSW_MAX_ROWS = 100_000
BLOCK = 65536  # rows converted to float32 at once (128 MB at E = 512)
# ours, with the temporary files (<name>.<8 characters>.tmp) a killed write leaves
MINE = re.compile(r"^(ann-\d{6}\.faiss|ann\.json)(\.\w{8}\.tmp)?$")


class FaissMissing(ImportError, ValueError):
    """faiss is not installed (a ValueError too: search.py prints it as a one-line error)."""


def _faiss(what: str):
    try:
        import faiss
    except ImportError:  # also a blocked import (sys.modules["faiss"] = None)
        raise FaissMissing(f"{what} needs faiss: {INSTALL}") from None
    return faiss


def _pq_m(dim: int) -> int:
    """The most sub-quantizers of at least 4 dimensions that divide `dim` (128 for 512)."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def hnsw_params(n_rows: int, dim: int) -> Dict:
    """(rows, dim) -> HNSW's parameters: 32 links, 80 / 128 candidates while inserting /
    searching, 4 x k candidates re-scored, the SQ8 range trained on up to 65,536 rows."""
    return {"M": 32, "ef_construction": 80, "ef_search": 128, "factor": 4,
            "train_rows": min(n_rows, 65536)}


def ivfpq_params(n_rows: int, dim: int) -> Dict:
    """(rows, dim) -> IVF-PQ's parameters, as the module's docstring gives and explains them."""
    nlist = max(1, int(4 * math.sqrt(n_rows)))
    return {"nlist": nlist, "m": _pq_m(dim), "nbits": 8,
            "nprobe": min(nlist, max(16, nlist // 100)), "factor": 200,
            "train_rows": min(n_rows, max(40 * nlist, 65536)), "niter": 10}


def choose(n_rows: int, dim: int) -> Tuple[str, Dict, str]:
    """(rows, dim) -> (kind "hnsw" or "ivfpq", parameters, why in one line)."""
    if n_rows < HNSW_MAX_ROWS:
        return "hnsw", hnsw_params(n_rows, dim), (
            f"{n_rows:,} rows < {HNSW_MAX_ROWS:,}: HNSW needs no trained partition, finds ~every "
            f"neighbour and is small enough to read whole per query")
    p = ivfpq_params(n_rows, dim)
    return "ivfpq", p, (
        f"{n_rows:,} rows >= {HNSW_MAX_ROWS:,}: IVF-PQ ({p['nlist']:,} lists = 4 sqrt(rows), "
        f"{p['m']} 8-bit codes a row, {p['nprobe']} lists probed, {p['factor']} x k candidates "
        f"re-scored exactly); HNSW would take ~0.8 KB a row and far longer to build")


def _open_parts(parts: Sequence[Tuple[str, int]]) -> List[np.ndarray]:
    """[(npy path, rows)] -> their (rows, E) float16 memmaps; a ValueError if one disagrees."""
    maps = [np.load(path, mmap_mode="r") for path, _ in parts]
    for (path, rows), m in zip(parts, maps):
        if m.ndim != 2 or m.dtype != np.float16 or len(m) != rows or m.shape[1] != maps[0].shape[1]:
            raise ValueError(f"{path} holds {m.shape} {m.dtype}, expected {rows} rows of "
                             f"{maps[0].shape[1]} float16")
    return maps


def rows_getter(parts) -> Callable[[np.ndarray], np.ndarray]:
    """[(npy path, rows)] or [memmaps] -> get(rows (n,) int64 ascending) -> (n, E) float16,
    rows numbered consecutively across the parts, read as a query reads them (pages.take)."""
    maps = [p if isinstance(p, np.ndarray) else np.load(p[0], mmap_mode="r") for p in parts]
    firsts = np.cumsum([0] + [len(m) for m in maps])

    def get(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        at = np.searchsorted(firsts, rows, side="right") - 1
        return np.concatenate([take(maps[j], rows[at == j] - firsts[j]) for j in np.unique(at)]
                              or [np.empty((0, maps[0].shape[1]), np.float16)])
    return get


def float32(rows: np.ndarray) -> torch.Tensor:
    """(n, E) float16 rows -> (n, E) float32, the same values: torch converts ~40x faster than
    numpy does here (4,000 rows: 0.1 ms against 4 ms)."""
    return torch.from_numpy(np.ascontiguousarray(rows)).float()


def _new_index(faiss, kind: str, p: Dict, dim: int):
    """An empty, untrained faiss index of `kind` with parameters `p`, inner product."""
    if kind == "hnsw":
        index = faiss.index_factory(dim, f"HNSW{p['M']},SQ8", faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
        return index
    if kind != "ivfpq":
        raise ValueError(f"unknown ANN kind {kind!r}: hnsw or ivfpq")
    index = faiss.index_factory(dim, f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}",
                                faiss.METRIC_INNER_PRODUCT)
    index.cp.niter, index.cp.seed = p["niter"], 1234
    index.cp.max_points_per_centroid = 1 << 30  # the sample is already the size we want
    index.pq.cp.niter = p["niter"]
    # index_factory's default, polysemous training, took 6x the training time for a Hamming
    # filter this search does not use
    index.do_polysemous_training = False
    return index


def _train(index, get, n_rows: int, p: Dict, log) -> int:
    """Train on p["train_rows"] rows sampled uniformly (seed 0): the trained part, not the data,
    decides the index's quality, and sampling keeps its cost independent of the rows."""
    start = time.time()
    rows = np.sort(np.random.default_rng(0).choice(n_rows, p["train_rows"], replace=False))
    x = float32(get(rows)).numpy()
    log(f"ANN: training on {len(rows):,} sampled rows")
    index.train(x)
    log(f"ANN: trained in {time.time() - start:.0f}s")
    return len(rows)


def _add(index, get, first: int, n_rows: int, log, every_s: float = 30.0):
    """Add rows first..n_rows-1 in blocks of BLOCK (float32 one block at a time); faiss numbers
    them from its ntotal, which is `first`: faiss ids are rows."""
    if index.ntotal != first:
        raise ValueError(f"the ANN index holds {index.ntotal:,} rows, expected {first:,}")
    start = last = time.time()
    for at in range(first, n_rows, BLOCK):
        index.add(float32(get(np.arange(at, min(at + BLOCK, n_rows)))).numpy())
        if time.time() - last >= every_s or index.ntotal == n_rows:
            last = time.time()
            log(f"ANN: {index.ntotal - first:,} / {n_rows - first:,} rows added "
                f"({(index.ntotal - first) / max(last - start, 1e-9):,.0f} rows/s)")


def _write_index(faiss, index, f):
    """Serialise `index` into the open binary file `f` (atomic_write's temporary file)."""
    faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def _generation(folder: str) -> int:
    """The number of the next ann-<n>.faiss: above every one there, a killed run's included."""
    names = [n for n in os.listdir(folder) if MINE.match(n) and n.startswith("ann-")]
    return max([int(n[4:10]) for n in names], default=0) + 1


def _commit(folder: str, faiss, index, info: Dict) -> Dict:
    """Write ann-<n>.faiss, then ann.json naming it (the commit point), then remove the
    previous .faiss and what killed writes left: a crash keeps the old pair whole."""
    name = f"ann-{_generation(folder):06d}.faiss"
    path = os.path.join(folder, name)
    atomic_write(path, lambda f: _write_index(faiss, index, f), mode="wb")
    info = dict(info, file=name, bytes=os.path.getsize(path))
    write_json(os.path.join(folder, ANN_JSON), info)
    for other in os.listdir(folder):
        if MINE.match(other) and other not in (name, ANN_JSON):
            os.remove(os.path.join(folder, other))
    return info


def _covered(parts: Sequence[Tuple[str, int]]) -> List[Dict]:
    """What ties the ANN to the embeddings: each part's file name, rows, size and mtime_ns."""
    out = []
    for path, rows in parts:
        st = os.stat(path)
        out.append({"name": os.path.basename(path), "rows": int(rows), "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns})
    return out


def build(folder: str, parts: Sequence[Tuple[str, int]], log=print, kind: Optional[str] = None,
          params: Optional[Dict] = None) -> Dict:
    """(index folder, [(embeddings .npy, rows)] in row order) -> the ann.json written.

    `kind` / `params` override `choose`'s (tests; experiments). A FaissMissing (one line)
    without faiss. Progress goes to `log`."""
    faiss = _faiss("search.py ann")
    start = time.time()
    maps = _open_parts(parts)
    n_rows, dim = sum(len(m) for m in maps), maps[0].shape[1] if maps else 0
    if not n_rows:
        raise ValueError(f"index {folder} holds no rows: nothing to build an ANN index of")
    chosen, p, why = choose(n_rows, dim)
    kind = kind or chosen
    if kind != chosen:
        p, why = (hnsw_params if kind == "hnsw" else ivfpq_params)(n_rows, dim), "asked for"
    p = dict(p, **(params or {}))
    log(f"ANN: {kind} over {n_rows:,} rows of {dim}: {why}")
    index, get = _new_index(faiss, kind, p, dim), rows_getter(maps)
    trained = _train(index, get, n_rows, p, log)
    _add(index, get, 0, n_rows, log)
    info = {"written_by": WRITTEN_BY, "kind": kind, "params": p, "why": why, "dim": dim,
            "rows": n_rows, "trained_rows": trained, "trained_at_rows": n_rows,
            "parts": _covered(parts), "faiss": faiss.__version__,
            "build_s": round(time.time() - start, 2), "extend_s": 0.0}
    info = _commit(folder, faiss, index, info)
    log(f"ANN: {info['file']} written ({info['bytes'] / n_rows:.0f} bytes a row, "
        f"{info['build_s']:.0f}s)")
    return info


def read_info(folder: str) -> Tuple[Optional[Dict], str]:
    """(ann.json of `folder` or None, why None)."""
    path = os.path.join(folder, ANN_JSON)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        return None, f"no ANN index in {folder} (`search.py ann` builds one)"
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({e}); `search.py ann` builds it again"
    keys = ("kind", "params", "dim", "rows", "parts", "file")
    if not isinstance(info, dict) or info.get("written_by") != WRITTEN_BY or any(
            k not in info for k in keys) or not MINE.match(str(info["file"])):
        return None, f"{path} is damaged; `search.py ann` builds it again"
    return info, ""


def stale(info: Dict, parts: Sequence[Tuple[str, int]]) -> str:
    """Why the ANN no longer matches the parts ("" if its covered parts are still the first
    parts, unchanged: rows appended after them are not stale, `extend` adds them)."""
    covered = info["parts"]
    for i, c in enumerate(covered):
        if i >= len(parts):
            return (f"stale: {c['name']} is no longer in the index (it has fewer rows than the "
                    f"{info['rows']:,} the ANN covers)")
        path, rows = parts[i]
        name = os.path.basename(path)
        if name != c["name"]:
            return f"stale: {c['name']} was replaced by {name}"
        try:
            st = os.stat(path)
        except OSError:
            return f"stale: {name} is missing"
        if (st.st_size, st.st_mtime_ns) != (c["size"], c["mtime_ns"]):
            return f"stale: {name} changed (size or mtime) since the ANN index was built"
        grown = c.get("prefix") and i == len(covered) - 1 and rows > c["rows"]
        if rows != c["rows"] and not grown:  # a prefix (follow): rows appended after it are new
            return f"stale: {name} holds {rows:,} rows, the ANN index covers {c['rows']:,}"
    return ""


@dataclass
class Ann:
    """An ANN index opened for queries: it covers rows 0..rows-1 of the total rows."""
    index: object
    info: Dict
    rows: int
    total: int


def _read_index(faiss, path: str, kind: str):
    """IVF lists memory-mapped (only the centroids and codebooks are read: 26 MB, ~3 ms at 10M
    rows; mapping them too, IO_FLAG_MMAP_IFC, took 13 ms to set up the 12,649 lists' views), a
    query's lists shared among the threads; an HNSW index whole, its codes mapped where faiss
    can."""
    if kind != "ivfpq":
        return faiss.read_index(path, getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
    index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    # faiss's default shares the queries out among the threads: one query, one thread. Sharing
    # its lists instead (each thread its own heap, merged) took the search of 126 lists of 10M
    # rows from ~15 to ~12 ms on 2 cores; the candidates are the same.
    index.parallel_mode = 1
    return index


def open_ann(folder: str, parts: Sequence[Tuple[str, int]]) -> Tuple[Optional[Ann], str]:
    """(index folder, [(npy, rows)] now) -> (Ann, note) or (None, why brute force instead).

    The note says when rows after the covered ones will be scored exactly."""
    for attempt in range(2):
        info, why = read_info(folder)
        if info is None:
            return None, why
        why = stale(info, parts)
        if why:
            return None, f"the ANN index is {why}; `search.py ann` rebuilds it"
        try:
            faiss = _faiss("the ANN index")
        except FaissMissing as e:
            return None, f"{e} (searching exactly)"
        try:
            index = _read_index(faiss, os.path.join(folder, info["file"]), info["kind"])
            break
        except RuntimeError as e:  # a build committed a new pair just now and removed this one
            if attempt:
                return None, f"cannot read {info['file']} ({str(e).splitlines()[0]})"
    if index.ntotal != info["rows"] or index.d != info["dim"]:
        return None, (f"{info['file']} holds {index.ntotal:,} rows of {index.d}, ann.json says "
                      f"{info['rows']:,} of {info['dim']}: damaged; `search.py ann` rebuilds it")
    total = sum(rows for _, rows in parts)
    note = "" if total == info["rows"] else (
        f"the ANN index covers {info['rows']:,} of {total:,} rows: the {total - info['rows']:,} "
        f"newer ones are scored exactly (`search.py ann` adds them)")
    return Ann(index, info, info["rows"], total), note


def exact(get, rows: np.ndarray, query: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(rows (n,) ascending, query (E,)) -> the k best (rows int64, float32 scores), best first,
    ties by row: float32 dot products of the float16 rows, as query.top_k's; BLOCK at a time."""
    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    best_rows, best_scores = np.empty(0, np.int64), np.empty(0, np.float32)
    for at in range(0, len(rows), BLOCK):
        block = np.asarray(rows[at:at + BLOCK], dtype=np.int64)
        scores = (float32(get(block)) @ q).numpy()
        best_rows = np.concatenate([best_rows, block])
        best_scores = np.concatenate([best_scores, scores])
        order = np.lexsort((best_rows, -best_scores))[:k]
        best_rows, best_scores = best_rows[order], best_scores[order]
    return best_rows, best_scores


def search(ann: Ann, get, query: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(Ann, get(rows ascending) -> (n, E) float16, query (E,), k) -> (rows int64, scores
    float32), best first, ties by row, as query.top_k returns them.

    The ANN proposes factor x k candidates; they, and every row after the covered ones, are
    scored exactly."""
    p, q = ann.info["params"], np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    if q.shape[1] != ann.info["dim"]:
        raise ValueError(f"a query of {q.shape[1]} dimensions; the index holds {ann.info['dim']}")
    want = min(ann.rows, k * p["factor"])
    faiss = _faiss("the ANN index")
    if ann.info["kind"] == "hnsw":
        params = faiss.SearchParametersHNSW(efSearch=max(p["ef_search"], want))
    else:
        params = faiss.SearchParametersIVF(nprobe=p["nprobe"])
    ids = ann.index.search(q, want, params=params)[1][0] if want else np.empty(0, np.int64)
    rows = np.concatenate([np.unique(ids[ids >= 0]), np.arange(ann.rows, ann.total)])
    return exact(get, rows, q[0], k)


def current(folder: str, parts: Sequence[Tuple[str, int]]) -> bool:
    """Whether `folder` has an ANN index that is current for `parts` (not stale)."""
    info, _ = read_info(folder)
    return info is not None and not stale(info, parts)


def follow(folder: str, path: str, kept_rows: int) -> bool:
    """After a commit whose new embeddings file `path` starts with `kept_rows` rows of the file
    the ANN covered (store.commit), while it was current: tie the ANN to the first rows of `path`
    (True), so the rows after them are scored exactly and `extend` adds them; False where the
    ANN covers more than those rows (it stays stale: rebuild)."""
    info, _ = read_info(folder)
    if info is None or len(info["parts"]) != 1 or info["rows"] > kept_rows:
        return False
    st = os.stat(path)
    write_json(os.path.join(folder, ANN_JSON), dict(info, parts=[{
        "name": os.path.basename(path), "rows": info["rows"], "size": st.st_size,
        "mtime_ns": st.st_mtime_ns, "prefix": True}]))
    return True


def extend(folder: str, parts: Sequence[Tuple[str, int]], log=print) -> Dict:
    """Add the rows after the covered ones to the trained ANN index, without a rebuild -> the
    new ann.json. A ValueError if there is no ANN index or it is stale (rebuild it then)."""
    faiss = _faiss("adding rows to the ANN index")
    info, why = read_info(folder)
    why = why or stale(info, parts)
    if why:
        raise ValueError(f"cannot add rows to the ANN index: {why}")
    maps, start = _open_parts(parts), time.time()
    total = sum(len(m) for m in maps)
    if total == info["rows"]:
        return info
    index = faiss.read_index(os.path.join(folder, info["file"]))
    _add(index, rows_getter(maps), info["rows"], total, log)
    grown = total / info["trained_at_rows"]
    if (info["kind"] == "hnsw" and total >= HNSW_MAX_ROWS) or grown > 4:
        log(f"ANN: now {total:,} rows, {grown:.1f}x those it was built for: `search.py ann` "
            f"would choose its parameters anew (rebuild when convenient)")
    info = dict(info, rows=total, parts=_covered(parts),
                extend_s=round(info.get("extend_s", 0.0) + time.time() - start, 2))
    info = _commit(folder, faiss, index, info)
    log(f"ANN: {info['file']} written ({total:,} rows)")
    return info
