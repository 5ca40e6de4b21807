"""What a raster file says about itself, for raster.py (docs/geotiff.md): the bands shown as red,
green, blue, what marks invalid pixels, its CRS and affine, its pixel size on the ground; and the
geometry of pixel boxes on the ground. Functions of a rasterio dataset's metadata (`src`) in
plain Python and numpy: the module imports without rasterio.
"""
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

WGS84_A, WGS84_E2 = 6378137.0, 6.69437999014e-3  # semi-major axis (m), eccentricity squared


def metres_per_degree(lat: float) -> Tuple[float, float]:
    """(east, north): metres per degree of longitude and of latitude at latitude `lat`, from the
    WGS84 ellipsoid's radii of curvature (prime vertical, meridian)."""
    sin2 = math.sin(math.radians(lat)) ** 2
    w = math.sqrt(1.0 - WGS84_E2 * sin2)
    prime, meridian = WGS84_A / w, WGS84_A * (1.0 - WGS84_E2) / w ** 3
    return math.radians(1.0) * prime * math.cos(math.radians(lat)), math.radians(1.0) * meridian


def shown_bands(path: str, src, bands) -> Tuple[Tuple[int, int, int], List[str]]:
    """(the 1-based bands shown as red, green, blue, notes): `bands` (1 or 3 numbers) checked;
    default the bands whose colour interpretation is red, green, blue, else the first three
    that are not alpha (with a note saying so), a single band repeated as gray."""
    names = [c.name for c in src.colorinterp]
    if bands is not None:
        shown = tuple(int(b) for b in bands)
        if len(shown) not in (1, 3) or not all(1 <= b <= src.count for b in shown):
            raise ValueError(f"{path}: --bands {' '.join(str(b) for b in bands)}: expected 1 or 3 "
                             f"band numbers from 1 to {src.count} (1-based, as GDAL numbers them)")
        return (shown * 3 if len(shown) == 1 else shown), []
    if {"red", "green", "blue"} <= set(names):
        return tuple(names.index(c) + 1 for c in ("red", "green", "blue")), []
    data = [i + 1 for i, name in enumerate(names) if name != "alpha"] or [1]
    shown = tuple(data[:3]) if len(data) >= 3 else (data[0],) * 3
    if len(data) == 1:
        return shown, []  # gray or a palette: nothing to choose
    what = (f"band {shown[0]} shown as gray" if len(set(shown)) == 1 else
            f"bands {' '.join(map(str, shown))} shown as red, green, blue")
    return shown, [f"{what}: the file names no red, green and blue bands (its bands: "
                   f"{', '.join(names)}); choose them with --bands"]


def nodata_kind(src, bands) -> str:
    """What marks invalid pixels of `bands`: "none", "nodata value V", "alpha band N" or
    "internal mask" (GDAL's mask flags)."""
    flags = {f.name for b in bands for f in src.mask_flag_enums[b - 1]}
    if flags == {"all_valid"}:
        return "none"
    names = [c.name for c in src.colorinterp]
    if "alpha" in flags:
        return f"alpha band {names.index('alpha') + 1}" if "alpha" in names else "alpha band"
    if "nodata" in flags:
        return f"nodata value {src.nodatavals[bands[0] - 1]:g}"
    return "internal mask"


def georeferencing(src) -> Tuple[Optional[str], Optional[Tuple[float, ...]], List[str]]:
    """(CRS as "EPSG:<code>" or WKT, the affine's six numbers, notes); (None, None, note)
    without georeferencing. GDAL's transform maps pixel corners (PixelIsPoint files are shifted
    by half a pixel on reading), so a box's corners go through it as they are."""
    if src.crs is None or src.transform.is_identity:
        gcps = bool(src.gcps[0])
        return None, None, ["georeferenced by ground control points only, which are not read: "
                            "pixel boxes only" if gcps else "not georeferenced: pixel boxes only"]
    epsg = src.crs.to_epsg(confidence_threshold=100)
    return (f"EPSG:{epsg}" if epsg else src.crs.to_wkt()), tuple(src.transform)[:6], []


def native_gsd(src) -> Optional[Tuple[float, float]]:
    """Metres on the ground of one column step and one row step: the affine's pixel size in CRS
    units times the unit's metres; for degrees, metres per degree at the scene's centre."""
    a, b, _, d, e, f = tuple(src.transform)[:6]
    if src.crs.is_geographic:
        lat = d * src.width / 2 + e * src.height / 2 + f  # the centre's latitude
        east, north = metres_per_degree(lat)
        return math.hypot(a * east, d * north), math.hypot(b * east, e * north)
    from rasterio.errors import CRSError  # src is rasterio's: rasterio is there
    try:
        _, metres = src.crs.linear_units_factor
    except CRSError:  # a CRS without a known linear unit
        return None
    return math.hypot(a, d) * metres, math.hypot(b, e) * metres


def gsd_scale(path: str, native, gsd: Optional[float]) -> Tuple[float, float]:
    """Output px per full-resolution px (x, y) for `gsd` metres per output px."""
    if gsd is None:
        return 1.0, 1.0
    if not gsd > 0:
        raise ValueError(f"--gsd {gsd}: expected a ground sampling distance in metres, above 0")
    if native is None:
        raise ValueError(f"{path}: --gsd {gsd:g} needs a georeferenced file whose CRS has a known "
                         f"unit; this one has none: index it without --gsd")
    return native[0] / gsd, native[1] / gsd


def palette(src, shown) -> Optional[List[Tuple[int, int, int]]]:
    """The colour table of a single shown paletted band as a list index -> RGB, else None."""
    if len(set(shown)) > 1 or src.colorinterp[shown[0] - 1].name != "palette":
        return None
    table = src.colormap(shown[0])
    return [tuple(table.get(i, (0, 0, 0))[:3]) for i in range(max(table) + 1)]


def signed_area(ring: Sequence[Sequence[float]]) -> float:
    """Twice the signed area of a polygon (shoelace): positive when counter-clockwise."""
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1]))


def box_corners(transform: Sequence[float], boxes) -> Tuple[np.ndarray, np.ndarray]:
    """(x, y) of each box's corners in the CRS, (4 N,) each: for box i, elements 4i..4i+3 are
    its (left, bottom), (right, bottom), (right, top), (left, top) pixel corners through the
    affine (a, b, c, d, e, f): x = a col + b row + c, y = d col + e row + f."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)  # (N, 4) left, top, right, bottom
    cols = boxes[:, [0, 2, 2, 0]].ravel()
    rows = boxes[:, [3, 3, 1, 1]].ravel()
    a, b, c, d, e, f = transform
    return a * cols + b * rows + c, d * cols + e * rows + f


def closed_ccw_ring(points: Sequence[Sequence[float]]) -> List[List[float]]:
    """The polygon through `points` as a closed (first = last), counter-clockwise ring, as RFC
    7946 wants an exterior ring: a north-up affine gives counter-clockwise corners, one that
    flips an axis gives them clockwise."""
    ring = [[float(x), float(y)] for x, y in points]
    if signed_area(ring) < 0:
        ring.reverse()
    return ring + ring[:1]
