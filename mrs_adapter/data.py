"""Image-caption annotations on disk, their splits and the validation split (docs/method.md §4-§5).

Remote sensing image-caption datasets come in two layouts on disk:
- "precomp": RSITMD, RSICD, UCM as released with AMFMN / GaLR (caption and file-name lists);
- Karpathy-style JSON: Sydney-Captions; other releases of the rest.
Both give `Split`s (image paths, captions, each caption's image).
The published runs validate on 20% of the precomp training images (`validation_split`).
Reading images and the torch Datasets are in datasets.py.
`python -m mrs_adapter.prepare check --dataset D --data-root DIR` lists every problem
of a dataset before training (prepare/check.py).
"""
import json
import os
import random
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

_QU = "Qu et al. 2016; download links in https://github.com/201528014227051/RSICD_optimal"
_PRECOMP = "precomp text files from https://github.com/xiaoyuan1996/GaLR or AMFMN"
DATASETS = {  # name -> (default layout, where the data comes from)
    "rsitmd": ("precomp", "https://github.com/xiaoyuan1996/AMFMN (images and precomp annotations)"),
    "rsicd": ("precomp",
              f"images from https://github.com/201528014227051/RSICD_optimal; {_PRECOMP}"),
    "ucm": ("precomp", f"UCM-Captions images ({_QU}); {_PRECOMP}"),
    "sydney": ("json", f"Sydney-Captions images and dataset.json ({_QU})"),
    "demo": ("precomp", "generated offline by train.py / eval.py (mrs_adapter/demo/, no download)"),
}
SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5  # every known dataset and the demo; state others (--captions-per-image)
CONTEXT_LENGTH = 77  # CLIP's text context, used by `check` (which loads no model)


@dataclass
class Split:
    """One split: image i is `image_paths[i]`; caption j describes image `txt2img[j]`."""
    name: str
    image_paths: List[str]
    captions: List[str]
    txt2img: List[int]

    def subset(self, name: str, image_indices: Sequence[int]) -> "Split":
        """Indices -> a Split of those images (in that order) and their captions, re-indexed."""
        new_index = {old: new for new, old in enumerate(image_indices)}
        keep = [j for j, i in enumerate(self.txt2img) if i in new_index]
        paths = [self.image_paths[i] for i in image_indices]
        return Split(name, paths, [self.captions[j] for j in keep],
                     [new_index[self.txt2img[j]] for j in keep])

    def __str__(self) -> str:
        return f"{self.name}: {len(self.image_paths)} images, {len(self.captions)} captions"


def union_splits(name: str, splits: Sequence[Split]) -> Split:
    """Splits -> one Split: their images and captions one after the other.

    For training on several datasets.
    """
    paths, captions, txt2img = [], [], []
    for split in splits:
        txt2img += [len(paths) + i for i in split.txt2img]
        paths += split.image_paths
        captions += split.captions
    return Split(name, paths, captions, txt2img)


@dataclass
class Problem:
    """A problem found in a dataset; `fatal` ones stop loading, the others are warnings."""
    fatal: bool
    file: str
    line: Optional[int]
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{'error' if self.fatal else 'warning'}: {where}: {self.message}"


@dataclass
class Listing:
    """A split as read from disk, before any image is opened (prepare/check.py reads it too)."""
    names: List[str]
    captions: List[str]
    txt2img: List[int]
    origins: List[Tuple[str, Optional[int]]]  # (file, line) that names each image
    caption_origins: List[Tuple[str, Optional[int]]] = field(default_factory=list)  # each caption's


def validation_split(n: int, seed: int = 2,
                     train_fraction: float = 0.8) -> Tuple[List[int], List[int]]:
    """n -> (train indices, validation indices): the published rule (docs/method.md §4).

    Shuffle range(n) as `random.seed(2); random.shuffle` does;
    the first int(0.8 n) train, the rest validate.
    A local Random(2) gives the same permutation as the global seed
    without touching the global RNG.
    """
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    cut = int(train_fraction * n)
    return idx[:cut], idx[cut:]


