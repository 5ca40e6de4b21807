"""From a Split to tensors: images, captions, the Datasets and loaders (docs/method.md §4-§6).

- Image files are read as 8-bit RGB, 16-bit and float rasters included (`to_rgb8`).
- Decoded images can be cached as uint8 (`cache_images`).
- The torch Datasets and loaders of training and evaluation.
Every reader of the package opens images through `read_image`.
"""
import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .data import Split
from .tokenizer import token_count, tokenize

EIGHT_BIT_MODES = {"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                   "LAB", "HSV"}
STRETCH_PERCENTILES = (2.0, 98.0)
# The largest image read whole: 2^30 px (a 32768 px square).
# Pillow refuses images over 2 x 89.5 Mpx as possible decompression bombs,
# a guard for pictures from strangers; here the images are the user's own scenes,
# and orthophotos of several hundred Mpx are common.
# 2^30 px of 8-bit RGB take 4 GiB decoded by Pillow (4 bytes a pixel),
# 7 GiB for the moment search.py copies them into the 3 GiB uint8 array it tiles:
# about what a 16 GB machine holds beside a model.
# Other modes (16-bit, float) are stretched in float64 (to_rgb8: several arrays of
# 8 bytes a pixel), so they get an eighth of it.
# A larger image is refused with its size (search.py skips and lists it);
# cut it into smaller files to use it.
MAX_PIXELS = 2 ** 30


def to_rgb8(image: Image.Image) -> Image.Image:
    """PIL image -> 8-bit RGB PIL image; 16-bit, 32-bit integer and float images stretched.

    - 8-bit modes convert as PIL does.
    - Modes I;16*, I, F are stretched linearly, per image: the 2nd percentile of their
      values maps to 0 and the 98th to 255 (clipped; NaN becomes 0).
    - Multi-band TIFFs of more than 8 bits per sample are refused (ValueError):
      PIL decodes them to 8-bit RGB by keeping the top byte of each value,
      which leaves 12-bit data almost black.
    Why a per-image percentile stretch:
    - PIL's convert("RGB") clips every value above 255, so a 16-bit image becomes white;
    - a fixed scale of the dtype's range (/ 257) leaves the 10-12 bits that most sensors use
      almost black;
    - the 2-98% cut is what GIS viewers show by default (QGIS's cumulative count cut),
      so it is what an annotator would have seen.
    The price: two images of one scene with different value ranges look alike,
    and absolute brightness is not kept.
    """
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
    """PIL image -> what the readers do with it if it is not 8-bit; None for an 8-bit one.

    to_rgb8 refuses the multi-band TIFFs of more than 8 bits, so `check` reports those as errors.
    """
    if image.mode not in EIGHT_BIT_MODES:
        low, high = STRETCH_PERCENTILES
        return (f"not 8-bit (PIL mode {image.mode}): read as 8-bit RGB by a per-image linear "
                f"stretch of its {low:g}-{high:g}% percentiles to 0-255 (datasets.to_rgb8)")
    return None


_PILLOW_LIMIT = threading.Lock()
_lifted = [0, None]  # readers inside _own_size_limit, and Pillow's limit to restore after the last


@contextlib.contextmanager
def _own_size_limit():
    """Pillow's decompression-bomb limit lifted while images are opened and decoded here (MAX_PIXELS
    applies instead); restored when the last reader, of any thread, is done."""
    with _PILLOW_LIMIT:
        if _lifted[0] == 0:
            _lifted[1], Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _lifted[0] += 1
    try:
        yield
    finally:
        with _PILLOW_LIMIT:
            _lifted[0] -= 1
            if _lifted[0] == 0:
                Image.MAX_IMAGE_PIXELS = _lifted[1]


@contextlib.contextmanager
def open_image_file(path: str):
    """Path -> `Image.open(path)` (header read, pixels not yet decoded), under MAX_PIXELS.

    MAX_PIXELS replaces Pillow's limit: a larger image raises a ValueError giving its size.
    """
    with _own_size_limit(), Image.open(path) as image:
        width, height = image.size
        limit = MAX_PIXELS if image.mode in EIGHT_BIT_MODES else MAX_PIXELS // 8
        if width * height > limit:
            raise ValueError(f"{width} x {height} px is more than the {limit:,} px read whole "
                             f"(datasets.MAX_PIXELS, mode {image.mode}); cut it into smaller "
                             f"files (e.g. with gdal_retile.py)")
        yield image


def read_image(path: str, transform: Callable):
    """(path, transform) -> transform(8-bit RGB PIL image), with errors that name the file.

    `to_rgb8` reads 16-bit and float images. Every reader of the package opens images here.
    """
    try:
        with open_image_file(path) as image:
            image.load()
            return transform(to_rgb8(image))
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except MemoryError:
        raise ValueError(f"cannot read image {path}: not enough memory to decode it") from None
    # PIL's UnidentifiedImageError is an OSError; DecompressionBombError (a multi-frame image's
    # frame, a TIFF's tile) is not
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def split_at_to_tensor(preprocess) -> Tuple[Callable, Callable]:
    """Compose -> (the steps before ToTensor, the rest as steps on uint8 tensors).

    - first: decode, resize, crop -> PIL; the cache stores its output as uint8;
    - rest: applied to a uint8 (C, H, W) or (N, C, H, W) tensor: scaled to [0, 1] exactly
      as ToTensor scales, then the steps after it.
    """
    steps = getattr(preprocess, "transforms", None) or []
    at = next((i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)), None)
    if at is None:
        raise ValueError(f"cache=True needs a torchvision Compose with a ToTensor step (such as "
                         f"mrs_adapter.clip.transform); got {preprocess!r}")
    scale = T.ConvertImageDtype(torch.get_default_dtype())  # uint8 / 255, as ToTensor
    return T.Compose(steps[:at]), T.Compose([scale] + steps[at + 1:])


