"""Settings -> the splits one run uses: one dataset as published, or several datasets joined.

Several datasets (or a transfer, --test-dataset):
- training on the union of their training splits;
- selection on the union of their validation splits;
- a test split "test:<name>" per test dataset.
Training and validation images that are exact or near copies of a test image are dropped
(overlap.py; selecting on a validation image that is also a test image leaks too),
unless --keep-overlap asks for the published, leaky setting.
"""
from typing import Optional, Tuple

from ..data import DATASETS, check_command, load_splits, union_splits
from ..demo import scenes as demo
from ..prepare.check import verify_images
from ..prepare.overlap import default_cache, drop_copies
from .args import Settings


def test_keys(splits: dict) -> list:
    """splits -> the test keys: "test" for one dataset, else "test:<name>" per test dataset."""
    return [k for k in splits if k == "test" or k.startswith("test:")]


def load_data(run: Settings) -> Tuple[dict, Optional[dict]]:
    """Settings -> (splits, dropped): the splits the run uses and the copies dropped from them.

    - splits: {train, val, test} of one dataset, or {train, val, test:<name>...} of several;
    - dropped: the count of training and validation images dropped as copies of test images,
      {"train": n, "val": m}, or None where nothing was looked for.
    """
    names, tests = run.datasets, run.test_dataset or run.datasets
    every = list(dict.fromkeys(names + tests))
    if len(every) > 1 and (run.layout or run.image_dir):
        raise ValueError(f"--layout / --image-dir describe one dataset; {', '.join(every)} were "
                         f"named (lay each out under --data-root as README 'Data' says)")
    if "demo" in every:
        demo.prepare(run.data_root, run.layout, run.image_dir, verbose=run.rank == 0)
    loaded = {n: load_splits(n, run.data_root, run.layout, run.image_dir, verbose=run.rank == 0,
                             captions_per_image=run.captions_per_image) for n in every}
    if len(names) == 1 and not run.test_dataset:
        return loaded[names[0]], None
    splits = {k: union_splits(k, [loaded[n][k] for n in names]) for k in ("train", "val")}
    test = {f"test:{n}": loaded[n]["test"] for n in tests}
    dropped = None
    if not run.keep_overlap:
        references = [p for split in test.values() for p in split.image_paths]
        before = {k: len(splits[k].image_paths) for k in splits}
        splits, dropped = drop_copies(splits, references, default_cache(run.data_root))
        if run.rank == 0:
            print(f"dropped {dropped['train']} of {before['train']} training and "
                  f"{dropped['val']} of {before['val']} validation images: exact or near copies "
                  f"of images in the test splits of {', '.join(tests)} (--keep-overlap keeps them)")
    if run.rank == 0:
        print(f"{run.dataset}: {splits['train']}; {splits['val']}; "
              + "; ".join(f"{k}: {len(v.image_paths)} images" for k, v in test.items()))
    return {**splits, **test}, dropped


def check_images(run: Settings, splits: dict) -> None:
    """(run, splits) -> None, or a ValueError listing the images of `splits` that do not open.

    The error gives the command that checks each dataset the run names.
    """
    names = list(dict.fromkeys(run.datasets + (run.test_dataset or [])))
    hint = "run " + ", ".join("`{}`".format(check_command(
        n, run.data_root, run.layout or DATASETS[n][0], run.image_dir, run.captions_per_image))
        for n in names)
    verify_images(splits, hint=hint)


def check_splits(run: Settings, splits: dict, dropped: Optional[dict]) -> None:
    """(run, splits, dropped) -> None, or a ValueError naming the split a seed could not use.

    - A training split of fewer than 2 pairs (nothing to contrast);
    - a validation or test split without an image,
      e.g. after every one was dropped as a copy of a test image.
    """
    for key, split in splits.items():
        train = key == "train"
        count, least = (len(split.captions), 2) if train else (len(split.image_paths), 1)
        if count >= least:
            continue
        gone = (dropped or {}).get(key)
        why = (f" after {gone} image(s) were dropped as copies of test images (--keep-overlap "
               f"keeps them)" if gone else "")
        need = "training needs at least 2" if train else "it needs at least 1"
        raise ValueError(f"the {key} split of {run.dataset} holds {count} "
                         f"{'caption-image pair' if train else 'image'}(s){why}; {need}")
