"""Which reader opens an image for search: Pillow (the package's reader, datasets.read_image) or
rasterio (raster.py, the optional `[geo]` extra; docs/geotiff.md).

Pillow decodes a file whole and shows at most three 8-bit bands; it reads some GeoTIFFs wrong
without an error (a 4-band 16-bit file as its first band). This module uses Pillow only, so it
answers without rasterio and turns "Pillow would misread this file" into one line that names
the file and the install command, never into a silent first band.
"""
import struct
import warnings
from typing import Optional

from PIL import Image, TiffImagePlugin

INSTALL = 'pip install -e ".[geo]"'
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF
ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}  # one band beyond the colours is an alpha band


class RasterioMissing(ImportError):
    """A file needs rasterio and it is not installed: the message is one line naming the file,
    why it needs rasterio and the install command."""


def rasterio_missing(path: str, why: str) -> RasterioMissing:
    return RasterioMissing(f"{path}: reading {why} needs rasterio: {INSTALL}")


def has_rasterio() -> bool:
    """Whether rasterio imports (the `[geo]` extra is installed)."""
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def is_tiff(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def pillow_would_misread(path: str) -> Optional[str]:
    """Why Pillow cannot be trusted with `path` (a phrase: "a 4-band 16-bit TIFF that Pillow
    cannot open"), or None when Pillow reads it right. Reads the header only, with Pillow only.

    Misread: a TIFF Pillow cannot open; more samples per pixel than the bands Pillow shows (a
    4-band 16-bit file opened as its first band; alpha aside); more than one band over 8 bits
    (Pillow keeps the top byte); a scene above Pillow's decompression-bomb limit (it decodes a
    file whole). JPEG and PNG below that limit, and 8-bit gray / RGB / RGBA TIFFs, read right."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return _misread(image)
    except Image.DecompressionBombError:
        return f"a scene above {2 * Image.MAX_IMAGE_PIXELS} px, which Pillow refuses to decode"
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError):  # PIL's UnidentifiedImageError is an OSError
        # a TIFF may still be one rasterio reads (Pillow opens few multi-band layouts); another
        # format is Pillow's to report as unreadable
        if not is_tiff(path):
            return None
        return f"a {_tiff_layout(path) or ''}TIFF that Pillow cannot open"


def _layout(tags) -> str:
    """ "4-band 16-bit " from a TIFF's tags: SamplesPerPixel (277), BitsPerSample (258)."""
    bits = tags.get(258, 8)
    return f"{int(tags.get(277, 1))}-band {max(bits) if isinstance(bits, tuple) else bits}-bit "


def _tiff_layout(path: str) -> Optional[str]:
    """_layout of a TIFF's first directory, read by Pillow's tag reader (which reads layouts
    Image.open refuses); None when even that fails (a damaged file: its reader will say why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            tags = TiffImagePlugin.ImageFileDirectory_v2(head if head[2] == 43 else head[:8])
            f.seek(tags.next)
            tags.load(f)
    except (OSError, SyntaxError, ValueError, IndexError, struct.error):
        return None
    return _layout(tags)


def _misread(image: Image.Image) -> Optional[str]:
    width, height = image.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return (f"a {width} x {height} px scene (Pillow decodes a file whole and warns above "
                f"{limit} px)")
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None  # JPEG, PNG: Pillow's modes show every band they hold
    samples, shown = int(tags.get(277, 1)), len(image.getbands())
    bits = tags.get(258, 8)
    bits = max(bits) if isinstance(bits, tuple) else int(bits)
    if samples > shown:
        return f"a {_layout(tags)}TIFF (Pillow reads {shown} band{'s' * (shown > 1)})"
    if samples > 3 and image.mode not in ALPHA_MODES:
        return f"a {_layout(tags)}TIFF"
    if samples > 1 and bits > 8:
        return f"a {_layout(tags)}TIFF (Pillow keeps the top 8 bits of each value)"
    return None


def choose_reader(path: str) -> str:
    """"rasterio" or "pillow": the reader of `path` for search.

    With rasterio installed every TIFF goes to it (windows, so memory does not grow with the
    scene; coordinates; nodata), and so does any file Pillow would misread; JPEG and PNG stay
    with Pillow. Without rasterio, Pillow reads what it reads right, and a file it would misread
    raises RasterioMissing: "<file>: reading <why> needs rasterio: pip install -e ".[geo]"";
    a scene that is only too large for Pillow's own limit stays with Pillow (read whole)."""
    why = pillow_would_misread(path)
    if has_rasterio():
        return "rasterio" if why is not None or is_tiff(path) else "pillow"
    if why is not None and not only_too_large(why):
        raise rasterio_missing(path, why)
    return "pillow"  # a large scene Pillow reads right: whole, up to datasets.MAX_PIXELS


def only_too_large(why: str) -> bool:
    """Whether pillow_would_misread's `why` is the scene's size alone: Pillow reads it right,
    whole, under the package's own limit (datasets.MAX_PIXELS); rasterio is only preferred, to
    read it by window."""
    return why.startswith("a scene above") or " px scene (Pillow decodes a file whole" in why
