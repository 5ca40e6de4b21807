"""Splits and datasets -> the images and captions they share: exact or near copies, same captions.

Why: RSITMD was built partly from RSICD's images, so a model trained on one and tested on the
other (or on their union) may be tested on images it trained on.
- Exact copies: a hash of the decoded pixels.
- Near copies: a 63-bit DCT perceptual hash within HAMMING_THRESHOLD bits,
  confirmed on an 8x8 colour thumbnail (a flat image's pHash says little; its colour does).

Thresholds, from `python speed_bench.py --only overlap-measure` (300 demo scenes, 256 px):
- copies (JPEG quality 75; 256 -> 224 -> 256; 224 + JPEG): Hamming <= 18, thumbnail <= 0.75;
- distinct scenes that close in Hamming differ by >= 4.2 in thumbnail (5.1 same-class);
- so 18 and 3.0 find 900/900 copies and 0 of 44,850 distinct pairs;
- flat noise textures of one colour, the worst case: 36 of 44,850.
"""
import argparse
import csv
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..atomic import atomic_write, check_output
from ..data import DATASETS, load_splits
from ..datasets import read_image
from ..demo import scenes as demo
from ..run.checks import check_counts, refuse_repeats
from .hash_cache import HashCache

HAMMING_THRESHOLD = 18  # pHash bits that may differ in a near copy (measured: see the docstring)
THUMB_THRESHOLD = 3.0  # mean |difference| of the 8x8 RGB thumbnails, in 0-255 levels
CAPTION_MAX_IMAGES = 20  # a caption on more images is a template ("many buildings ..."), not a leak


def _dct_matrix(n: int = 32) -> np.ndarray:
    """n -> (n, n) orthonormal DCT-II matrix D: D @ x transforms the columns of x."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


_DCT = _dct_matrix()


def phash(image: Image.Image) -> int:
    """Image -> 63-bit int: the 8x8 lowest DCT frequencies of a 32x32 grey copy, vs their median.

    - The DC term is left out; each bit: above or below the median.
    - Low frequencies survive JPEG and resizing.
    - The median makes it insensitive to brightness and contrast.
    """
    # bilinear resizing filters before it samples: stripes finer than the grid do not alias
    grey = image.convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    grey = np.asarray(grey, dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].flatten()[1:]  # (63,)
    bits = low > np.median(low)
    return int(np.packbits(np.concatenate([[False], bits])).view(">u8")[0])


def hash_pixels(rgb: Image.Image) -> Tuple[str, int, bytes]:
    """8-bit RGB image -> (blake2b of the pixels and size, pHash, 8x8 RGB thumbnail bytes)."""
    exact = hashlib.blake2b(rgb.tobytes(), digest_size=16)
    exact.update(f"{rgb.size}".encode())
    thumb = rgb.resize((8, 8), Image.Resampling.BOX).tobytes()  # (8, 8, 3) uint8
    return exact.hexdigest(), phash(rgb), thumb


def hash_image(path: str) -> Tuple[str, int, bytes]:
    """path -> hash_pixels of the image as the model sees it.

    datasets.read_image: 16-bit stretched.
    """
    return read_image(path, hash_pixels)


@dataclass
class Hashes:
    """Hashes of n images: exact[i] (hex), phash (n,) uint64, thumb (n, 192) uint8."""
    exact: List[str]
    phash: np.ndarray
    thumb: np.ndarray

    @classmethod
    def of(cls, values: Sequence[Tuple[str, int, bytes]]) -> "Hashes":
        """hash_image's values, one per image -> Hashes."""
        thumbs = np.frombuffer(b"".join(v[2] for v in values), np.uint8).reshape(len(values), 192)
        return cls([v[0] for v in values], np.array([v[1] for v in values], np.uint64), thumbs)

    def take(self, rows) -> "Hashes":
        """rows (a slice or an index array) -> the Hashes of those images, in that order."""
        rows = np.arange(len(self.exact))[rows]
        return Hashes([self.exact[k] for k in rows], self.phash[rows], self.thumb[rows])


