"""Hits as files a GIS opens, read back to refine a query, and kept to a lon/lat box.

A hit is a dict {"rank", "score", "path", "box", "crs", "bounds", "footprint"}: box is
[left, top, right, bottom] in the file's pixels (None for a whole image), crs the file's CRS
("EPSG:32633", or WKT; None without georeferencing), bounds [minx, miny, maxx, maxy] in that CRS,
footprint the tile's outline in WGS84 as a closed counter-clockwise ring [[lon, lat], ...].
`write_hits_json` (--json) and `write_geojson` (--geojson, RFC 7946) write hits, `read_hits` reads
either back for `--like FILE:1,4` / `--unlike FILE:7`, and `within` is --within.
"""
import json
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..atomic import atomic_write
from .outputs import WRITTEN_BY

HIT_KEYS = ("rank", "score", "path", "box", "crs", "bounds", "footprint")
PROPERTIES = ("rank", "score", "path", "box", "crs", "bounds")  # a GeoJSON feature's; + geometry


def lonlat_ring(ring: Sequence[Sequence[float]], where: str) -> List[List[float]]:
    """`ring` as RFC 7946 wants it: closed (first point = last) and counter-clockwise (positive
    shoelace area: a ring given clockwise is reversed); lon in -180..180, lat in -90..90."""
    points = [[float(lon), float(lat)] for lon, lat in ring]
    if points and points[0] != points[-1]:
        points.append(list(points[0]))
    if len(points) < 4:
        raise ValueError(f"{where}: a footprint needs at least 3 corners, got {ring}")
    for lon, lat in points:
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):  # also false for NaN
            raise ValueError(f"{where}: footprint point ({lon}, {lat}) is not a WGS84 lon/lat")
    twice_area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return points if twice_area >= 0 else points[::-1]


def hit_record(hit: Dict) -> Dict:
    """The hit's HIT_KEYS with JSON types (a missing key is None), its footprint as lonlat_ring."""
    record = {key: hit.get(key) for key in HIT_KEYS}
    record["rank"], record["score"] = int(hit["rank"]), float(hit["score"])
    for key in ("box", "bounds"):
        if record[key] is not None:
            record[key] = [v.item() if hasattr(v, "item") else v for v in record[key]]
    if record["footprint"] is not None:
        record["footprint"] = lonlat_ring(record["footprint"], f"hit {record['rank']}")
    return record


def write_hits_json(path: str, hits: List[Dict], query: str):
    """--json: {"written_by", "query": what made the query, "hits": [hit, ...]}, atomically."""
    payload = {"written_by": WRITTEN_BY, "query": query, "hits": [hit_record(h) for h in hits]}
    atomic_write(path, lambda f: json.dump(payload, f, indent=1))


def feature_collection(hits: List[Dict], query: str) -> Dict:
    """The hits as an RFC 7946 FeatureCollection: one Feature per hit, in rank order, with a WGS84
    Polygon, or a null geometry for a hit without georeferencing (RFC 7946 3.2 allows it; GDAL and
    QGIS read such a feature as a table row): so every hit, and every rank, is in the file."""
    features, corners = [], []
    for record in map(hit_record, hits):
        ring = record["footprint"]
        geometry = None if ring is None else {"type": "Polygon", "coordinates": [ring]}
        corners += ring or []
        features.append({"type": "Feature", "id": record["rank"], "geometry": geometry,
                         "properties": {key: record[key] for key in PROPERTIES}})
    collection = {"type": "FeatureCollection", "written_by": WRITTEN_BY, "query": query}
    if corners:
        lons, lats = zip(*corners)
        collection["bbox"] = [min(lons), min(lats), max(lons), max(lats)]
    collection["features"] = features
    return collection


def write_geojson(path: str, hits: List[Dict], query: str) -> int:
    """--geojson: feature_collection(hits, query) written atomically; returns how many hits have
    no footprint (written with a null geometry), for the command to say so."""
    collection = feature_collection(hits, query)
    atomic_write(path, lambda f: json.dump(collection, f))
    return sum(feature["geometry"] is None for feature in collection["features"])


def read_hits(path: str) -> List[Dict]:
    """The hits of a --json or --geojson file written by search.py query, as hit dicts."""
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such hits file") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a hits file of search.py query (not JSON: {e})") from None
    if not isinstance(payload, dict) or payload.get("written_by") != WRITTEN_BY:
        raise ValueError(f"{path} was not written by search.py query: expected the file of its "
                         f"--json or --geojson")
    if payload.get("type") == "FeatureCollection":
        return [dict(feature["properties"], footprint=None if feature["geometry"] is None
                     else feature["geometry"]["coordinates"][0])
                for feature in payload["features"]]
    if not isinstance(payload.get("hits"), list):
        raise ValueError(f"{path} was written by search.py but holds no hits (an export?)")
    return payload["hits"]


