"""Dataset -> every problem with its file and line, checked before training (docs/method.md §5).

`check_dataset` reads the annotations as data.py's readers do,
then adds what reading alone does not find:
- captions longer than the text context;
- images that are missing, unreadable or not 8-bit;
- one image listed in two splits;
- copies of an image under another name in another split (overlap.py).
`verify_images` is train.py's quick pass: decode every image once.

    python -m mrs_adapter.prepare check --dataset rsitmd --data-root data
"""
import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from ..data import (
    CAPTIONS_PER_IMAGE,
    CONTEXT_LENGTH,
    DATASETS,
    Listing,
    Problem,
    Split,
    locate,
    read_listings,
)
from ..datasets import depth_note, open_image_file, read_image
from ..tokenizer import token_count
from .overlap import copy_pairs, default_cache, hash_images


def _check_images(listings: Dict[str, Listing], image_dir: str, threads: int) -> List[Problem]:
    """(listings, image dir, threads) -> [Problem]: every listed image must exist and decode.

    An image listed in two splits is a leak.
    """
    seen, problems = {}, []
    for split, listing in listings.items():
        for name, origin in zip(listing.names, listing.origins):
            if name in seen and seen[name][0] != split:
                message = f"{name} is in both {seen[name][0]} and {split}"
                problems.append(Problem(False, *origin, message))
            seen.setdefault(name, (split, origin))

    def check(name: str) -> Tuple[Optional[str], Optional[str]]:  # (error, note on the bit depth)
        path = os.path.join(image_dir, name)
        try:
            read_image(path, lambda image: None)
            with open_image_file(path) as image:  # not Image.open: Pillow's size limit is not ours
                return None, depth_note(image)
        except (FileNotFoundError, ValueError, OSError) as e:
            return str(e), None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for (name, (_, origin)), (error, note) in zip(seen.items(), pool.map(check, list(seen))):
            if error:
                problems.append(Problem(True, *origin, f"{name}: {error}"))
            if note:
                problems.append(Problem(False, *origin, f"{name}: {note}"))
    return problems


def verify_images(splits: Dict[str, Split], threads: int = 8, hint: str = "") -> None:
    """splits -> None, or a ValueError listing the images that do not open: each decoded once.

    train.py runs this before it makes or empties a run folder, whether or not images are cached.
    """
    paths = sorted({p for s in splits.values() for p in s.image_paths})

    def error(path: str) -> Optional[str]:
        try:
            read_image(path, lambda image: None)
        except (FileNotFoundError, ValueError) as e:
            return str(e)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        errors = [e for e in pool.map(error, paths) if e]
    if errors:
        shown = "\n  ".join(errors[:10])
        raise ValueError(f"{len(errors)} of {len(paths)} image(s) cannot be read, e.g.\n  {shown}\n"
                         f"{hint}".rstrip())


def _long_captions(listings: Dict[str, Listing], context_length: int) -> List[Problem]:
    """(listings, context length) -> [Problem]: a warning per caption longer than the text context.

    The tokenizer cuts such a caption.
    """
    problems = []
    for split, listing in listings.items():
        for j, caption in enumerate(listing.captions):
            n = token_count(caption)
            if n > context_length:
                file, line = listing.caption_origins[j] if listing.caption_origins else ("", None)
                image = listing.names[listing.txt2img[j]]
                problems.append(Problem(False, file, line, f"{split} caption of {image} has {n} "
                                        f"tokens, more than the {context_length}-token context: "
                                        f"cut to its first {context_length - 2}"))
    return problems


def check_dataset(dataset: str, data_root: str, layout: Optional[str] = None,
                  image_dir: Optional[str] = None,
                  verify_images: bool = True, threads: int = 8,
                  captions_per_image: int = CAPTIONS_PER_IMAGE,
                  context_length: int = CONTEXT_LENGTH) -> List[Problem]:
    """Dataset name -> [Problem]: every problem of that dataset, each with its file and line.

    Missing folders, empty files,
    caption / file-name count mismatches (or another count than captions_per_image),
    blank captions (a warning: RSITMD's 20 are kept, as published),
    captions longer than the context (warning: cut),
    duplicate names, images listed in two splits (warning),
    missing or unreadable images, images that are not 8-bit (warning: how they are read),
    and copies of an image under another name in another split (warning).
    The last three need verify_images.
    """
    try:
        layout, text, image_dir = locate(dataset, data_root, layout, image_dir)
        listings, problems = read_listings(layout, text, captions_per_image)
    except (FileNotFoundError, ValueError) as e:
        return [Problem(True, data_root, None, str(e))]
    problems += _long_captions(listings, context_length)
    if verify_images:
        image_problems = _check_images(listings, image_dir, threads)
        problems += image_problems
        problems += _copies_across_splits(listings, image_dir, image_problems, data_root, threads)
    return problems


def _copies_across_splits(listings: Dict[str, Listing], image_dir: str,
                          image_problems: List[Problem], data_root: str,
                          threads: int) -> List[Problem]:
    """(listings, image dir, ...) -> [Problem]: a warning per picture under two names in two splits.

    - Exact or near copies (overlap.py).
    - A warning, since a test image would then be trained on.
    """
    broken = {p.message.split(": ")[0] for p in image_problems if p.fatal}
    items = [(split, name, origin) for split, listing in listings.items()
             for name, origin in zip(listing.names, listing.origins) if name not in broken]
    paths = [os.path.join(image_dir, name) for _, name, _ in items]
    problems = []
    for i, j, kind, d in sorted(copy_pairs(hash_images(paths, default_cache(data_root), threads))):
        what = "an exact copy" if kind == "exact" else f"a near copy (pHash distance {d})"
        (split_a, name_a, _), (split_b, name_b, origin) = items[i], items[j]
        if split_a != split_b and name_a != name_b:  # the same name in two splits is reported above
            message = f"{name_b} ({split_b}) is {what} of {name_a} ({split_a})"
            problems.append(Problem(False, *origin, message))
    return problems


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mrs_adapter.prepare",
                                     description=check_dataset.__doc__)
    a = parser.add_argument
    a("command", choices=["check"],
      help="check one dataset (copies across datasets: `python -m mrs_adapter.prepare overlap`)")
    a("--dataset", required=True, choices=sorted(DATASETS))
    a("--data-root", required=True)
    a("--layout", choices=["precomp", "json"], help="default: the dataset's usual layout")
    a("--image-dir", help="default: <data-root>/<dataset>_images")
    a("--no-verify-images", action="store_true", help="skip decoding every image")
    a("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE,
      help="captions of each image in a one-name-per-image list (default 5)")
    a("--context-length", type=int, default=CONTEXT_LENGTH,
      help="text context of the model, in tokens (default 77, CLIP's)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """argv -> exit code: `check` prints every problem and a count; 1 if any is fatal, else 0."""
    args = _parser().parse_args(argv)
    problems = check_dataset(args.dataset, args.data_root, args.layout, args.image_dir,
                             not args.no_verify_images, captions_per_image=args.captions_per_image,
                             context_length=args.context_length)
    for p in problems:
        print(p)
    fatal = sum(p.fatal for p in problems)
    print(f"{args.dataset}: {fatal} error(s), {len(problems) - fatal} warning(s)")
    return 1 if fatal else 0


