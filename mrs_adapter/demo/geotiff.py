"""A demo GeoTIFF as remote-sensing products come, made of demo scenes: for search's picture.

    python -m mrs_adapter.demo.geotiff data/demo_geotiff/mosaic.tif

columns x rows demo scenes (scenes.render, 256 px each) laid side by side into one scene:
- 4 bands of uint16 in the order near-infrared, red, green, blue (colour interpretation set,
  so search shows bands 2 3 4 by default), values 200 + 10 x the 8-bit colour (reflectance-like);
  near-infrared is bright where the ground is green;
- tiled 256 px, LZW, internal overviews 2 4 8, UTM zone 33N at 0.5 m;
- a nodata (0) collar over the left 40% of the first column, as a scene edge leaves.
rasterio (the [geo] extra) is imported inside `write_mosaic`.
"""
import argparse
import os
import random
from typing import Dict, List, Optional, Tuple

import numpy as np

from .scenes import render, sample_scene

SIDE = 256


def mosaic(columns: int, rows: int, seed: int) -> Tuple[np.ndarray, List[Dict]]:
    """((4, rows*256, columns*256) uint16 NIR, R, G, B; the scenes, row by row)."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(columns * rows)]
    rgb = np.zeros((rows * SIDE, columns * SIDE, 3), np.uint8)
    for i, scene in enumerate(scenes):
        top, left = (i // columns) * SIDE, (i % columns) * SIDE
        rgb[top:top + SIDE, left:left + SIDE] = np.asarray(render(scene, SIDE, rng))
    r, g, b = (rgb[..., k].astype(np.float32) for k in range(3))
    nir = np.clip(1.6 * g - 0.4 * r - 0.2 * b + 40, 0, 255)
    bands = np.stack([nir, r, g, b]) * 10 + 200
    bands[:, :, :int(0.4 * SIDE)] = 0  # the collar
    return bands.astype(np.uint16), scenes


def write_mosaic(path: str, columns: int = 6, rows: int = 4, seed: int = 0) -> List[Dict]:
    """Write the mosaic GeoTIFF to `path`; returns its scenes, row by row."""
    try:
        import rasterio
        from rasterio.enums import ColorInterp
        from rasterio.transform import Affine
    except ImportError:
        raise SystemExit('the demo GeoTIFF needs rasterio: pip install -e ".[geo]"') from None
    data, scenes = mosaic(columns, rows, seed)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=4,
                   dtype="uint16", nodata=0, crs="EPSG:32633", tiled=True, blockxsize=256,
                   blockysize=256, compress="lzw",
                   transform=Affine(0.5, 0, 447000.0, 0, -0.5, 4520000.0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.colorinterp = [ColorInterp.nir, ColorInterp.red, ColorInterp.green,
                           ColorInterp.blue]
        dst.build_overviews([2, 4, 8])
    return scenes


def main(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the GeoTIFF to write")
    p.add_argument("--columns", type=int, default=6)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_mosaic(args.out, args.columns, args.rows, args.seed)
    print(f"wrote {args.out}: {args.columns} x {args.rows} demo scenes of {SIDE} px")


if __name__ == "__main__":
    main()
