"""A query made of several examples: "more like these, not like those".

Positives (texts, --image, --like hits) and negatives (--not, --unlike hits) are combined as
Earth Index and GeoVibes do: twice the mean of the positives minus the mean of the negatives,
normalised (FORMULA). Each example is an embedding of the index's model; the index ranks its
tiles by the dot product with the result, as for a single text.
"""
from typing import List, Sequence

import numpy as np

FORMULA = ("q = normalise(2 * mean(positives) - mean(negatives)), each example L2-normalised "
           "first; without negatives q = normalise(mean(positives))")


def unit_rows(examples: Sequence[np.ndarray], what: str) -> np.ndarray:
    """(n, E) float64: each example (E,) divided by its L2 norm; a zero or non-finite one is an
    error naming it ("positive 2")."""
    flat = [np.asarray(e, dtype=np.float64).reshape(-1) for e in examples]
    if len({len(e) for e in flat}) > 1:
        raise ValueError(f"the {what} examples have {sorted({len(e) for e in flat})} dimensions: "
                         f"embeddings of different models")
    rows = np.stack(flat)
    norms = np.linalg.norm(rows, axis=1)
    for i, norm in enumerate(norms):
        if not (np.isfinite(norm) and norm > 0):
            raise ValueError(f"{what} {i + 1} has no direction (norm {norm}): not an embedding")
    return rows / norms[:, None]


def combine_query(positives: Sequence[np.ndarray], negatives: Sequence[np.ndarray] = ()
                  ) -> np.ndarray:
    """(E,) float32 unit query from positives [(E,), ...] and negatives [(E,), ...] (FORMULA):

        q = (2 p - n) / |2 p - n|,  p = mean_i P_i / |P_i|,  n = mean_j N_j / |N_j|;  n = 0 if none

    The positives weigh twice as much as the negatives: a negative steers the query away without
    outvoting a positive. Refuses no positives, and examples that cancel out (q of zero length)."""
    if len(positives) == 0:
        raise ValueError("a query needs at least one positive example (a text, --image or "
                         "--like); --not and --unlike only steer it away")
    p = unit_rows(positives, "positive").mean(0)  # (E,)
    if len(negatives) == 0:
        q = p
    else:
        n = unit_rows(negatives, "negative")
        if n.shape[1] != p.shape[0]:
            raise ValueError(f"negatives have {n.shape[1]} dimensions, positives {p.shape[0]}: "
                             f"embeddings of different models")
        q = 2 * p - n.mean(0)
    norm = np.linalg.norm(q)
    if norm < 1e-6:
        raise ValueError(f"the examples cancel out (the combined query has length {norm:.1e}): "
                         f"add or remove examples")
    return (q / norm).astype(np.float32)


def describe_query(positives: List[str], negatives: List[str]) -> str:
    """The lines printed before the hits: which inputs made the query, and how."""
    if not negatives and len(positives) == 1:
        return f"query: {positives[0]}"
    formula = (f"normalise(mean of {len(positives)} positives)" if not negatives else
               f"normalise(2 x mean of {len(positives)} positives - mean of {len(negatives)} "
               f"negatives)")
    lines = [f"query = {formula}"]
    lines += [f"  + {p}" for p in positives] + [f"  - {n}" for n in negatives]
    return "\n".join(lines)
