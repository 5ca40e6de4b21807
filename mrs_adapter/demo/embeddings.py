"""Generated tile embeddings with cluster structure, for benchmarking search at archive scale.

How they are made (deterministic given the seed):
- `n_clusters` centres, uniform on the unit sphere of `dim` dimensions; each has a weight drawn
  from a log-normal (sigma 1), so cluster sizes are uneven (the largest ~20x the median), as
  farmland or forest outnumbers airports in an archive.
- a row picks a cluster by weight and is that centre plus isotropic gaussian noise of total
  norm ~`spread` (sigma = spread / sqrt(dim) per coordinate), normalised, stored as float16.
  With spread 0.5: a row's cosine with its centre is ~0.89, two rows of one cluster ~0.8,
  rows of two clusters ~0.
- queries are drawn the same way (their own random stream), so each has a dense cluster of
  near neighbours and its top 20 are decided by the small noise terms: the hard case for an
  approximate index, and harder with more rows, since the clusters do not grow in number.
Why this resembles real tile embeddings: an archive holds many near-duplicate tiles of the
same land cover (neighbouring fields, sea, forest), which embed close together, and few
kinds of land cover; uniform noise on the sphere has no neighbours worth the name.

Streamed in blocks of `block` rows: 10M x 512 rows are never in memory as float32 at once.
"""
import os
from typing import Tuple

import numpy as np

from ..atomic import atomic_write

N_CLUSTERS, SPREAD, BLOCK = 1000, 0.5, 65536


def centres(dim: int, n_clusters: int = N_CLUSTERS, seed: int = 0
            ) -> Tuple[np.ndarray, np.ndarray]:
    """(centres (C, dim) float32 unit rows, weights (C,) float64 summing to 1) for `seed`."""
    rng = np.random.default_rng([seed, 0])
    c = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    w = rng.lognormal(0.0, 1.0, n_clusters)
    return c, w / w.sum()


def draw(rng: np.random.Generator, c: np.ndarray, w: np.ndarray, n: int,
         spread: float = SPREAD) -> np.ndarray:
    """(n, dim) float32 unit rows: a centre chosen by weight + gaussian noise of norm ~spread."""
    labels = rng.choice(len(c), size=n, p=w)
    x = rng.standard_normal((n, c.shape[1]), dtype=np.float32)
    x *= np.float32(spread / np.sqrt(c.shape[1]))
    x += c[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_embeddings(path: str, n_rows: int, dim: int = 512, n_clusters: int = N_CLUSTERS,
                     spread: float = SPREAD, seed: int = 0, block: int = BLOCK) -> str:
    """(path, rows, dim, ...) -> path: an (n_rows, dim) float16 .npy of clustered unit rows.

    Written block by block (each block its own random stream, [seed, 1, block number]) and
    atomically: a killed run leaves no half file."""
    c, w = centres(dim, n_clusters, seed)

    def write(f):
        header = {"descr": "<f2", "fortran_order": False, "shape": (n_rows, dim)}
        np.lib.format.write_array_header_1_0(f, header)
        for b, start in enumerate(range(0, n_rows, block)):
            rng = np.random.default_rng([seed, 1, b])
            rows = draw(rng, c, w, min(block, n_rows - start), spread)
            f.write(rows.astype("<f2").tobytes())
    atomic_write(os.fspath(path), write, mode="wb")
    return os.fspath(path)


def queries(n: int, dim: int = 512, n_clusters: int = N_CLUSTERS, spread: float = SPREAD,
            seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit query vectors drawn as the rows are, from their own stream."""
    c, w = centres(dim, n_clusters, seed)
    return draw(np.random.default_rng([seed, 2]), c, w, n, spread)