def default_workers(device) -> int:
    """Device -> DataLoader worker processes for train.py, eval.py and search.py.

    - CUDA: min(8, CPUs) decode the next batches while the GPU computes.
    - CPU: the model's threads already use every core, so a decoding process only competes
      with them (speed_bench.py measures it for search): the main process decodes between
      batches.
    """
    return min(8, os.cpu_count() or 1) if str(device).startswith("cuda") else 0


def _decode_uint8(path: str, decode: Callable) -> torch.Tensor:
    array = np.array(read_image(path, decode), dtype=np.uint8, copy=True)  # (H, W[, C])
    if array.ndim == 2:
        array = array[:, :, None]
    # (H, W, C) -> (C, H, W), as ToTensor
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def cache_images(paths: Sequence[str], decode: Callable, threads: int = 8,
                 name: str = "") -> torch.Tensor:
    """N paths -> (N, C, H, W) uint8: every image decoded once, in a thread pool.

    Done before any DataLoader worker starts:
    forked workers then share the one tensor instead of each decoding again.
    """
    start = time.time()
    first = _decode_uint8(paths[0], decode)
    cache = torch.empty((len(paths),) + tuple(first.shape), dtype=torch.uint8)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL releases the GIL while decoding
        for i, image in enumerate(pool.map(lambda p: _decode_uint8(p, decode), paths)):
            if image.shape != first.shape:
                raise ValueError(f"{paths[i]} gives shape {tuple(image.shape)} after resize and "
                                 f"crop, {paths[0]} gives {tuple(first.shape)}: the preprocess "
                                 f"must fix the size")
            cache[i] = image
    print(f"cached {len(paths)} {name} images as uint8 {tuple(first.shape)}: "
          f"{cache.numel() / 2 ** 20:.1f} MiB in {time.time() - start:.1f}s")
    return cache


class ImageDataset(Dataset):
    """Item i -> image i of a split, preprocessed (3, H, W): for evaluation, and TrainDataset's.

    cache=True decodes every image up front and runs only ToTensor + Normalize per item:
    the recipe applies no image augmentation, so the Resize + CenterCrop output never changes.
    The tensors are identical to the uncached path.
    """

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
        return self.finish(self.cache[i])


class CaptionDataset(Dataset):
    """Item j -> caption j of a split as CLIP token ids (context_length,).

    Tokenized once up front: validation reads the same captions every epoch.
    """

    def __init__(self, split: Split, context_length: int = 77):
        self.captions, self.context_length = split.captions, context_length
        self.tokens = tokenize(self.captions, context_length)  # (N, context_length)
        cut = sum(token_count(c) > context_length for c in self.captions)
        if cut:  # once per split: `python -m mrs_adapter.prepare check` lists them
            print(f"warning: {cut} of {len(self.captions)} {split.name} captions are longer than "
                  f"the {context_length}-token context and are cut to their first "
                  f"{context_length - 2} tokens")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.tokens[j]


class TrainDataset(Dataset):
    """Item j -> (image (3, H, W), token ids (context_length,), image index) of caption j.

    One item per caption, with its image (docs/method.md §4).
    """

    def __init__(self, split: Split, preprocess: Callable, context_length: int = 77,
                 cache: bool = False, threads: int = 8):
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
    """Split -> (image loader, caption loader) in split order, for `metrics.evaluate`.

    cache=True pays off when the split is evaluated again and again (validation every epoch).
    """
    images = DataLoader(ImageDataset(split, preprocess, cache), batch_size=batch_size,
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=torch.cuda.is_available())
    # token ids are ready-made tensors: no workers needed
    captions = DataLoader(CaptionDataset(split, context_length), batch_size=batch_size)
    return images, captions
