"""Readers on generated fixtures laid out like the real datasets, the split rule, the image cache,
check_dataset's problem reports, and the demo generator."""
import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mrs_adapter.clip import transform
from mrs_adapter.data import load_splits, validation_split
from mrs_adapter.datasets import CaptionDataset, ImageDataset, TrainDataset
from mrs_adapter.demo.scenes import GROUNDS, make_demo
from mrs_adapter.prepare.check import check_dataset
from mrs_adapter.prepare.cli import main as _main


def assert_aligned(split):
    for caption, i in zip(split.captions, split.txt2img):
        assert caption.endswith(" of " + os.path.basename(split.image_paths[i]))


def test_precomp_counts_alignment_and_split_rule(make_precomp, tmp_path):
    make_precomp(tmp_path, n_train=10, n_test=3)
    splits = load_splits("rsitmd", str(tmp_path))
    sizes = [(len(s.image_paths), len(s.captions)) for s in splits.values()]
    assert sizes == [(8, 40), (2, 10), (3, 15)]
    for split in splits.values():
        assert_aligned(split)
    random.seed(2)  # the published rule, with the global RNG
    idx = list(range(10))
    random.shuffle(idx)
    names = [os.path.basename(p) for p in splits["train"].image_paths + splits["val"].image_paths]
    assert names == [f"trainscene_{i}.tif" for i in idx]


def test_validation_split_rsitmd_sizes_and_global_rng_untouched():
    random.seed(2)
    idx = list(range(4291))
    random.shuffle(idx)
    random.seed(123)
    before = random.random()
    train, val = validation_split(4291)
    random.seed(123)
    assert random.random() == before  # the local Random(2) did not consume the global stream
    assert (len(train), len(val)) == (3432, 859) and train + val == idx


def test_filename_lists_in_either_form(make_precomp, write_lines, tmp_path):
    # swap the forms: train one name per caption, test one per image; the reader accepts both
    text = make_precomp(tmp_path, n_train=4, n_test=2)
    for split, per_caption in (("train", True), ("test", False)):
        path = os.path.join(text, f"{split}_filename.txt")
        names = list(dict.fromkeys(open(path).read().split()))
        write_lines(path, [x for x in names for _ in range(5)] if per_caption else names)
    splits = load_splits("rsitmd", str(tmp_path))
    assert len(splits["test"].image_paths) == 2 and len(splits["train"].image_paths) == 3
    for split in splits.values():
        assert_aligned(split)


def test_json_layout_uses_its_own_splits(make_json_dataset, tmp_path):
    make_json_dataset(tmp_path, counts=[5, 1, 7, 5, 5, 5, 5, 5, 5, 5, 5])
    splits = load_splits("sydney", str(tmp_path))  # Sydney's default layout is json
    assert [os.path.basename(p) for p in splits["val"].image_paths] == ["6.tif", "7.tif"]
    assert [os.path.basename(p) for p in splits["test"].image_paths] == ["8.tif", "9.tif", "10.tif"]
    assert len(splits["train"].captions) == 5 + 1 + 7 + 15
    for split in splits.values():
        assert_aligned(split)


def test_json_without_val_falls_back_to_the_rule(make_json_dataset, tmp_path):
    make_json_dataset(tmp_path, name="rsitmd", splits=("train",) * 10 + ("test",) * 2)
    splits = load_splits("rsitmd", str(tmp_path), layout="json")
    train_idx, val_idx = validation_split(10)
    assert [os.path.basename(p) for p in splits["val"].image_paths] == [f"{i}.tif" for i in val_idx]


def test_datasets_and_cache_give_identical_tensors(make_precomp, image_colour, tmp_path):
    make_precomp(tmp_path, n_train=5, n_test=2)
    split = load_splits("rsitmd", str(tmp_path))["train"]
    plain = TrainDataset(split, transform(32))
    cached = TrainDataset(split, transform(32), cache=True, threads=2)
    assert len(plain) == 20
    for j in range(len(plain)):
        (a, ta, ia), (b, tb, ib) = plain[j], cached[j]
        assert torch.equal(a, b) and torch.equal(ta, tb) and ia == ib == split.txt2img[j]
    # the pixels are those of the caption's image (colour(name), normalised by CLIP's mean/std)
    image, _, i = plain[7]
    assert image.shape == (3, 32, 32)
    want = torch.tensor(image_colour(os.path.basename(split.image_paths[i]))) / 255
    assert torch.allclose(image[:, 16, 16] * torch.tensor(transform(32).transforms[-1].std)
                          + torch.tensor(transform(32).transforms[-1].mean), want, atol=1e-3)
    # forked DataLoader workers read the cache filled in the main process
    batch = next(iter(DataLoader(cached, batch_size=20, num_workers=2)))
    assert torch.equal(batch[0], torch.stack([plain[j][0] for j in range(20)]))
    assert len(ImageDataset(split, transform(32))) == 4
    assert CaptionDataset(split, 77)[0].shape == (77,)


