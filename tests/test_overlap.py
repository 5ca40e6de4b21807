"""overlap.py on generated images: copies (exact, JPEG quality 75, resized) are found, distinct
scenes are not; the `overlap` command's counts, CSV and hash cache; check_dataset's report."""
import csv
import io
import os
import random
import shutil

import numpy as np
from PIL import Image

from mrs_adapter.data import load_splits
from mrs_adapter.demo.scenes import render, sample_scene
from mrs_adapter.prepare import overlap
from mrs_adapter.prepare.check import check_dataset
from mrs_adapter.prepare.cli import main as _main
from mrs_adapter.prepare.overlap import Hashes, copies_of, hash_image, hash_images, near_pairs


def hashes(images):
    values = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        buffer.seek(0)
        values.append(hash_image(buffer))
    return Hashes.of(values)


def jpeg(image, quality=75):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_16_bit_images_are_hashed_as_the_model_sees_them():
    """Two different 12-bit scenes are no copies: hashed through datasets.read_image (stretched),
    not PIL's convert("RGB"), which clips both to white, the same pixels."""
    rng = np.random.default_rng(0)
    scenes = [Image.fromarray((1000 + 3000 * rng.random((64, 64))).astype(np.uint16))
              for _ in range(2)]
    assert scenes[0].mode.startswith("I;16")
    assert scenes[0].convert("RGB").tobytes() == scenes[1].convert("RGB").tobytes()  # the trap
    h = hashes(scenes)
    assert h.exact[0] != h.exact[1] and len(near_pairs(h)[0]) == 0


def test_copies_are_found_and_distinct_scenes_are_not():
    rng = random.Random(1)
    scenes = [sample_scene(rng) for _ in range(24)]
    for a, b in zip(scenes[:12], scenes[12:]):  # 12 pairs of one class: same ground, water, roads
        b.update({k: a[k] for k in ("ground", "water", "road")})
    originals = [render(s, 256, rng) for s in scenes]
    base = hashes(originals)
    copies = {"jpeg75": [jpeg(x) for x in originals],
              "224": [x.resize((224, 224), Image.Resampling.BICUBIC) for x in originals],
              "224_jpeg75": [jpeg(x.resize((224, 224), Image.Resampling.BICUBIC))
                             for x in originals]}
    for kind, images in copies.items():
        found = copies_of(hashes(images), base)
        assert found.tolist() == list(range(24)), kind
        i, j, _ = near_pairs(hashes(images), base)
        assert (i == j).all(), kind  # each copy matches its own original only
    # exact: the same pixels in another file format; a one-pixel change is not exact
    changed = originals[0].copy()
    changed.putpixel((0, 0), (0, 0, 0))
    again = hashes([originals[0].copy(), changed])
    assert again.exact[0] == base.exact[0] and again.exact[1] != base.exact[0]
    # negative control: 24 distinct scenes, 12 pairs of one class, give no pair at all
    assert len(near_pairs(base)[0]) == 0 and len(copies_of(base, hashes(originals[:0]))) == 0


def test_flat_images_of_other_colours_are_not_copies():
    # a flat image's DCT hash is uninformative (all pHashes alike); the colour thumbnail decides
    flats = [Image.new("RGB", (64, 64), c) for c in [(10, 120, 30), (200, 40, 40), (12, 121, 31)]]
    i, j, _ = near_pairs(hashes(flats))
    assert list(zip(i.tolist(), j.tolist())) == [(0, 2)]


def test_demo_set_has_no_false_positives(demo):
    root, _ = demo
    paths = [p for split in load_splits("demo", root).values() for p in split.image_paths]
    assert len(paths) == 210 and len(near_pairs(hash_images(paths))[0]) == 0


def test_overlap_command_counts_csv_and_cache(two_datasets, tmp_path, capsys, monkeypatch):
    source, copies = two_datasets
    root = str(tmp_path / "data")
    shutil.copytree(source, root)
    out = str(tmp_path / "overlap.csv")
    command = ["overlap", "--datasets", "rsitmd", "rsicd", "--data-root", root]
    assert _main(command + ["--csv", out]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    found = {(r["file_a"], r["file_b"]) if r["dataset_a"] == "rsicd" else (r["file_b"], r["file_a"])
             for r in rows if r["kind"] in ("exact", "near") and r["dataset_a"] != r["dataset_b"]}
    want = {(c, s) if c.startswith("rsicd") else (s, c) for c, s in copies.items()}
    assert found == want
    kinds = {(r["file_a"], r["file_b"]): (r["kind"], r["distance"]) for r in rows}
    for c, s in copies.items():
        kind = kinds.get((s, c), kinds.get((c, s)))[0]
        assert kind == ("exact" if c.endswith(".tif") else "near")
    assert not [r for r in rows if r["kind"] != "caption" and r["dataset_a"] == r["dataset_b"]]
    # the count table: a line per pair of splits; the copies sit in rsitmd/test x rsicd/train or val
    lines = {tuple(w[:2]): w[2:] for w in map(str.split, printed.splitlines())
             if len(w) == 5 and "/" in w[0] and "/" in w[1]}
    assert len(lines) == 21  # 6 splits: 6 * 7 / 2 pairs
    tests = {"rsitmd/test", "rsicd/test"}
    assert sum(int(v[0]) + int(v[1]) for k, v in lines.items() if set(k) & tests) == 7
    # rerun: every hash from the cache, no image decoded
    monkeypatch.setattr(overlap, "hash_image", lambda path: 1 / 0)
    assert _main(command) == 0
    assert "hashed" not in capsys.readouterr().out
    # a changed file is hashed again
    path = os.path.join(root, "rsitmd_images", "rsitmd_test_7.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    os.utime(path, ns=(1, 1))
    monkeypatch.undo()
    assert hash_images([path], overlap.default_cache(root)).thumb[0, :3].tolist() == [1, 2, 3]


def test_check_reports_a_near_copy_across_splits(two_datasets, tmp_path):
    source, _ = two_datasets
    root = str(tmp_path / "data")
    shutil.copytree(source, root)
    assert check_dataset("rsicd", root) == []  # its copies are of rsitmd images: none inside rsicd
    images = os.path.join(root, "rsicd_images")
    copy = jpeg(Image.open(os.path.join(images, "rsicd_test_3.png")))
    copy.save(os.path.join(images, "rsicd_train_5.png"))
    problems = [str(p) for p in check_dataset("rsicd", root)]
    assert len(problems) == 1 and problems[0].startswith("warning")
    want = "test_filename.txt:16: rsicd_test_3.png (test) is a near copy (pHash distance"
    assert want in problems[0]
    assert problems[0].endswith("of rsicd_train_5.png (train)")
