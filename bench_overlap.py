"""How overlap.py's thresholds were chosen, and how fast `python -m mrs_adapter.data overlap` is.

    python bench_overlap.py measure --n 300   # distances of true copies and of distinct demo scenes
    python bench_overlap.py time --n 10921    # an RSICD-sized set of 224x224 JPEGs, cold and cached

measure: every demo scene (256 and 64 px) against its JPEG (quality 75), 256 -> 224 -> 256 and
224 + JPEG copies, and all pairs of distinct scenes (same-class pairs: same ground, water, roads)
and of flat noise textures, with how many the thresholds call copies. time: writes a generated
"rsicd" (train + test, 1% of the training images planted copies of test images: JPEG quality 75
at 224 px from 256 px originals) in a temporary folder, runs the command twice, deletes it.
"""
import argparse
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

from mrs_adapter.demo import captions, render, sample_scene
from mrs_adapter.overlap import HAMMING_THRESHOLD, THUMB_THRESHOLD, Hashes, hash_image


def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def copies(image: Image.Image) -> Dict[str, Image.Image]:
    """The near copies the hash must survive: JPEG quality 75, 256 -> 224 -> 256, and 224 + JPEG."""
    w, h = image.size
    small = image.resize((w * 7 // 8, h * 7 // 8), Image.Resampling.BICUBIC)  # 256 -> 224
    return {"jpeg75": jpeg(image), "resized": small.resize((w, h), Image.Resampling.BICUBIC),
            "resized_jpeg75": jpeg(small)}


def hashes_of(images: Sequence[Image.Image]) -> Hashes:
    values = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the hash sees exactly these pixels
        buffer.seek(0)
        values.append(hash_image(buffer))
    thumbs = np.frombuffer(b"".join(v[2] for v in values), np.uint8).reshape(len(values), 192)
    return Hashes([v[0] for v in values], np.array([v[1] for v in values], np.uint64), thumbs)


def distances(a: Hashes, b: Hashes, i: np.ndarray, j: np.ndarray):
    """(Hamming distances, thumbnail distances) of the pairs a[i], b[j]."""
    hamming = np.bitwise_count(a.phash[i] ^ b.phash[j])
    thumb = np.abs(a.thumb[i].astype(np.int16) - b.thumb[j].astype(np.int16)).mean(1)
    return hamming, thumb


def flagged(hamming: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    return (hamming <= HAMMING_THRESHOLD) & (thumb <= THUMB_THRESHOLD)


def measure(n: int, size: int, seed: int = 0) -> Dict:
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [render(s, size, rng) for s in scenes]
    base, out, own = hashes_of(images), {}, np.arange(n)
    for kind in ("jpeg75", "resized", "resized_jpeg75"):
        hamming, thumb = distances(base, hashes_of([copies(x)[kind] for x in images]), own, own)
        out[f"copies {kind}"] = {"hamming max": int(hamming.max()),
                                 "hamming p99": float(np.percentile(hamming, 99)),
                                 "thumb max": round(float(thumb.max()), 2),
                                 "detected": f"{int(flagged(hamming, thumb).sum())}/{n}"}
    i, j = np.triu_indices(n, 1)
    hamming, thumb = distances(base, base, i, j)
    klass = [(s["ground"], s["water"], s["road"]) for s in scenes]
    same = np.array([klass[a] == klass[b] for a, b in zip(i, j)])
    for name, mask in (("distinct, all pairs", np.ones_like(same)), ("distinct, same class", same)):
        close = mask & (hamming <= HAMMING_THRESHOLD)
        out[name] = {"pairs": int(mask.sum()), "hamming min": int(hamming[mask].min()),
                     "hamming p1": float(np.percentile(hamming[mask], 1)),
                     f"thumb min where hamming <= {HAMMING_THRESHOLD}":
                         round(float(thumb[close].min()), 2) if close.any() else None,
                     "false positives": int((flagged(hamming, thumb) & mask).sum())}
    noise = np.random.default_rng(seed)
    # one colour each: the thumbnails agree, only the pHash can tell them apart
    flat = [np.clip(noise.normal(128, 8, (size, size, 3)), 0, 255) for _ in range(n)]
    textures = hashes_of([Image.fromarray(x.astype(np.uint8)) for x in flat])
    hamming, thumb = distances(textures, textures, i, j)
    out["distinct noise textures"] = {"pairs": len(i), "hamming min": int(hamming.min()),
                                      "false positives": int(flagged(hamming, thumb).sum())}
    return out


def write_rsicd_like(root: str, n: int, seed: int = 0, threads: int = 2) -> int:
    """`n` 224x224 JPEGs in the precomp layout as `rsicd` (10% test); 1% of the training images
    are copies of test images (a 256 px scene, resized to 224 and saved at quality 75).
    Returns the number of planted copies."""
    rng = random.Random(seed)
    n_test = n // 10
    n_copies = (n - n_test) // 100
    scenes = [sample_scene(rng) for _ in range(n - n_copies)]
    seeds = [rng.getrandbits(32) for _ in scenes]
    folder = os.path.join(root, "rsicd_images")
    os.makedirs(folder)
    os.makedirs(os.path.join(root, "rsicd_precomp"))

    def write(k: int):
        image = render(scenes[k], 256, random.Random(seeds[k]))
        image = image.resize((224, 224), Image.Resampling.BICUBIC)
        image.save(os.path.join(folder, f"{k:05d}.jpg"), quality=90)
        if k < n_copies:  # test image k's copy, re-encoded at quality 75 under another name
            jpeg(image).save(os.path.join(folder, f"copy_{k:05d}.jpg"), quality=95)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(len(scenes))))
    planted = [f"copy_{k:05d}.jpg" for k in range(n_copies)]
    names = {"test": [f"{k:05d}.jpg" for k in range(n_test)],
             "train": [f"{k:05d}.jpg" for k in range(n_test, len(scenes))] + planted}
    for split, files in names.items():
        caps = [c for k, _ in enumerate(files) for c in captions(sample_scene(rng), rng)]
        listed = files if split == "train" else [f for f in files for _ in range(5)]
        for kind, lines in (("caps", caps), ("filename", listed)):
            with open(os.path.join(root, "rsicd_precomp", f"{split}_{kind}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
    return n_copies


def time_overlap(n: int, threads: int) -> List[str]:
    report = []
    with tempfile.TemporaryDirectory(prefix="overlap-bench-") as root:
        start = time.time()
        planted = write_rsicd_like(root, n, threads=threads)
        seconds = time.time() - start
        report.append(f"generated {n} images ({planted} planted copies) in {seconds:.0f}s")
        command = [sys.executable, "-m", "mrs_adapter.data", "overlap", "--datasets", "rsicd",
                   "--data-root", root, "--csv", os.path.join(root, "overlap.csv"),
                   "--threads", str(threads)]
        for run in ("cold", "cached"):
            start = time.time()
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            report.append(f"{run}: {time.time() - start:.1f}s wall")
            report += [line for line in out.splitlines() if line.startswith("rsicd/")]
        with open(os.path.join(root, "overlap.csv")) as f:
            rows = [line.split(",") for line in f.read().splitlines()[1:]]
        found = {(a[2], a[5]) for a in rows if a[6] in ("exact", "near")}
        want = {(f"{k:05d}.jpg", f"copy_{k:05d}.jpg") for k in range(planted)}
        hits = sum(pair in found or pair[::-1] in found for pair in want)
        report.append(f"planted copies found: {hits}/{planted}; "
                      f"other image pairs flagged: {len(found) - hits}")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["measure", "time"])
    p.add_argument("--n", type=int, help="images (measure: 300; time: 10921, RSICD's count)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.what == "measure":
        print(f"thresholds: Hamming <= {HAMMING_THRESHOLD} of 63 bits, "
              f"thumbnail <= {THUMB_THRESHOLD}")
        for size in (256, 64):
            print(f"{args.n or 300} demo scenes at {size}x{size} px:")
            for name, figures in measure(args.n or 300, size).items():
                print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    else:
        print("\n".join(time_overlap(args.n or 10921, args.threads)))


if __name__ == "__main__":
    main()
