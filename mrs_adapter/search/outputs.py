"""The files a query or an export writes (hits .json and .geojson, the --map and --sheet PNGs,
the GeoParquet export) carry a mark, so that a later run may replace them and nothing else.

JSON and GeoJSON: a top-level member "written_by" (RFC 7946 allows such foreign members); PNG: a
text chunk "written_by"; Parquet: a file key-value metadata entry "written_by". The mark differs
from the index folder's own (store.py), so an output path can never replace an index.json.
"""
import json

from .. import atomic

WRITTEN_BY = "mrs-adapter search.py output"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PARQUET_MAGIC = b"PAR1"


def png_mark():
    """The PngInfo to pass to `Image.save(..., pnginfo=...)` so `written_by_us` knows the PNG."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("written_by", WRITTEN_BY)
    return info


def import_pyarrow(path: str, why: str):
    """(pyarrow, pyarrow.parquet), or a one-line ValueError naming `path` and the extra."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f'{path}: {why} needs pyarrow: pip install -e ".[geo]"') from None
    return pyarrow, pyarrow.parquet


def written_by_us(path: str) -> bool:
    """Whether `path` is a JSON/GeoJSON, PNG or Parquet file that carries WRITTEN_BY.

    The format is told by the file's first bytes, not its name. A Parquet file needs pyarrow to
    be read (a ValueError names the install command)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    if head.startswith(PNG_SIGNATURE):
        from PIL import Image
        try:
            with Image.open(path) as image:
                return getattr(image, "text", {}).get("written_by") == WRITTEN_BY
        except (OSError, SyntaxError, ValueError):
            return False
    if head.startswith(PARQUET_MAGIC):
        pa, pq = import_pyarrow(path, "checking who wrote this Parquet file")
        try:
            metadata = pq.read_metadata(path).metadata or {}
        except (pa.ArrowException, OSError):  # a damaged or truncated file
            return False
        return metadata.get(b"written_by") == WRITTEN_BY.encode()
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("written_by") == WRITTEN_BY


def check_output(path: str, flag: str):
    """Before any work: `path` can be written and, if it exists, an earlier run wrote it
    (atomic.check_output with this module's mark)."""
    atomic.check_output(path, flag, written_by_us, "search.py")