def locate(dataset: str, data_root: str, layout: Optional[str] = None,
           image_dir: Optional[str] = None) -> Tuple[str, str, str]:
    """Dataset, root -> (layout, text path, image folder); a FileNotFoundError if one is missing.

    - precomp: <root>/<name>_precomp/ and <root>/<name>_images/;
    - json: <root>/dataset_<name>.json (any case) and <root>/<name>_images/.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    default_layout, source = DATASETS[dataset]
    layout = layout or default_layout
    if layout not in ("precomp", "json"):
        raise ValueError(f"unknown layout {layout!r}; expected 'precomp' or 'json'")
    image_dir = image_dir or os.path.join(data_root, f"{dataset}_images")
    if layout == "precomp":
        text = os.path.join(data_root, f"{dataset}_precomp")
        expected = f"{text}/{{train,test}}_caps.txt, {{train,test}}_filename.txt"
        found = os.path.isdir(text)
    else:
        wanted = f"dataset_{dataset}.json"
        names = os.listdir(data_root) if os.path.isdir(data_root) else []
        text = os.path.join(data_root, next((n for n in names if n.lower() == wanted), wanted))
        expected, found = text, os.path.isfile(text)
    wanted = (("annotations", expected, found), ("images", image_dir, os.path.isdir(image_dir)))
    for what, path, ok in wanted:
        if not ok:
            other = "json" if layout == "precomp" else "precomp"
            switch = f" (or choose layout='{other}' / --layout {other})"
            hint = switch if what == "annotations" else ""
            raise FileNotFoundError(
                f"{dataset}: {what} not found. The {layout} layout expects {path}{hint}, "
                f"images in {image_dir} (override with image_dir / --image-dir). "
                f"Data: {source}. See README 'Data'.")
    return layout, text, image_dir


def _read_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path} (a precomp folder holds "
                                f"{{train,test}}_caps.txt and {{train,test}}_filename.txt)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            # not splitlines(): it also splits at \x0b, \x1c, \u2028...
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.rstrip("\r") for line in lines]


def _group_captions(names: List[str], n_captions: int, caps_path: str, names_path: str,
                    captions_per_image: int) -> Tuple[List[int], List[int], Optional[Problem]]:
    """Name list, caption count -> (each image's line in the name list, each caption's image, None).

    ([], [], a fatal Problem) when the two lists do not fit. They fit as
    - one name per caption (a run of equal names is one image), or
    - one name per image with `captions_per_image` consecutive captions each.
    """
    if len(names) == n_captions:  # one name per caption: an image = a run of equal names
        image_lines, txt2img = [], []
        for i, name in enumerate(names):
            if i == 0 or name != names[i - 1]:
                image_lines.append(i + 1)
            txt2img.append(len(image_lines) - 1)
        return image_lines, txt2img, None
    if n_captions % len(names) == 0:  # one name per image, k captions each
        k = n_captions // len(names)
        if k == captions_per_image:
            return list(range(1, len(names) + 1)), [j // k for j in range(n_captions)], None
        return [], [], Problem(
            True, names_path, None, f"{len(names)} file names for the {n_captions} captions "
            f"of {caps_path} would be {k} captions per image; expected {captions_per_image} "
            f"(state another count with --captions-per-image {k})")
    return [], [], Problem(
        True, names_path, None, f"{len(names)} file names do not fit the {n_captions} "
        f"captions of {caps_path}: expected one name per caption, or one per image "
        f"with {captions_per_image} captions each (--captions-per-image)")


def _read_precomp(text_dir: str, split: str,
                  captions_per_image: int = CAPTIONS_PER_IMAGE) -> Tuple[Listing, List[Problem]]:
    """(text folder, split) -> (Listing, problems) of `<split>_caps.txt`, `<split>_filename.txt`.

    - caps: one caption a line;
    - filename: one name per caption (test_filename.txt: each name repeated, collapsed here),
      or one name per image with `captions_per_image` consecutive captions each
      (train_filename.txt).
    In the second form the count is not written anywhere: any other ratio is an error,
    since reading it would attach captions to the wrong images.
    """
    caps_path, names_path = (os.path.join(text_dir, f"{split}_{f}.txt")
                             for f in ("caps", "filename"))
    captions, names = _read_lines(caps_path), [n.strip() for n in _read_lines(names_path)]
    while names and not names[-1]:
        names.pop()  # a trailing empty line is not an image
    files = ((caps_path, captions, "caption"), (names_path, names, "image file name"))
    empty = [Problem(True, path, None, f"is empty: expected one {what} a line")
             for path, lines, what in files if not lines]
    if empty:
        return Listing([], [], [], []), empty
    problems = [Problem(True, names_path, i + 1, "blank file name")
                for i, n in enumerate(names) if not n]
    image_lines, txt2img, misfit = _group_captions(names, len(captions), caps_path, names_path,
                                                   captions_per_image)
    if misfit:
        return Listing([], [], [], []), problems + [misfit]
    image_names = [names[line - 1] for line in image_lines]
    problems += [Problem(False, caps_path, j + 1, f"blank caption of {image_names[txt2img[j]]} "
                         f"(kept, as in the published runs)")
                 for j, c in enumerate(captions) if not c.strip()]
    first = {}
    for name, line in zip(image_names, image_lines):
        if name in first:
            message = f"duplicate image name {name!r} (first at line {first[name]})"
            problems.append(Problem(True, names_path, line, message))
        first.setdefault(name, line)
    counts = np.bincount(txt2img, minlength=len(image_names)) if txt2img else np.zeros(0, int)
    # one name per caption: another count than stated is a shifted line as often as a real one
    problems += [Problem(True, names_path, line, f"{name} has {c} captions, expected "
                         f"{captions_per_image} (--captions-per-image)")
                 for name, line, c in zip(image_names, image_lines, counts)
                 if c != captions_per_image]
    return Listing(image_names, captions, txt2img, [(names_path, line) for line in image_lines],
                    [(caps_path, j + 1) for j in range(len(captions))]), problems


def _json_entry(item, first: Dict[str, str]) -> Tuple[str, str, List[str]]:
    """JSON image entry -> (filename, split, captions), or a ValueError saying what is wrong."""
    try:
        name, split, raws = item["filename"], item["split"], [s["raw"] for s in item["sentences"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"expected filename, split and sentences[].raw "
                         f"({type(e).__name__}: {e})") from None
    split = "train" if split == "restval" else split  # Karpathy's name for extra training images
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if not raws:
        raise ValueError("no sentences")
    if name in first:
        raise ValueError(f"duplicate image name {name!r} (first at {first[name]})")
    return name, split, raws


def _read_json(path: str) -> Tuple[Dict[str, Listing], List[Problem]]:
    """Karpathy-style JSON file -> ({split: Listing}, problems).

    The file: `{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`.
    """
    listings, problems, first = {s: Listing([], [], [], []) for s in SPLITS}, [], {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        return listings, [Problem(True, path, e.lineno, f"not valid JSON: {e.msg}")]
    except UnicodeDecodeError as e:
        return listings, [Problem(True, path, None, f"not UTF-8 text: {e}")]
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        return listings, [Problem(True, path, None, 'expected an object {"images": [...]}')]
    for i, item in enumerate(images):
        try:
            name, split, raws = _json_entry(item, first)
        except ValueError as e:
            problems.append(Problem(True, path, None, f"images[{i}]: {e}"))
            continue
        first[name] = f"images[{i}]"
        problems += [Problem(False, path, None,
                             f"images[{i}].sentences[{k}]: blank caption of {name}")
                     for k, raw in enumerate(raws) if not raw.strip()]
        listing = listings[split]
        listing.txt2img += [len(listing.names)] * len(raws)
        listing.names.append(name)
        listing.captions += raws
        listing.origins.append((path, None))
        listing.caption_origins += [(path, None)] * len(raws)
    problems += [Problem(True, path, None, f"no {split!r} images") for split in ("train", "test")
                 if not listings[split].names]
    return listings, problems


def read_listings(layout: str, text: str, captions_per_image: int = CAPTIONS_PER_IMAGE
                   ) -> Tuple[Dict[str, Listing], List[Problem]]:
    """(layout, text path) -> ({split: Listing}, problems), before any image is opened."""
    if layout == "json":
        return _read_json(text)
    (train, p_train), (test, p_test) = (_read_precomp(text, split, captions_per_image)
                                        for split in ("train", "test"))
    return {"train": train, "test": test}, p_train + p_test


def _raise_fatal(problems: List[Problem], hint: str):
    fatal = [p for p in problems if p.fatal]
    if fatal:
        shown = "\n  ".join(str(p) for p in fatal[:10])
        raise ValueError(f"{len(fatal)} problem(s) in the data, e.g.\n  {shown}\n{hint}")


def check_command(dataset: str, data_root: str, layout: str, image_dir: Optional[str] = None,
                  captions_per_image: int = CAPTIONS_PER_IMAGE) -> str:
    """Options -> the `check` command line that reads the data exactly as the failing run did."""
    words = ["python", "-m", "mrs_adapter.prepare", "check", "--dataset", dataset,
             "--data-root", data_root, "--layout", layout]
    words += ["--image-dir", image_dir] if image_dir else []
    if captions_per_image != CAPTIONS_PER_IMAGE:
        words += ["--captions-per-image", str(captions_per_image)]
    return " ".join(shlex.quote(w) for w in words)


def load_splits(dataset: str, data_root: str, layout: Optional[str] = None,
                image_dir: Optional[str] = None, verbose: bool = True,
                captions_per_image: int = CAPTIONS_PER_IMAGE) -> Dict[str, Split]:
    """Dataset, root -> {"train", "val", "test": Split} (see `locate` for the tree).

    - precomp: val = 20% of the training images, by `validation_split`;
    - json: the file's own splits (and `validation_split` when it has no 'val' images).
    Missing images raise before training.
    """
    given_image_dir = image_dir
    layout, text, image_dir = locate(dataset, data_root, layout, image_dir)
    listings, problems = read_listings(layout, text, captions_per_image)
    command = check_command(dataset, data_root, layout, given_image_dir, captions_per_image)
    hint = f"run `{command}` for every problem"
    _raise_fatal(problems, hint)
    splits = {name: Split(name, [os.path.join(image_dir, n) for n in listing.names],
                          listing.captions, listing.txt2img) for name, listing in listings.items()}
    note = ""
    if not splits.get("val") or not splits["val"].image_paths:  # carve val out of the train images
        pool = splits["train"]
        note = f"train pool {len(pool.image_paths)} images / {len(pool.captions)} captions -> "
        train_idx, val_idx = validation_split(len(pool.image_paths))
        splits["train"] = pool.subset("train", train_idx)
        splits["val"] = pool.subset("val", val_idx)
    missing = [p for s in splits.values() for p in s.image_paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) missing from {image_dir}, "
                                f"e.g. {missing[:3]}; {hint}")
    if verbose:
        blanks = sum("blank caption" in p.message for p in problems)
        print(f"{dataset} ({layout}, {text}): {note}" + "; ".join(str(splits[s]) for s in SPLITS)
              + (f"; {blanks} blank captions kept" if blanks else ""))
    return {s: splits[s] for s in SPLITS}

