"""The index's embeddings as GeoParquet, the form the field shares tile embeddings in (Earth Index,
Clay and Major TOM publish theirs so): one row per tile, its footprint a WKB polygon in lon/lat.

Columns: id (int64, the index row), path (string), box (list<int32> [left, top, right, bottom]
pixels of the file; null for a whole image), geometry (WKB Polygon in OGC:CRS84; null without
georeferencing), embedding (list<float32>, E values). File metadata: "geo" (GeoParquet 1.1),
"mrs_adapter:model", the STAC embeddings extension's "emb:*" keys, "written_by". pyarrow (the
[geo] extra) is imported only here; batches stream in as row groups, so memory holds one batch.
"""
import json
import math
import struct
from typing import Dict, Iterable, List, Optional

import numpy as np

from ..atomic import atomic_write
from .hits import lonlat_ring
from .outputs import WRITTEN_BY, import_pyarrow

GEOPARQUET_VERSION = "1.1.0"


def wkb_polygon(ring: List[List[float]]) -> bytes:
    """ISO WKB of a Polygon with one ring: byte order 1 (little-endian), type 3, 1 ring, its
    point count, then x (lon), y (lat) as float64 pairs."""
    points = np.asarray(ring, dtype="<f8")  # (V, 2)
    return struct.pack("<BIII", 1, 3, 1, len(points)) + points.tobytes()


def file_metadata(model: Dict, dim: int, chip_size: int, stride: int, index_dtype: str,
                  gsd: Optional[float], bbox: List[float]) -> Dict[str, str]:
    """The key-value metadata: objects as JSON text, single values as plain text."""
    geometry = {"encoding": "WKB", "geometry_types": ["Polygon"], "orientation": "counterclockwise"}
    if math.isfinite(bbox[0]):  # at least one footprint; crs is left out: OGC:CRS84
        geometry["bbox"] = bbox
    geo = {"version": GEOPARQUET_VERSION, "primary_column": "geometry",
           "columns": {"geometry": geometry}}
    quantization = ({"method": "none", "original_dtype": "float32"} if index_dtype == "float32"
                    else {"method": "cast", "original_dtype": "float32",  # widened back exactly
                          "quantized_dtype": index_dtype})
    layout = {"layout_type": "regular_grid", "chip_size": [chip_size, chip_size],
              "stride": [stride, stride]}
    metadata = {"geo": json.dumps(geo), "written_by": WRITTEN_BY,
                "mrs_adapter:model": json.dumps(model), "emb:type": "chip",
                "emb:dimensions": str(dim), "data_type": "float32",
                "emb:chip_layout": json.dumps(layout), "emb:quantization": json.dumps(quantization)}
    if gsd is not None:
        metadata["gsd"] = repr(float(gsd))
    return metadata


def batch_table(pa, batch: Dict, first_id: int, dim: int, bbox: List[float]):
    """One batch {"path": [n], "box": [n], "footprint": [n], "embedding": (n, E)} as a pyarrow
    table; widens `bbox` [minx, miny, maxx, maxy] to its footprints."""
    embedding = np.asarray(batch["embedding"], dtype=np.float32)
    n = len(batch["path"])
    if embedding.shape != (n, dim) or len(batch["box"]) != n or len(batch["footprint"]) != n:
        raise ValueError(f"a batch of {n} paths has {len(batch['box'])} boxes, "
                         f"{len(batch['footprint'])} footprints and embeddings of shape "
                         f"{embedding.shape}, not ({n}, {dim})")
    geometry = []
    for row, ring in enumerate(batch["footprint"]):
        if ring is None:
            geometry.append(None)
            continue
        ring = lonlat_ring(ring, f"row {first_id + row}")
        lons, lats = zip(*ring)
        bbox[:] = [min(bbox[0], *lons), min(bbox[1], *lats), max(bbox[2], *lons),
                   max(bbox[3], *lats)]
        geometry.append(wkb_polygon(ring))
    boxes = [None if b is None else [int(v) for v in b] for b in batch["box"]]
    return pa.table({
        "id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "path": pa.array(list(batch["path"]), pa.string()),
        "box": pa.array(boxes, pa.list_(pa.int32())),
        "geometry": pa.array(geometry, pa.binary()),
        "embedding": pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)),
            pa.array(embedding.reshape(-1))),
    })


def write_geoparquet(path: str, batches: Iterable[Dict], model: Dict, dim: int, chip_size: int,
                     stride: int, index_dtype: str = "float16",
                     gsd: Optional[float] = None) -> int:
    """Write the rows of `batches` (see batch_table; ids count on from 0 across batches) to
    `path` atomically, one row group per batch; returns the number of rows.

    model: the index's model identity (recorded as JSON); chip_size, stride: the tiling, in pixels
    at the indexing resolution; index_dtype: how the index stores the embeddings (float16 values
    are written as float32, exactly); gsd: the --gsd the tiles were resampled to, if any. The
    "geo" metadata, with the bbox of all footprints, is added when the last batch is written."""
    pa, pq = import_pyarrow(path, "writing GeoParquet")
    if not hasattr(pq.ParquetWriter, "add_key_value_metadata"):
        raise ValueError(f'{path}: writing GeoParquet needs pyarrow >= 17 (this is '
                         f'{pa.__version__}): pip install -e ".[geo]"')
    schema = pa.schema([("id", pa.int64()), ("path", pa.string()), ("box", pa.list_(pa.int32())),
                        ("geometry", pa.binary()), ("embedding", pa.list_(pa.float32()))])
    bbox, rows = [math.inf, math.inf, -math.inf, -math.inf], 0

    def write(f):
        nonlocal rows
        # store_schema=False: readers then build the table's metadata from the file's key-value
        # metadata, so "geo", added last, is seen by GeoPandas and the like
        with pq.ParquetWriter(f, schema, store_schema=False) as writer:
            for batch in batches:
                if len(batch["path"]):
                    writer.write_table(batch_table(pa, batch, rows, dim, bbox))
                    rows += len(batch["path"])
            writer.add_key_value_metadata(
                file_metadata(model, dim, chip_size, stride, index_dtype, gsd, bbox))
    atomic_write(path, write, mode="wb")
    return rows