def _attempt(path: str):
    """path -> (hash_image(path), None), or (None, the error naming the file) if unreadable."""
    try:
        return hash_image(path), None
    except (FileNotFoundError, ValueError) as e:
        return None, str(e)


def hash_images(paths: Sequence[str], cache: Optional[str] = None, threads: int = 2,
                progress: bool = False) -> Hashes:
    """paths -> Hashes, one per path, read from and added to the cache file `cache`.

    - Decoded in a thread pool (PIL releases the GIL).
    - A path listed twice is decoded once.
    - An image that cannot be read is a ValueError naming it,
      once every other one is hashed and cached.
    """
    unique = list(dict.fromkeys(paths))
    store, start = HashCache(cache), time.time()
    values: List = [store.get(p) for p in unique]
    todo, errors = [i for i, v in enumerate(values) if v is None], []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        computed = pool.map(lambda i: _attempt(unique[i]), todo)
        for n, (i, (value, error)) in enumerate(zip(todo, computed), 1):
            if error:
                errors.append(error)
                continue
            values[i] = value
            store.put(unique[i], value)
            if progress and (n % 1000 == 0 or n == len(todo)):
                rate = n / max(time.time() - start, 1e-9)
                print(f"hashed {n}/{len(todo)} images ({len(unique) - len(todo)} cached), "
                      f"{rate:.0f}/s, eta {(len(todo) - n) / rate:.0f}s", flush=True)
    store.save()
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValueError(f"{len(errors)} of {len(unique)} image(s) cannot be read: "
                         f"{errors[0]}{more}")
    where = {p: k for k, p in enumerate(unique)}
    return Hashes.of(values).take(np.array([where[p] for p in paths], dtype=int))


def near_pairs(a: Hashes, b: Optional[Hashes] = None, threshold: int = HAMMING_THRESHOLD,
               thumb_threshold: float = THUMB_THRESHOLD, block: int = 256):
    """Hashes a, b -> arrays (i, j, Hamming distance) of the near pairs a[i], b[j].

    - Near: within `threshold` bits, and the thumbnails agree.
    - b=None compares a with itself (i < j).
    - All pairs, `block` rows at a time (256 x 17,000 uint64 is 35 MB):
      17,000 images are 1.4e8 XOR + popcounts, a few seconds.
    """
    same, b = b is None, a if b is None else b
    found = []
    for start in range(0, len(a.phash), block):
        rows = a.phash[start:start + block]
        distance = np.bitwise_count(rows[:, None] ^ b.phash[None, :])  # (block, n_b) uint8
        if same:  # keep j > i only
            below = np.arange(len(rows))[:, None] + start >= np.arange(len(b.phash))[None, :]
            distance[below] = 255
        i, j = np.nonzero(distance <= threshold)
        i = i + start
        thumb = np.abs(a.thumb[i].astype(np.int16) - b.thumb[j].astype(np.int16)).mean(1)
        keep = thumb <= thumb_threshold
        found.append((i[keep], j[keep], distance[i[keep] - start, j[keep]]))
    if not found:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.uint8)
    return tuple(np.concatenate(x) for x in zip(*found))


def copies_of(candidates: Hashes, references: Hashes) -> np.ndarray:
    """(candidates, references) -> int indices of `candidates` that copy any of `references`.

    A copy: exact or near.
    """
    exact = set(references.exact)
    hit = {i for i, h in enumerate(candidates.exact) if h in exact}
    hit.update(near_pairs(candidates, references)[0].tolist())
    return np.array(sorted(hit), dtype=int)


