"""Remote sensing image-caption data: readers, the validation split, torch Datasets (method.md 4-5).

Two layouts on disk: "precomp" (RSITMD, RSICD, UCM as released with AMFMN / GaLR: caption and
file-name lists) and Karpathy-style JSON (Sydney-Captions; other releases of the rest). Both give
`Split`s (image paths, captions, each caption's image). The published runs validate on 20% of
the precomp training images (`validation_split`); training items are one per caption, and
evaluation embeds each image and each caption once. `check_dataset` lists every problem of a
dataset before training (also `python -m mrs_adapter.data check --dataset D --data-root DIR`).
"""
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
import shlex
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .tokenizer import token_count, tokenize

_QU = "Qu et al. 2016; download links in https://github.com/201528014227051/RSICD_optimal"
_PRECOMP = "precomp text files from https://github.com/xiaoyuan1996/GaLR or AMFMN"
DATASETS = {  # name -> (default layout, where the data comes from)
    "rsitmd": ("precomp", "https://github.com/xiaoyuan1996/AMFMN (images and precomp annotations)"),
    "rsicd": ("precomp", f"images from https://github.com/201528014227051/RSICD_optimal; {_PRECOMP}"),
    "ucm": ("precomp", f"UCM-Captions images ({_QU}); {_PRECOMP}"),
    "sydney": ("json", f"Sydney-Captions images and dataset.json ({_QU})"),
    "demo": ("precomp", "generated on the fly by mrs_adapter.demo.make_demo (no download)"),
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
        """The images `image_indices` (in that order) with their captions, re-indexed."""
        new_index = {old: new for new, old in enumerate(image_indices)}
        keep = [j for j, i in enumerate(self.txt2img) if i in new_index]
        return Split(name, [self.image_paths[i] for i in image_indices], [self.captions[j] for j in keep],
                     [new_index[self.txt2img[j]] for j in keep])

    def __str__(self) -> str:
        return f"{self.name}: {len(self.image_paths)} images, {len(self.captions)} captions"


def union_splits(name: str, splits: Sequence[Split]) -> Split:
    """The images and captions of `splits` one after the other (training on several datasets)."""
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
class _Listing:  # a split as read from disk, before any image is opened
    names: List[str]
    captions: List[str]
    txt2img: List[int]
    origins: List[Tuple[str, Optional[int]]]  # (file, line) that names each image
    caption_origins: List[Tuple[str, Optional[int]]] = field(default_factory=list)  # each caption's


def validation_split(n: int, seed: int = 2, train_fraction: float = 0.8) -> Tuple[List[int], List[int]]:
    """The published rule (method.md 4): shuffle range(n) as `random.seed(2); random.shuffle` does,
    first int(0.8 n) train, the rest validate. A local Random(2) gives the same permutation as
    the global seed without touching the global RNG."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    cut = int(train_fraction * n)
    return idx[:cut], idx[cut:]


def locate(dataset: str, data_root: str, layout: Optional[str] = None,
           image_dir: Optional[str] = None) -> Tuple[str, str, str]:
    """(layout, text path, image folder). precomp: <root>/<name>_precomp/ and <root>/<name>_images/;
    json: <root>/dataset_<name>.json (any case) and <root>/<name>_images/."""
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
    for what, path, ok in (("annotations", expected, found), ("images", image_dir, os.path.isdir(image_dir))):
        if not ok:
            other = "json" if layout == "precomp" else "precomp"
            hint = f" (or choose layout='{other}' / --layout {other})" if what == "annotations" else ""
            raise FileNotFoundError(f"{dataset}: {what} not found. The {layout} layout expects {path}{hint}, "
                                    f"images in {image_dir} (override with image_dir / --image-dir). "
                                    f"Data: {source}. See README 'Data'.")
    return layout, text, image_dir


def _read_lines(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file {path} (a precomp folder holds {{train,test}}_caps.txt "
                                f"and {{train,test}}_filename.txt)")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")  # not splitlines(): it also splits at \x0b, \x1c, \u2028...
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.rstrip("\r") for line in lines]


def _read_precomp(text_dir: str, split: str,
                  captions_per_image: int = CAPTIONS_PER_IMAGE) -> Tuple[_Listing, List[Problem]]:
    """`<split>_caps.txt` (one caption a line) and `<split>_filename.txt`, which may hold one
    name per caption (test_filename.txt: each name repeated, collapsed here) or one name per
    image with `captions_per_image` consecutive captions each (train_filename.txt). In the
    second form the count is not written anywhere: any other ratio is an error, since reading
    it would attach captions to the wrong images."""
    caps_path, names_path = (os.path.join(text_dir, f"{split}_{f}.txt") for f in ("caps", "filename"))
    captions, names = _read_lines(caps_path), [n.strip() for n in _read_lines(names_path)]
    while names and not names[-1]:
        names.pop()  # a trailing empty line is not an image
    files = ((caps_path, captions, "caption"), (names_path, names, "image file name"))
    empty = [Problem(True, path, None, f"is empty: expected one {what} a line")
             for path, lines, what in files if not lines]
    if empty:
        return _Listing([], [], [], []), empty
    problems = [Problem(True, names_path, i + 1, "blank file name") for i, n in enumerate(names) if not n]
    if len(names) == len(captions):  # one name per caption: an image = a run of equal names
        image_lines, txt2img = [], []
        for i, name in enumerate(names):
            if i == 0 or name != names[i - 1]:
                image_lines.append(i + 1)
            txt2img.append(len(image_lines) - 1)
    elif len(captions) % len(names) == 0:  # one name per image, k captions each
        k = len(captions) // len(names)
        if k != captions_per_image:
            problems.append(Problem(
                True, names_path, None, f"{len(names)} file names for the {len(captions)} captions "
                f"of {caps_path} would be {k} captions per image; expected {captions_per_image} "
                f"(state another count with --captions-per-image {k})"))
            return _Listing([], [], [], []), problems
        image_lines, txt2img = list(range(1, len(names) + 1)), [j // k for j in range(len(captions))]
    else:
        problems.append(Problem(True, names_path, None, f"{len(names)} file names do not fit the {len(captions)} "
                                f"captions of {caps_path}: expected one name per caption, or one per image "
                                f"with {captions_per_image} captions each (--captions-per-image)"))
        return _Listing([], [], [], []), problems
    image_names = [names[line - 1] for line in image_lines]
    problems += [Problem(False, caps_path, j + 1, f"blank caption of {image_names[txt2img[j]]} (kept, as in "
                         f"the published runs)") for j, c in enumerate(captions) if not c.strip()]
    first = {}
    for name, line in zip(image_names, image_lines):
        if name in first:
            problems.append(Problem(True, names_path, line, f"duplicate image name {name!r} (first at line {first[name]})"))
        first.setdefault(name, line)
    counts = np.bincount(txt2img, minlength=len(image_names)) if txt2img else np.zeros(0, int)
    # one name per caption: another count than stated is a shifted line as often as a real one
    problems += [Problem(True, names_path, line, f"{name} has {c} captions, expected "
                         f"{captions_per_image} (--captions-per-image)")
                 for name, line, c in zip(image_names, image_lines, counts) if c != captions_per_image]
    return _Listing(image_names, captions, txt2img, [(names_path, line) for line in image_lines],
                    [(caps_path, j + 1) for j in range(len(captions))]), problems


def _json_entry(item, first: Dict[str, str]) -> Tuple[str, str, List[str]]:
    """(filename, split, captions) of one JSON image entry, or a ValueError saying what is wrong."""
    try:
        name, split, raws = item["filename"], item["split"], [s["raw"] for s in item["sentences"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"expected filename, split and sentences[].raw ({type(e).__name__}: {e})") from None
    split = "train" if split == "restval" else split  # Karpathy's name for extra training images
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if not raws:
        raise ValueError("no sentences")
    if name in first:
        raise ValueError(f"duplicate image name {name!r} (first at {first[name]})")
    return name, split, raws


def _read_json(path: str) -> Tuple[Dict[str, _Listing], List[Problem]]:
    """Karpathy-style `{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`."""
    listings, problems, first = {s: _Listing([], [], [], []) for s in SPLITS}, [], {}
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
        problems += [Problem(False, path, None, f"images[{i}].sentences[{k}]: blank caption of {name}")
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


def _read_listings(layout: str, text: str, captions_per_image: int = CAPTIONS_PER_IMAGE
                   ) -> Tuple[Dict[str, _Listing], List[Problem]]:
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
    """The `check` command line that reads the data exactly as the failing run did."""
    words = ["python", "-m", "mrs_adapter.data", "check", "--dataset", dataset,
             "--data-root", data_root, "--layout", layout]
    words += ["--image-dir", image_dir] if image_dir else []
    if captions_per_image != CAPTIONS_PER_IMAGE:
        words += ["--captions-per-image", str(captions_per_image)]
    return " ".join(shlex.quote(w) for w in words)


def load_splits(dataset: str, data_root: str, layout: Optional[str] = None,
                image_dir: Optional[str] = None, verbose: bool = True,
                captions_per_image: int = CAPTIONS_PER_IMAGE) -> Dict[str, Split]:
    """{'train', 'val', 'test'} Splits of `dataset` under `data_root` (see `locate` for the tree).
    precomp: val = 20% of the training images by `validation_split`; json: the file's own splits
    (and `validation_split` when it has no 'val' images). Missing images raise before training."""
    if dataset == "demo" and (layout or "precomp") == "precomp" and image_dir is None \
            and not os.path.isdir(os.path.join(data_root, "demo_precomp")):
        from .demo import make_demo  # generated once with the default parameters, then reused
        make_demo(data_root, verbose=verbose)
    given_image_dir = image_dir
    layout, text, image_dir = locate(dataset, data_root, layout, image_dir)
    listings, problems = _read_listings(layout, text, captions_per_image)
    command = check_command(dataset, data_root, layout, given_image_dir, captions_per_image)
    hint = f"run `{command}` for every problem"
    _raise_fatal(problems, hint)
    splits = {name: Split(name, [os.path.join(image_dir, n) for n in listing.names], listing.captions,
                          listing.txt2img) for name, listing in listings.items()}
    note = ""
    if not splits.get("val") or not splits["val"].image_paths:  # carve val out of the training images
        pool = splits["train"]
        note = f"train pool {len(pool.image_paths)} images / {len(pool.captions)} captions -> "
        train_idx, val_idx = validation_split(len(pool.image_paths))
        splits["train"], splits["val"] = pool.subset("train", train_idx), pool.subset("val", val_idx)
    missing = [p for s in splits.values() for p in s.image_paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) missing from {image_dir}, e.g. {missing[:3]}; {hint}")
    if verbose:
        blanks = sum("blank caption" in p.message for p in problems)
        print(f"{dataset} ({layout}, {text}): {note}" + "; ".join(str(splits[s]) for s in SPLITS)
              + (f"; {blanks} blank captions kept" if blanks else ""))
    return {s: splits[s] for s in SPLITS}


EIGHT_BIT_MODES = {"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                   "LAB", "HSV"}
STRETCH_PERCENTILES = (2.0, 98.0)


def to_rgb8(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image of `image`: 8-bit modes convert as PIL does; 16-bit, 32-bit integer and
    float images (modes I;16*, I, F) are stretched linearly, per image, so that the 2nd percentile
    of their values maps to 0 and the 98th to 255 (clipped; NaN becomes 0).

    Why a per-image percentile stretch: PIL's convert("RGB") clips every value above 255, so a
    16-bit image becomes white; a fixed scale of the dtype's range (/ 257) leaves the 10-12 bits
    that most sensors use almost black. The 2-98% cut is what GIS viewers show by default (QGIS's
    cumulative count cut), so it is what an annotator would have seen. The price: two images of
    one scene with different value ranges look alike, and absolute brightness is not kept.

    Multi-band TIFFs of more than 8 bits per sample are refused (ValueError): PIL decodes them
    to 8-bit RGB by keeping the top byte of each value, which leaves 12-bit data almost black."""
    bits = _tiff_bits(image)
    if image.mode in EIGHT_BIT_MODES and bits > 8:
        raise ValueError(f"{bits} bits per sample in {len(image.getbands())} bands: PIL keeps only "
                         f"the top 8 bits of each value; convert it to 8-bit (e.g. gdal_translate "
                         f"-ot Byte -scale) or to one band per file")
    if image.mode in EIGHT_BIT_MODES:
        return image if image.mode == "RGB" else image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = np.percentile(finite, STRETCH_PERCENTILES) if finite.size else (0.0, 0.0)
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    scaled = np.nan_to_num(np.clip(scaled, 0, 255), nan=0.0)
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L").convert("RGB")


def _tiff_bits(image: Image.Image) -> int:
    """The largest BitsPerSample of a TIFF (tag 258); 8 for other formats."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(258, 8) if tags is not None else 8
    return max(bits) if isinstance(bits, tuple) else int(bits)


def depth_note(image: Image.Image) -> Optional[str]:
    """What the readers do with an image that is not 8-bit (None for an 8-bit one; to_rgb8
    refuses the multi-band TIFFs of more than 8 bits, so `check` reports those as errors)."""
    if image.mode not in EIGHT_BIT_MODES:
        low, high = STRETCH_PERCENTILES
        return (f"not 8-bit (PIL mode {image.mode}): read as 8-bit RGB by a per-image linear "
                f"stretch of its {low:g}-{high:g}% percentiles to 0-255 (data.to_rgb8)")
    return None


def read_image(path: str, transform: Callable):
    """`transform(8-bit RGB PIL image)` (`to_rgb8` reads 16-bit and float images), with errors that
    name the file. Every reader of the package opens images here."""
    try:
        with Image.open(path) as image:
            image.load()
            return transform(to_rgb8(image))
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path}: {e}") from e


def split_at_to_tensor(preprocess) -> Tuple[Callable, Callable]:
    """(steps before ToTensor: decode, resize, crop -> PIL; steps after it, applied to a float
    CHW tensor in [0, 1]). The cache stores the first part's output as uint8."""
    steps = getattr(preprocess, "transforms", None) or []
    at = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
    if at is None:
        raise ValueError(f"cache=True needs a torchvision Compose with a ToTensor step (such as "
                         f"mrs_adapter.clip.transform); got {preprocess!r}")
    return T.Compose(steps[:at]), T.Compose(steps[at + 1:])


def _decode_uint8(path: str, decode: Callable) -> torch.Tensor:
    array = np.array(read_image(path, decode), dtype=np.uint8, copy=True)  # (H, W[, C])
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W), as ToTensor


