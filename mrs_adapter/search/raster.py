"""One GeoTIFF / COG scene read by windows for search (docs/geotiff.md). Beyond the paper, whose
retrieval sets are small 8-bit RGB chips (docs/method.md §5).

`open_scene` reads metadata and a small sample (an overview, a decimated read or a grid of
windows), never the whole scene. The Scene shows three bands as red, green, blue; values that are
not 8-bit get ONE linear stretch per scene, so its tiles stay comparable; nodata, alpha and mask
pixels are invalid; `--gsd` resamples through the file's overviews. `Scene.tiles` reads one window
per tile, so memory does not grow with the scene; `Scene.footprints` places tiles on the map.
rasterio (the `[geo]` extra) is imported inside the functions that use it.
"""
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..datasets import STRETCH_PERCENTILES
from . import raster_info as info
from .grid import tile_boxes
from .readers import pillow_would_misread, rasterio_missing

Box = Tuple[int, int, int, int]  # (left, top, right, bottom) in full-resolution pixels
SAMPLE_SIDE = 1024  # the stretch's sample: one read of at most 1024 px a side (~1M px a band),
SAMPLE_GRID, SAMPLE_WINDOW = 8, 128  # or, without a small overview, 8 x 8 windows of 128 px
# GDAL's block cache. GDAL's default (5% of the RAM) lets a large scene's decoded blocks pile up,
# so every read here runs under a cap (_block_cache): single windows under MIN_CACHE; the tiles,
# read in vertical bands BAND_PX wide (reading_order), under what one band's blocks need, so peak
# memory stays flat in the scene's size; a decimated read of a whole scene (the stretch's sample,
# --map's overview) under a row of its blocks, else GDAL decodes each block once per output row.
MIN_CACHE = 16 * 2 ** 20
BAND_PX = 2048


def _rasterio(path: str):
    try:
        import rasterio
    except ImportError:
        why = pillow_would_misread(path) or "it by windows, with its coordinates and nodata"
        raise rasterio_missing(path, why) from None
    return rasterio


@contextmanager
def _opened(path: str):
    """The rasterio dataset, without rasterio's warning for a file with no georeferencing, read
    under a GDAL block cache of MIN_CACHE bytes (Scene.tiles raises it for its bands)."""
    rasterio = _rasterio(path)
    with rasterio.Env(GDAL_CACHEMAX=MIN_CACHE):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(path)
        with src:
            yield src