def copy_pairs(hashes: Hashes) -> List[Tuple[int, int, str, int]]:
    """Hashes -> [(i, j, kind, distance)]: every pair of copies i < j, exact ones first.

    - (i, j, "exact", 0) for every pair i < j of identical pixels, in order;
    - then (i, j, "near", pHash distance) for every other pair that near_pairs finds.
    """
    groups = {}
    for i, h in enumerate(hashes.exact):
        groups.setdefault(h, []).append(i)
    exact = sorted((i, j) for members in groups.values()
                   for x, i in enumerate(members) for j in members[x + 1:])
    seen = set(exact)
    return [(i, j, "exact", 0) for i, j in exact] + [
        (int(i), int(j), "near", int(d)) for i, j, d in zip(*near_pairs(hashes))
        if (int(i), int(j)) not in seen]


def drop_copies(splits: Dict, references: Sequence[str], cache: Optional[str] = None,
                threads: int = 2) -> Tuple[Dict, Dict[str, int]]:
    """(splits, reference paths) -> (splits without the copies, {split name: images dropped}).

    - `splits`: {name: data.Split};
    - `references`: the test images;
    - dropped: the images that are exact or near copies of one of the `references`.
    """
    paths = [p for split in splits.values() for p in split.image_paths]
    hashes = hash_images(paths + list(references), cache, threads)
    n = len(paths)
    copies = set(copies_of(hashes.take(slice(n)), hashes.take(slice(n, None))).tolist())
    start, kept, dropped = 0, {}, {}
    for name, split in splits.items():
        keep = [i for i in range(len(split.image_paths)) if start + i not in copies]
        kept[name] = split.subset(split.name, keep)
        dropped[name] = len(split.image_paths) - len(keep)
        start += len(split.image_paths)
    return kept, dropped


def normalize_caption(caption: str) -> str:
    """Caption -> its normal form: lower case, single spaces, no final full stop.

    Case, spacing and a final full stop do not make a caption different.
    """
    return " ".join(caption.lower().split()).rstrip(" .")


def caption_pairs(groups: Sequence[int], captions: Sequence[Sequence[str]],
                  max_images: int = CAPTION_MAX_IMAGES) -> Dict[Tuple[int, int], int]:
    """(groups, captions) -> {(i, j): number of identical captions} for images i < j of two groups.

    - `groups`: the group (split) of each image; images of the same group are not paired;
    - captions[i]: image i's captions;
    - a caption on more than `max_images` images is skipped as a template.
    """
    images: Dict[str, set] = {}
    for i, caps in enumerate(captions):
        for c in caps:
            images.setdefault(normalize_caption(c), set()).add(i)
    shared: Dict[Tuple[int, int], int] = {}
    for owners in images.values():
        if 1 < len(owners) <= max_images:
            owners = sorted(owners)
            for x, i in enumerate(owners):
                for j in owners[x + 1:]:
                    if groups[i] != groups[j]:
                        shared[(i, j)] = shared.get((i, j), 0) + 1
    return shared


@dataclass
class Entry:
    """One image of one split of one dataset."""
    dataset: str
    split: str
    path: str
    captions: List[str]


def split_entries(dataset: str, splits: Dict) -> List[Entry]:
    """(dataset, splits) -> [Entry]: the images of `splits` with their captions.

    `splits`: {name: data.Split}.
    """
    entries = []
    for name, split in splits.items():
        caps: List[List[str]] = [[] for _ in split.image_paths]
        for caption, i in zip(split.captions, split.txt2img):
            caps[i].append(caption)
        entries += [Entry(dataset, name, p, c) for p, c in zip(split.image_paths, caps)]
    return entries


def find_overlaps(entries: Sequence[Entry], cache: Optional[str] = None, threads: int = 2,
                  progress: bool = True) -> List[Tuple[int, int, str, int]]:
    """Entries -> (i, j, kind, distance) for every pair of entries i < j that overlap.

    Kinds: exact copies (distance 0),
    near copies (distance: the pHash Hamming distance),
    or entries of different splits that share captions (distance: the number of identical captions).
    A pair that is an exact copy is not listed as near again.
    """
    rows = copy_pairs(hash_images([e.path for e in entries], cache, threads, progress))
    group = [(e.dataset, e.split) for e in entries]
    shared = caption_pairs(group, [e.captions for e in entries])
    rows += [(i, j, "caption", n) for (i, j), n in sorted(shared.items())]
    return rows