def test_problems_are_reported_with_their_file(make_precomp, write_lines, tmp_path):
    text = make_precomp(tmp_path, n_train=6, n_test=3)
    images = os.path.join(tmp_path, "rsitmd_images")
    os.remove(os.path.join(images, "trainscene_1.tif"))  # missing image
    corrupt = os.path.join(images, "trainscene_2.tif")
    data = open(corrupt, "rb").read()
    with open(corrupt, "wb") as f:  # a truncated download
        f.write(data[:len(data) // 2])
    caps = open(os.path.join(text, "train_caps.txt")).read().splitlines()
    caps[12] = "   "  # blank caption: a warning
    write_lines(os.path.join(text, "train_caps.txt"), caps)
    names = open(os.path.join(text, "train_filename.txt")).read().split()
    names[5] = names[3]  # duplicate name at line 6
    write_lines(os.path.join(text, "train_filename.txt"), names)
    test_caps = os.path.join(text, "test_caps.txt")
    write_lines(test_caps, open(test_caps).read().splitlines()[:-1])
    problems = [str(p) for p in check_dataset("rsitmd", str(tmp_path), threads=2)]

    def find(*words):
        return [p for p in problems if all(w in p for w in words)]
    assert find("error", "trainscene_1.tif", "not found")
    assert find("error", "trainscene_2.tif", "cannot read")
    assert find("warning", "train_caps.txt:13", "blank caption")
    assert find("error", "train_filename.txt:6", "duplicate", "trainscene_3.tif")
    assert find("error", "test_filename.txt", "15 file names", "14")
    assert _main(["check", "--dataset", "rsitmd", "--data-root", str(tmp_path)]) == 1
    with pytest.raises(ValueError, match="duplicate image name"):
        load_splits("rsitmd", str(tmp_path))


def test_clean_dataset_has_no_problems_and_missing_folder_says_where(make_precomp, tmp_path,
                                                                     capsys):
    make_precomp(tmp_path)
    assert check_dataset("rsitmd", str(tmp_path)) == []
    assert _main(["check", "--dataset", "rsitmd", "--data-root", str(tmp_path)]) == 0
    with pytest.raises(FileNotFoundError, match=r"rsicd_precomp.*RSICD_optimal"):
        load_splits("rsicd", str(tmp_path))
    os.remove(os.path.join(tmp_path, "rsitmd_images", "testscene_0.tif"))
    with pytest.raises(FileNotFoundError, match="testscene_0.tif"):
        load_splits("rsitmd", str(tmp_path))


def test_demo_is_deterministic_idempotent_and_readable(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_demo(a, seed=1, n_train=20, n_test=10, size=48)
    make_demo(b, seed=1, n_train=20, n_test=10, size=48)
    written = ("demo_precomp/train_caps.txt", "demo_precomp/test_filename.txt",
               "demo_images/test_0003.tif")
    for sub in written:
        assert open(os.path.join(a, sub), "rb").read() == open(os.path.join(b, sub), "rb").read()
    marker = os.path.join(a, "demo_precomp", "demo.json")
    stamp = os.stat(marker).st_mtime_ns
    make_demo(a, seed=1, n_train=20, n_test=10, size=48)  # same parameters: nothing rewritten
    assert os.stat(marker).st_mtime_ns == stamp
    make_demo(a, seed=2, n_train=20, n_test=10, size=48)  # other parameters: regenerated
    assert open(os.path.join(a, "demo_precomp/train_caps.txt")).read() != \
        open(os.path.join(b, "demo_precomp/train_caps.txt")).read()
    assert sorted(os.listdir(a)) == ["demo_images", "demo_precomp"]  # no temporary folder left
    splits = load_splits("demo", a)
    assert [len(s.image_paths) for s in splits.values()] == [16, 4, 10]
    assert Image.open(splits["test"].image_paths[0]).size == (48, 48)
    assert check_dataset("demo", a) == []
    # captions describe the image: they name the ground cover whose colour the image mostly has
    for i, path in enumerate(splits["test"].image_paths):
        pixels = torch.tensor(np.array(Image.open(path)), dtype=torch.float).flatten(0, 1)
        median = pixels.median(0).values
        nearest = min(GROUNDS, key=lambda g: (median - torch.tensor(GROUNDS[g][0])).norm())
        own = [c for c, k in zip(splits["test"].captions, splits["test"].txt2img) if k == i]
        assert len(own) == 5 and sum(GROUNDS[nearest][1] in c for c in own) >= 4, (path, own)
        others = [GROUNDS[g][1] for g in GROUNDS if g != nearest]
        assert not any(other in c for c in own for other in others), (path, own)


def test_json_problems_and_image_dir_override(make_json_dataset, tmp_path):
    make_json_dataset(tmp_path, splits=("train", "train", "test"))
    path = os.path.join(tmp_path, "dataset_sydney.json")
    data = json.load(open(path))
    data["images"][1]["split"] = "holdout"
    data["images"][2]["filename"] = "0.tif"
    data["images"][0]["sentences"][3]["raw"] = " "
    json.dump(data, open(path, "w"))
    problems = [str(p) for p in check_dataset("sydney", str(tmp_path))]
    assert any("images[1]" in p and "holdout" in p and p.startswith("error") for p in problems)
    assert any("images[2]" in p and "duplicate image name '0.tif'" in p for p in problems)
    assert any("images[0].sentences[3]" in p and p.startswith("warning") for p in problems)
    open(path, "w").write('{"images": [\n{"filename": "0.tif",,}]}')
    assert "dataset_sydney.json:2: not valid JSON" in str(check_dataset("sydney", str(tmp_path))[0])
    # images elsewhere: image_dir overrides <root>/<name>_images
    make_json_dataset(tmp_path)
    os.rename(os.path.join(tmp_path, "sydney_images"), os.path.join(tmp_path, "elsewhere"))
    with pytest.raises(FileNotFoundError, match="sydney_images"):
        load_splits("sydney", str(tmp_path))
    splits = load_splits("sydney", str(tmp_path), image_dir=os.path.join(tmp_path, "elsewhere"))
    assert os.path.isfile(splits["test"].image_paths[0])