def reading_order(boxes: List[Optional[Box]], band: int) -> List[Optional[Box]]:
    """`boxes` band by band: vertical bands `band` px wide, left to right, each top to bottom. A
    row-by-row walk would keep two rows of blocks across the whole scene decoded; a band's walk
    keeps those of one band, whatever the scene's width."""
    if boxes == [None]:
        return boxes
    return sorted(boxes, key=lambda b: (b[0] // band, b[1], b[0]))


def _block_cache(src, across: int, down: int) -> int:
    """Bytes of the blocks a read walking `across` x `down` full-res px touches at once (a band of
    tiles: BAND_PX x a tile; a whole-scene read: the width x 0): the blocks across plus one by
    those down plus one, of every band (pixel-interleaved files decode them together) and a mask
    byte, at least MIN_CACHE. A file of full-width strips (not tiled) needs a
    whole row of strips: its cost grows with its width, which only a tiled file avoids."""
    block_h, block_w = src.block_shapes[0]
    across = min(src.width, (across // block_w + 2) * block_w)
    down = min(src.height, (down // block_h + 2) * block_h)
    per_px = src.count * max(np.dtype(t).itemsize for t in src.dtypes) + 1
    return max(MIN_CACHE, across * down * per_px)


def stretch_to_uint8(values: np.ndarray, stretch: Sequence[Tuple[float, float]]) -> np.ndarray:
    """(B, H, W) values -> (H, W, B) uint8: band i's low maps to 0 and high to 255, clipped, NaN
    to 0; the linear map datasets.to_rgb8 applies to 16-bit and float images (here in float32,
    which holds 16-bit values exactly, for speed: a level may round the other way)."""
    low = np.array([s[0] for s in stretch], np.float32)
    high = np.array([s[1] for s in stretch], np.float32)
    scaled = np.ascontiguousarray(values.transpose(1, 2, 0), dtype=np.float32)  # (H, W, B)
    scaled -= low
    scaled *= 255.0 / np.maximum(high - low, 1e-12)
    np.clip(scaled, 0, 255, out=scaled)
    if values.dtype.kind == "f":
        np.nan_to_num(scaled, copy=False, nan=0.0)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def _read(src, bands, window, shape, resampling="nearest", masked=True, max_invalid=1.0):
    """(values (B, h, w) of `bands` or None, valid (h, w) bool) of `window` (None: the whole
    scene) resampled to `shape`. A pixel is valid where any band's mask (nodata, alpha or internal
    mask) says so and its values are finite; values are not read when more than `max_invalid`
    of the pixels are invalid."""
    from rasterio.enums import Resampling
    kw = dict(window=window, out_shape=(len(bands),) + tuple(shape),
              resampling=Resampling[resampling])
    valid = np.ones(shape, bool)
    if masked:  # a resampled mask is averaged: keep the pixels that are mostly valid
        valid = src.read_masks(bands, **kw).max(axis=0) >= 128
    if 1.0 - valid.mean() > max_invalid:
        return None, valid
    values = src.read(bands, **kw)
    if values.dtype.kind == "f":
        valid &= np.isfinite(values).all(axis=0)
    return values, valid


def _sample(src, bands: List[int], masked: bool) -> Tuple[np.ndarray, float, str]:
    """(values (B, N) of the sampled valid pixels, the sample's valid fraction, how it was read).

    One decimated read (GDAL takes it from an overview where one is fine enough) when the scene
    or its smallest overview is at most 4 x SAMPLE_SIDE a side; else SAMPLE_GRID^2 windows spread
    over the scene, since a decimated read of a large scene without overviews decodes it all."""
    width, height = src.width, src.height
    if max(width, height) / max(src.overviews(bands[0]), default=1) <= 4 * SAMPLE_SIDE:
        scale = min(1.0, SAMPLE_SIDE / max(width, height))
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        from rasterio import Env
        with Env(GDAL_CACHEMAX=_block_cache(src, width, 0)):
            reads = [_read(src, bands, None, shape, masked=masked)]
        how = f"a {shape[1]} x {shape[0]} px read of the whole scene"
    else:
        from rasterio.windows import Window
        w, h = min(SAMPLE_WINDOW, width), min(SAMPLE_WINDOW, height)
        xs = np.linspace(0, width - w, SAMPLE_GRID).round().astype(int)
        ys = np.linspace(0, height - h, SAMPLE_GRID).round().astype(int)
        reads = [_read(src, bands, Window(x, y, w, h), (h, w), masked=masked)
                 for y in ys for x in xs]
        how = f"{len(reads)} windows of {w} x {h} px spread over the scene"
    values = np.concatenate([v[:, ok] for v, ok in reads], axis=1).astype(np.float64)
    return values, values.shape[1] / sum(ok.size for _, ok in reads), how


def open_scene(path: str, bands: Optional[Sequence[int]] = None, gsd: Optional[float] = None,
               stretch: Optional[Tuple[float, float]] = None, max_nodata: float = 0.5) -> "Scene":
    """The Scene of the raster at `path`, from its metadata and a small sample (no full read).

    bands: 1 or 3 band numbers (1-based, as GDAL numbers them) shown as red, green, blue, one
    repeated as gray; default: see raster_info.shown_bands. gsd: metres per output pixel, for
    files whose CRS has a unit (ValueError naming the file otherwise). stretch: (low, high)
    mapped to 0..255 in every shown band when the values are not 8-bit; default: this scene's
    2nd and 98th percentiles of valid sampled pixels, per band. max_nodata: the largest invalid
    fraction of a tile that `tiles` yields pixels for. Errors name the file (ValueError, or
    rasterio's OSError); RasterioMissing without rasterio."""
    if not 0.0 <= max_nodata <= 1.0:
        raise ValueError(f"--max-nodata {max_nodata}: expected a fraction from 0 to 1")
    with _opened(path) as src:
        shown, notes = info.shown_bands(path, src, bands)
        unique = sorted(set(shown))
        dtypes = {src.dtypes[b - 1] for b in unique}
        if any(np.dtype(t).kind == "c" for t in dtypes):
            raise ValueError(f"{path}: complex band values ({', '.join(dtypes)}) are not an image")
        crs, transform, geo_notes = info.georeferencing(src)
        native = info.native_gsd(src) if crs else None
        scale = info.gsd_scale(path, native, gsd)
        if max(scale) > 1.0:
            notes.append(f"--gsd {gsd:g} is finer than the file's {min(native):.3g} m: tiles are "
                         f"upsampled {max(scale):.3g}x (bilinear), which adds no detail")
        nodata = info.nodata_kind(src, unique)
        values, valid_fraction, how = _sample(src, unique, nodata != "none")
        scene = Scene(
            path=path, width=src.width, height=src.height, count=src.count, bands=shown,
            band_names=tuple(src.colorinterp[b - 1].name for b in shown),
            dtype="/".join(sorted(dtypes)), crs=crs, transform=transform, nodata=nodata,
            stretch=None, stretch_from="8-bit values as they are", fill=(0, 0, 0),
            scale=scale, gsd=gsd, native_gsd=native,
            max_nodata=max_nodata, valid_fraction=valid_fraction,
            overviews=src.overviews(unique[0]),
            palette=info.palette(src, shown), notes=notes + geo_notes)
    return _with_stretch_and_fill(scene, values, unique, dtypes == {"uint8"}, stretch, how)


def _with_stretch_and_fill(scene: "Scene", values: np.ndarray, unique: List[int],
                           eight_bit: bool, fixed, how: str) -> "Scene":
    """`scene` with its stretch (fixed, or the sample's percentiles when not 8-bit) and its fill:
    the sample's per-band median (for a palette, its most frequent index) shown as the tiles are.
    A flat patch of the scene's typical colour adds nothing the model could match, where black
    fill would read as water or shadow; a scene with no valid sampled pixel fills with black."""
    rows = [unique.index(b) for b in scene.bands]
    if scene.palette is None and not eight_bit:
        if fixed is not None:
            low, high = (float(v) for v in fixed)
            if not low < high:
                raise ValueError(f"--stretch {low:g} {high:g}: expected MIN below MAX")
            stretch, source = [(low, high)] * 3, "--stretch"
        elif values.shape[1]:
            cuts = np.percentile(values, STRETCH_PERCENTILES, axis=1).T  # (B, 2)
            stretch = [tuple(float(v) for v in cuts[r]) for r in rows]
            source = f"{STRETCH_PERCENTILES[0]:g}-{STRETCH_PERCENTILES[1]:g}% of {how}"
        else:
            stretch, source = [(0.0, 0.0)] * 3, "no valid pixel sampled"
        scene = replace(scene, stretch=stretch, stretch_from=source)
    if not values.shape[1]:
        return scene
    if scene.palette is not None:
        typical = np.full(3, np.bincount(values[0].astype(np.int64)).argmax())
    else:
        typical = np.median(values, axis=1)[rows]
    fill = scene.to_rgb(typical.reshape(3, 1, 1))[0, 0]
    return replace(scene, fill=tuple(int(v) for v in fill))


@dataclass
class Scene:
    """One raster file as search reads it (made by open_scene). Plain data: it pickles into
    DataLoader workers, and `record()` is what the index keeps.

    width, height: full-resolution px. bands: the 1-based bands shown as red, green, blue;
    band_names: their colour interpretations. crs: "EPSG:<code>" or WKT, None without
    georeferencing. transform: the full-resolution affine (a, b, c, d, e, f): x = a col + b row
    + c, y = d col + e row + f at pixel corners. scale: output px per full-res px (x, y) after
    --gsd. stretch: per shown band (low, high) mapped to 0..255; None for 8-bit values and
    palettes. fill: the RGB of invalid pixels in kept tiles. nodata: what marks invalid pixels."""
    path: str
    width: int
    height: int
    count: int
    bands: Tuple[int, int, int]
    band_names: Tuple[str, ...]
    dtype: str
    crs: Optional[str]
    transform: Optional[Tuple[float, ...]]
    nodata: str
    stretch: Optional[List[Tuple[float, float]]]
    stretch_from: str
    fill: Tuple[int, int, int]
    scale: Tuple[float, float]
    gsd: Optional[float]
    native_gsd: Optional[Tuple[float, float]]
    max_nodata: float
    valid_fraction: float
    overviews: List[int]
    palette: Optional[List[Tuple[int, int, int]]] = None
    notes: List[str] = field(default_factory=list)

    @property
    def output_size(self) -> Tuple[int, int]:
        """(width, height) in output px: the full resolution after --gsd."""
        return (max(1, round(self.width * self.scale[0])),
                max(1, round(self.height * self.scale[1])))

    def to_rgb(self, values: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
        """(3, h, w) values of the shown bands, (h, w) validity -> (h, w, 3) uint8: through the
        palette or the stretch (8-bit values as they are), invalid pixels set to `fill`."""
        if self.palette is not None:
            table = np.asarray(self.palette, np.uint8)
            rgb = table[np.clip(values[0].astype(np.int64), 0, len(table) - 1)]
        elif self.stretch is None:
            rgb = np.ascontiguousarray(values.transpose(1, 2, 0), dtype=np.uint8)
        else:
            rgb = stretch_to_uint8(values, self.stretch)
        if valid is not None:
            rgb[~valid] = self.fill
        return rgb

    def _resampling(self) -> str:
        if self.scale == (1.0, 1.0):
            return "nearest"  # no resampling: the file's own pixels
        return "average" if max(self.scale) <= 1.0 else "bilinear"

    def _read_shown(self, src, window, shape, max_invalid=1.0, resampling="nearest"):
        """(rgb (h, w, 3) uint8 or None, invalid fraction) of `window` resampled to `shape`."""
        unique = sorted(set(self.bands))
        values, valid = _read(src, unique, window, shape, resampling, self.nodata != "none",
                              max_invalid)
        invalid = 1.0 - float(valid.mean())
        if values is None or invalid > max_invalid:
            return None, invalid
        return self.to_rgb(values[[unique.index(b) for b in self.bands]], valid), invalid

    def tiles(self, tile: int, stride: int, start: int = 0, stop: Optional[int] = None
              ) -> Iterator[Tuple[Box, Optional[np.ndarray], float]]:
        """(box, rgb, invalid) for each tile of search/grid.py's grid (tile_boxes: a scene of at
        most 1.5 tiles a side whole, else `tile` px every `stride` px, the last row and column
        flush with the edge) laid in OUTPUT px (after --gsd), read one window at a time in
        reading_order (bands BAND_PX wide, each top to bottom; a scene at most that wide: row by
        row) under a cache of one band's blocks; only tiles start..stop-1 of that order
        (len(tile_boxes(*output_size, tile, stride)) in all), so a caller can read in parts.

        box: (left, top, right, bottom) in full-resolution px of the file ((0, 0, width, height)
        for a scene tile_boxes keeps whole, where it says None). rgb: uint8 (h, w, 3)
        in output px ((tile, tile, 3) except a whole scene or a short edge), invalid pixels set
        to `fill`, for the caller to resize and crop as it does a Pillow image; None when more
        than max_nodata of the tile is invalid: the caller counts it and skips it. invalid: the
        tile's invalid fraction (nodata, alpha, mask or non-finite)."""
        rasterio = _rasterio(self.path)  # RasterioMissing, not a bare ImportError
        from rasterio.windows import Window

        out_w, out_h = self.output_size
        band = max(1, round(BAND_PX * out_w / self.width))  # output px
        boxes = reading_order(tile_boxes(out_w, out_h, tile, stride), band)[start:stop]
        with _opened(self.path) as src:
            cache = _block_cache(src, BAND_PX, round(tile * self.height / out_h))
            with rasterio.Env(GDAL_CACHEMAX=cache):
                for out_box in boxes:
                    left, top, right, bottom = out_box or (0, 0, out_w, out_h)
                    box = (round(left * self.width / out_w), round(top * self.height / out_h),
                           round(right * self.width / out_w), round(bottom * self.height / out_h))
                    window = Window(box[0], box[1], max(1, box[2] - box[0]),
                                    max(1, box[3] - box[1]))
                    rgb, invalid = self._read_shown(src, window, (bottom - top, right - left),
                                                    self.max_nodata, self._resampling())
                    yield box, rgb, invalid

    def window(self, box: Box) -> np.ndarray:
        """(h, w, 3) uint8: the full-resolution pixels of `box`, shown as the tiles are."""
        from rasterio.windows import Window
        left, top, right, bottom = box
        with _opened(self.path) as src:
            rgb, _ = self._read_shown(src, Window(left, top, right - left, bottom - top),
                                      (bottom - top, right - left))
        return rgb

    def overview(self, max_side: int = 1024) -> Tuple[np.ndarray, float]:
        """(uint8 RGB (h, w, 3), scale): the whole scene at most `max_side` px a side (GDAL reads
        it from the overviews where they exist), shown as the tiles are; scale = overview px per
        full-res px, so a box times scale outlines its tile on the picture."""
        scale = min(1.0, max_side / max(self.width, self.height))
        shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        rasterio = _rasterio(self.path)
        with _opened(self.path) as src, rasterio.Env(GDAL_CACHEMAX=_block_cache(src, src.width, 0)):
            rgb, _ = self._read_shown(src, None, shape)
        return rgb, scale

    def footprints(self, boxes: Sequence[Optional[Box]]) -> List[Optional[dict]]:
        """One per box (full-res px; None: the whole scene): {"bounds": [minx, miny, maxx, maxy]
        in `crs`, "lonlat": [[lon, lat] x 5], the corners in WGS84, a closed counter-clockwise
        ring}; None for every box without georeferencing. The four corners go through the
        affine, then all boxes' corners to WGS84 in one rasterio.warp.transform; the edges are
        the straight lines between them (not split at the antimeridian)."""
        if self.crs is None:
            return [None] * len(boxes)
        _rasterio(self.path)
        from rasterio.warp import transform as to_crs
        corners = [box or (0, 0, self.width, self.height) for box in boxes]
        xs, ys = info.box_corners(self.transform, corners)  # (4 N,) each
        lon, lat = to_crs(self.crs, "EPSG:4326", xs.tolist(), ys.tolist())
        out = []
        for i in range(len(corners)):
            x, y, j = xs[4 * i:4 * i + 4], ys[4 * i:4 * i + 4], slice(4 * i, 4 * i + 4)
            out.append({"bounds": [float(x.min()), float(y.min()), float(x.max()), float(y.max())],
                        "lonlat": info.closed_ccw_ring(zip(lon[j], lat[j]))})
        return out

    def footprint(self, box: Optional[Box] = None) -> Optional[dict]:
        """footprints([box])[0]."""
        return self.footprints([box])[0]

    def record(self) -> dict:
        """What was used for this file, JSON-ready, for the index to keep per file."""
        return {"reader": "rasterio", "size": [self.width, self.height],
                "bands": list(self.bands), "band_names": list(self.band_names),
                "dtype": self.dtype, "palette": self.palette is not None,
                "stretch": [list(s) for s in self.stretch] if self.stretch else None,
                "stretch_from": self.stretch_from, "fill": list(self.fill),
                "nodata": self.nodata, "max_nodata": self.max_nodata,
                "valid_fraction": self.valid_fraction, "gsd": self.gsd,
                "native_gsd": list(self.native_gsd) if self.native_gsd else None,
                "scale": list(self.scale), "crs": self.crs,
                "transform": list(self.transform) if self.transform else None,
                "notes": list(self.notes)}