def pair_counts(entries: Sequence[Entry], rows) -> Dict[Tuple[str, str], Dict[str, int]]:
    """(entries, rows) -> {("ds/split", "ds/split"): {kind: count}}.

    For every unordered pair of splits (a split with itself too).
    """
    names = list(dict.fromkeys(f"{e.dataset}/{e.split}" for e in entries))
    counts = {(a, b): {"exact": 0, "near": 0, "caption": 0}
              for x, a in enumerate(names) for b in names[x:]}
    for i, j, kind, _ in rows:
        a, b = sorted((f"{entries[k].dataset}/{entries[k].split}" for k in (i, j)), key=names.index)
        counts[(a, b)][kind] += 1
    return counts


CSV_HEADER = ["dataset_a", "split_a", "file_a", "dataset_b", "split_b", "file_b", "kind",
              "distance"]


def is_overlap_csv(path: str) -> bool:
    """path -> whether it starts with write_csv's header: a file this command may replace."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), None) == CSV_HEADER
    except (OSError, ValueError, csv.Error):
        return False


def write_csv(path: str, entries: Sequence[Entry], rows):
    def write(f):
        out = csv.writer(f)
        out.writerow(CSV_HEADER)
        for i, j, kind, distance in rows:
            a, b = entries[i], entries[j]
            out.writerow([a.dataset, a.split, os.path.basename(a.path), b.dataset, b.split,
                          os.path.basename(b.path), kind, distance])
    atomic_write(path, write)


def main(argv: Optional[List[str]] = None) -> int:
    """argv -> exit code 0: overlap counts per pair of splits printed; every pair of files in --csv.

        python -m mrs_adapter.prepare overlap --datasets rsitmd rsicd --data-root data --csv o.csv
    """
    parser = argparse.ArgumentParser(prog="python -m mrs_adapter.prepare overlap",
                                     description=find_overlaps.__doc__)
    parser.add_argument("--datasets", nargs="+", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--csv", help="one row per pair of files")
    parser.add_argument("--cache", help="hash cache file (default: <data-root>/.image_hashes.json)")
    parser.add_argument("--threads", type=int, default=2, help="image decoding threads")
    args = parser.parse_args(argv)
    refuse_repeats("--datasets", args.datasets)  # a dataset against itself: every image a copy
    check_counts({"--threads": (args.threads, 1)})
    if args.csv:  # before any image is hashed: a path that cannot be written, a file not ours
        check_output(args.csv, "--csv", is_overlap_csv, "the overlap command")
    start, entries = time.time(), []
    for name in args.datasets:
        if name == "demo":
            demo.prepare(args.data_root)
        entries += split_entries(name, load_splits(name, args.data_root))
    try:
        rows = find_overlaps(entries, args.cache or default_cache(args.data_root), args.threads)
    except ValueError as e:  # unreadable images
        raise ValueError(f"{e}; `python -m mrs_adapter.prepare check --dataset <name> "
                         f"--data-root {args.data_root}` lists every problem") from e
    print(f"{'split a':<16} {'split b':<16} {'exact':>6} {'near':>6} {'caption':>8}")
    for (a, b), n in pair_counts(entries, rows).items():
        print(f"{a:<16} {b:<16} {n['exact']:>6} {n['near']:>6} {n['caption']:>8}")
    if args.csv:
        write_csv(args.csv, entries, rows)
        print(f"wrote {len(rows)} pairs to {args.csv}")
    print(f"{len(entries)} images compared in {time.time() - start:.1f}s")
    return 0


def default_cache(data_root: str) -> str:
    return os.path.join(data_root, ".image_hashes.json")