def parse_ref(ref: str, flag: str) -> Tuple[str, List[int]]:
    """"hits.json:1,4" -> ("hits.json", [1, 4]); the path may hold colons (C:\\...)."""
    path, _, ranks = ref.rpartition(":")
    parts = ranks.split(",")
    if not path or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{flag} {ref}: expected FILE:RANK[,RANK...] with ranks from 1, "
                         f"e.g. hits.json:1,4")
    return path, list(dict.fromkeys(int(p) for p in parts))


def hits_by_rank(ref: str, flag: str) -> List[Dict]:
    """The hits that `ref` ("FILE:R1,R2") names, in its order; an unknown rank is an error."""
    path, ranks = parse_ref(ref, flag)
    by_rank = {int(hit["rank"]): hit for hit in read_hits(path)}
    for rank in ranks:
        if rank not in by_rank:
            held = f"ranks {min(by_rank)}-{max(by_rank)}" if by_rank else "no hits"
            raise ValueError(f"{flag} {ref}: {path} has no hit of rank {rank} (it holds {held})")
    return [by_rank[rank] for rank in ranks]


def check_lonlat_box(west: float, south: float, east: float,
                     north: float) -> Tuple[float, float, float, float]:
    """The --within box as floats, or a ValueError saying which value is wrong."""
    box = tuple(float(v) for v in (west, south, east, north))
    given = "--within " + " ".join(f"{v:g}" for v in box)
    for name, value, limit in zip(("WEST", "SOUTH", "EAST", "NORTH"), box, (180, 90, 180, 90)):
        if not (math.isfinite(value) and -limit <= value <= limit):
            raise ValueError(f"{given}: {name} {value:g} is outside -{limit}..{limit} degrees")
    if box[0] > box[2]:
        raise ValueError(f"{given}: WEST > EAST; a box across the antimeridian is not supported")
    if box[1] > box[3]:
        raise ValueError(f"{given}: SOUTH > NORTH")
    return box


def within_mask(rings: np.ndarray, box: Tuple[float, float, float, float]) -> np.ndarray:
    """(N,) bool: which footprints meet (overlap or touch) the lon/lat box (west, south, east,
    north). rings: (N, V, 2) closed lon/lat rings.

    Separating axes: a convex polygon and the box are apart exactly when their projections on
    one of the axes x, y or an edge normal of the polygon do not overlap. Exact for convex
    footprints (a tile's 4 corners); for another shape it may keep one that only comes close.
    Lon/lat are taken as plane coordinates, which is right at tile scale."""
    west, south, east, north = box
    points = np.asarray(rings, dtype=np.float64)[:, :-1]  # (N, V, 2) without the closing point
    lon, lat = points[..., 0], points[..., 1]
    apart = (lon.max(1) < west) | (lon.min(1) > east) | (lat.max(1) < south) | (lat.min(1) > north)
    edges = np.roll(points, -1, axis=1) - points  # (N, V, 2)
    normals = np.stack([-edges[..., 1], edges[..., 0]], -1)  # (N, V, 2); 0 for a repeated point
    corners = np.array([[west, south], [east, south], [east, north], [west, north]])
    on_polygon = np.einsum("nad,nvd->nav", normals, points)  # (N, axes V, points V)
    on_box = normals @ corners.T  # (N, axes V, 4)
    apart |= ((on_polygon.max(2) < on_box.min(2)) | (on_box.max(2) < on_polygon.min(2))).any(1)
    return ~apart


def within(hits: List[Dict], west: float, south: float, east: float,
           north: float) -> List[Dict]:
    """--within: the hits whose footprint meets the box, in their order. A hit without a
    footprint cannot be placed and is left out."""
    box = check_lonlat_box(west, south, east, north)
    located = [h for h in hits if h.get("footprint") is not None]
    if not located:
        return []
    rings = [lonlat_ring(h["footprint"], f"hit {h.get('rank')}") for h in located]
    longest = max(map(len, rings))
    padded = np.array([r + [r[-1]] * (longest - len(r)) for r in rings])  # repeats change nothing
    return [h for h, keep in zip(located, within_mask(padded, box)) if keep]