def cache_images(paths: Sequence[str], decode: Callable, threads: int = 8, name: str = "") -> torch.Tensor:
    """(N, C, H, W) uint8: every image decoded once, in a thread pool, before any DataLoader
    worker starts (forked workers then share the one tensor instead of each decoding again)."""
    start = time.time()
    first = _decode_uint8(paths[0], decode)
    cache = torch.empty((len(paths),) + tuple(first.shape), dtype=torch.uint8)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL releases the GIL while decoding
        for i, image in enumerate(pool.map(lambda p: _decode_uint8(p, decode), paths)):
            if image.shape != first.shape:
                raise ValueError(f"{paths[i]} gives shape {tuple(image.shape)} after resize and crop, "
                                 f"{paths[0]} gives {tuple(first.shape)}: the preprocess must fix the size")
            cache[i] = image
    print(f"cached {len(paths)} {name} images as uint8 {tuple(first.shape)}: "
          f"{cache.numel() / 2 ** 20:.1f} MiB in {time.time() - start:.1f}s")
    return cache


class ImageDataset(Dataset):
    """Each image of a split once, preprocessed (for evaluation; also the images of TrainDataset).

    cache=True decodes every image up front (the recipe applies no image augmentation, so the
    Resize + CenterCrop output never changes) and runs only ToTensor + Normalize per item; the
    tensors are identical to the uncached path."""

    def __init__(self, split: Split, preprocess: Callable, cache: bool = False, threads: int = 8):
        self.paths, self.preprocess, self.cache = split.image_paths, preprocess, None
        if cache:
            decode, self.finish = split_at_to_tensor(preprocess)
            self.cache = cache_images(self.paths, decode, threads, split.name)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is None:
            return read_image(self.paths[i], self.preprocess)
        return self.finish(self.cache[i].to(torch.get_default_dtype()).div(255))  # exactly ToTensor's scaling


