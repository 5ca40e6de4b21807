"""The splits one run uses: one dataset as published, or several datasets joined.

Several datasets (or a transfer, --test-dataset): training on the union of their training splits,
selection on the union of their validation splits, a test split "test:<name>" per test dataset.
Training and validation images that are exact or near copies of a test image are dropped
(overlap.py; selecting on a validation image that is also a test image leaks too) unless
--keep-overlap asks for the published, leaky setting.
"""
from ..data import DATASETS, check_command, load_splits, union_splits
from ..demo import scenes as demo
from ..prepare.check import verify_images
from ..prepare.overlap import default_cache, drop_copies


def test_keys(splits: dict) -> list:
    """The test splits: "test" for one dataset, "test:<name>" per test dataset otherwise."""
    return [k for k in splits if k == "test" or k.startswith("test:")]


def load_data(args) -> dict:
    """{train, val, test} of one dataset, or {train, val, test:<name>...} of several; sets
    args.dropped_overlap (None, or the count of dropped images per split)."""
    names, tests = args.datasets, args.test_dataset or args.datasets
    every = list(dict.fromkeys(names + tests))
    if len(every) > 1 and (args.layout or args.image_dir):
        raise ValueError(f"--layout / --image-dir describe one dataset; {', '.join(every)} were "
                         f"named (lay each out under --data-root as README 'Data' says)")
    if "demo" in every:
        demo.prepare(args.data_root, args.layout, args.image_dir, verbose=args.rank == 0)
    loaded = {n: load_splits(n, args.data_root, args.layout, args.image_dir, verbose=args.rank == 0,
                             captions_per_image=args.captions_per_image) for n in every}
    args.dropped_overlap = None
    if len(names) == 1 and not args.test_dataset:
        return loaded[names[0]]
    splits = {s: union_splits(s, [loaded[n][s] for n in names]) for s in ("train", "val")}
    test = {f"test:{n}": loaded[n]["test"] for n in tests}
    if not args.keep_overlap:
        references = [p for split in test.values() for p in split.image_paths]
        before = {s: len(splits[s].image_paths) for s in splits}
        cache = default_cache(args.data_root)
        splits, args.dropped_overlap = drop_copies(splits, references, cache)
        if args.rank == 0:
            dropped = args.dropped_overlap
            print(f"dropped {dropped['train']} of {before['train']} training and "
                  f"{dropped['val']} of {before['val']} validation images: exact or near copies "
                  f"of images in the test splits of {', '.join(tests)} (--keep-overlap keeps them)")
    if args.rank == 0:
        print(f"{args.dataset}: {splits['train']}; {splits['val']}; "
              + "; ".join(f"{k}: {len(v.image_paths)} images" for k, v in test.items()))
    return {**splits, **test}


def check_images(args, splits: dict) -> None:
    """A ValueError listing the images of `splits` that do not open, with the command that checks
    each dataset named in args."""
    names = list(dict.fromkeys(args.datasets + (args.test_dataset or [])))
    hint = "run " + ", ".join("`{}`".format(check_command(
        n, args.data_root, args.layout or DATASETS[n][0], args.image_dir, args.captions_per_image))
        for n in names)
    verify_images(splits, hint=hint)