class CaptionDataset(Dataset):
    """Each caption of a split once, as CLIP token ids (context_length,), tokenized once up front
    (validation reads the same captions every epoch)."""

    def __init__(self, split: Split, context_length: int = 77):
        self.captions, self.context_length = split.captions, context_length
        self.tokens = tokenize(self.captions, context_length)  # (N, context_length)
        cut = sum(token_count(c) > context_length for c in self.captions)
        if cut:  # once per split: `python -m mrs_adapter.data check` lists them
            print(f"warning: {cut} of {len(self.captions)} {split.name} captions are longer than "
                  f"the {context_length}-token context and are cut to their first "
                  f"{context_length - 2} tokens")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.tokens[j]


class TrainDataset(Dataset):
    """One item per caption, with its image (method.md 4): (image, token ids, image index)."""

    def __init__(self, split: Split, preprocess: Callable, context_length: int = 77, cache: bool = False,
                 threads: int = 8):
        self.images = ImageDataset(split, preprocess, cache, threads)
        self.captions = CaptionDataset(split, context_length)
        self.txt2img = split.txt2img

    def __len__(self) -> int:
        return len(self.txt2img)

    def __getitem__(self, j: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        i = self.txt2img[j]
        return self.images[i], self.captions[j], i


def eval_loaders(split: Split, preprocess: Callable, context_length: int = 77, batch_size: int = 64,
                 workers: int = 0, cache: bool = False) -> Tuple[DataLoader, DataLoader]:
    """(image loader, caption loader) in split order, for `metrics.evaluate`; cache=True pays off
    when the split is evaluated again and again (validation every epoch)."""
    images = DataLoader(ImageDataset(split, preprocess, cache), batch_size=batch_size, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
    return images, DataLoader(CaptionDataset(split, context_length), batch_size=batch_size)  # ids: no workers needed


def _check_images(listings: Dict[str, _Listing], image_dir: str, threads: int) -> List[Problem]:
    """Every listed image must exist and decode; an image listed in two splits is a leak."""
    seen, problems = {}, []
    for split, listing in listings.items():
        for name, origin in zip(listing.names, listing.origins):
            if name in seen and seen[name][0] != split:
                problems.append(Problem(False, *origin, f"{name} is in both {seen[name][0]} and {split}"))
            seen.setdefault(name, (split, origin))

    def check(name: str) -> Tuple[Optional[str], Optional[str]]:  # (error, note on the bit depth)
        path = os.path.join(image_dir, name)
        try:
            read_image(path, lambda image: None)
            with Image.open(path) as image:
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
    """Decode every image of `splits` once; a ValueError lists those that do not open (train.py
    runs this before it makes or empties a run folder, whether or not images are cached)."""
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


def _long_captions(listings: Dict[str, _Listing], context_length: int) -> List[Problem]:
    """A warning for each caption longer than the text context (the tokenizer cuts it)."""
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


def check_dataset(dataset: str, data_root: str, layout: Optional[str] = None, image_dir: Optional[str] = None,
                  verify_images: bool = True, threads: int = 8,
                  captions_per_image: int = CAPTIONS_PER_IMAGE,
                  context_length: int = CONTEXT_LENGTH) -> List[Problem]:
    """Every problem of a dataset, each with its file and line: missing folders, empty files,
    caption / file-name count mismatches (or another count than captions_per_image), blank
    captions (a warning: RSITMD's 20 are kept, as published), captions longer than the context
    (warning: cut), duplicate names, images listed in two splits (warning), missing or
    unreadable images, images that are not 8-bit (warning: how they are read), and copies of an
    image under another name in another split (warning) (the last three with verify_images)."""
    try:
        layout, text, image_dir = locate(dataset, data_root, layout, image_dir)
        listings, problems = _read_listings(layout, text, captions_per_image)
    except (FileNotFoundError, ValueError) as e:
        return [Problem(True, data_root, None, str(e))]
    problems += _long_captions(listings, context_length)
    if verify_images:
        image_problems = _check_images(listings, image_dir, threads)
        problems += image_problems
        problems += _copies_across_splits(listings, image_dir, image_problems, data_root, threads)
    return problems


def _copies_across_splits(listings: Dict[str, _Listing], image_dir: str,
                          image_problems: List[Problem], data_root: str,
                          threads: int) -> List[Problem]:
    """Exact or near copies (overlap.py) of one picture under two names in two splits: a warning,
    since a test image would then be trained on."""
    from .overlap import default_cache, hash_images, near_pairs
    broken = {p.message.split(": ")[0] for p in image_problems if p.fatal}
    items = [(split, name, origin) for split, listing in listings.items()
             for name, origin in zip(listing.names, listing.origins) if name not in broken]
    paths = [os.path.join(image_dir, name) for _, name, _ in items]
    hashes = hash_images(paths, default_cache(data_root), threads)
    groups = {}
    for i, h in enumerate(hashes.exact):
        groups.setdefault(h, []).append(i)
    pairs = {(i, j): "an exact copy" for g in groups.values()
             for x, i in enumerate(g) for j in g[x + 1:]}
    for i, j, d in zip(*near_pairs(hashes)):
        pairs.setdefault((int(i), int(j)), f"a near copy (pHash distance {d})")
    problems = []
    for (i, j), what in sorted(pairs.items()):
        (split_a, name_a, _), (split_b, name_b, origin) = items[i], items[j]
        if split_a != split_b and name_a != name_b:  # the same name in two splits is reported above
            message = f"{name_b} ({split_b}) is {what} of {name_a} ({split_a})"
            problems.append(Problem(False, *origin, message))
    return problems


def _main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import sys
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["overlap"]:  # copies and shared captions between datasets: overlap.py
        from .overlap import main
        return main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m mrs_adapter.data", description=check_dataset.__doc__)
    parser.add_argument("command", choices=["check", "overlap"])
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--layout", choices=["precomp", "json"], help="default: the dataset's usual layout")
    parser.add_argument("--image-dir", help="default: <data-root>/<dataset>_images")
    parser.add_argument("--no-verify-images", action="store_true", help="skip decoding every image")
    parser.add_argument("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE,
                        help="captions of each image in a one-name-per-image list (default 5)")
    parser.add_argument("--context-length", type=int, default=CONTEXT_LENGTH,
                        help="text context of the model, in tokens (default 77, CLIP's)")
    args = parser.parse_args(argv)
    problems = check_dataset(args.dataset, args.data_root, args.layout, args.image_dir,
                             not args.no_verify_images, captions_per_image=args.captions_per_image,
                             context_length=args.context_length)
    for p in problems:
        print(p)
    fatal = sum(p.fatal for p in problems)
    print(f"{args.dataset}: {fatal} error(s), {len(problems) - fatal} warning(s)")
    return 1 if fatal else 0


if __name__ == "__main__":
    raise SystemExit(_main())
