"""The tiles of one image file, in chunks for the encoder, through the reader the file needs.

Pillow (JPEG, PNG, what it reads right) decodes a file whole and cuts it; rasterio (GeoTIFF,
COG, any file Pillow would misread; the `[geo]` extra, readers.choose_reader) reads one window
per tile, so memory does not grow with the scene, drops tiles that are mostly nodata and places
each kept tile on the map. Both yield the same Chunk, so index.py does not care which read it.
"""
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..datasets import read_image
from .grid import Box, tile_boxes
from .raster import open_scene
from .readers import choose_reader


@dataclass(frozen=True)
class RasterOptions:
    """How rasterio shows a scene (docs/geotiff.md): --bands, --gsd, --stretch, --max-nodata."""
    bands: Optional[Tuple[int, ...]] = None
    gsd: Optional[float] = None
    stretch: Optional[Tuple[float, float]] = None
    max_nodata: float = 0.5

    def record(self) -> Dict:
        """JSON-ready, as index.json keeps it (an index answers for one setting)."""
        return {"bands": list(self.bands) if self.bands else None, "gsd": self.gsd,
                "stretch": list(self.stretch) if self.stretch else None,
                "max_nodata": self.max_nodata}


@dataclass
class Chunk:
    """Up to `chunk` kept tiles of one file: their boxes, (T, C, H, W) uint8 pixels after
    `decode` (None when T = 0), and per tile {"bounds", "footprint"} or None (no
    georeferencing). `last` marks a file's final chunk, which carries `info`: the reader, the
    file's CRS, the tiles dropped as nodata, and (rasterio) Scene.record()."""
    first: int
    boxes: List[Box]
    tiles: Optional[torch.Tensor]
    places: List[Optional[Dict]]
    last: bool = False
    info: Dict = field(default_factory=dict)


def _stack(pictures: List[np.ndarray]) -> torch.Tensor:
    """[(H, W, C) uint8] -> (T, C, H, W) uint8."""
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).contiguous()


def pillow_chunks(path: str, decode, tile: int, stride: int, chunk: int) -> Iterator[Chunk]:
    """Chunks of a file Pillow reads: the decoded image (3 bytes a pixel) and one chunk are held,
    never all its tiles at once; no coordinates, nothing dropped."""
    pixels = read_image(path, np.asarray)  # (H, W, 3) uint8, the image closed
    boxes = tile_boxes(pixels.shape[1], pixels.shape[0], tile, stride)
    for first in range(0, len(boxes), chunk):
        mine = boxes[first:first + chunk]
        tiles = [np.asarray(decode(Image.fromarray(pixels if box is None else
                                                   pixels[box[1]:box[3], box[0]:box[2]])),
                            dtype=np.uint8) for box in mine]
        last = first + chunk >= len(boxes)
        yield Chunk(first, mine, _stack(tiles), [None] * len(mine), last,
                    {"reader": "pillow", "crs": None, "dropped": 0} if last else {})


def _places(scene, boxes: List[Box]) -> List[Optional[Dict]]:
    return [None if f is None else {"bounds": f["bounds"], "footprint": f["lonlat"]}
            for f in scene.footprints(boxes)]


def raster_chunks(path: str, decode, tile: int, stride: int, chunk: int,
                  options: RasterOptions) -> Iterator[Chunk]:
    """Chunks of a file rasterio reads, one window per tile: tiles over options.max_nodata
    invalid are dropped and counted; each kept tile gets its bounds and WGS84 footprint."""
    scene = open_scene(path, options.bands, options.gsd, options.stretch, options.max_nodata)
    whole = tile_boxes(*scene.output_size, tile, stride) == [None]
    boxes, pictures, first, dropped = [], [], 0, 0
    for box, rgb, _ in scene.tiles(tile, stride):
        box = None if whole else box  # a scene kept whole has no box, as Pillow's images
        if rgb is None:
            dropped += 1
            continue
        boxes.append(box)
        pictures.append(np.asarray(decode(Image.fromarray(rgb)), dtype=np.uint8))
        if len(boxes) == chunk:
            yield Chunk(first, boxes, _stack(pictures), _places(scene, boxes))
            first, boxes, pictures = first + len(boxes), [], []
    info = {"reader": "rasterio", "crs": scene.crs, "dropped": dropped, "raster": scene.record()}
    yield Chunk(first, boxes, _stack(pictures) if pictures else None, _places(scene, boxes),
                True, info)


def file_chunks(path: str, decode, tile: int, stride: int, chunk: int,
                options: RasterOptions) -> Iterator[Chunk]:
    """The chunks of `path` through its reader (readers.choose_reader: RasterioMissing, one line
    naming the file and the install command, where Pillow would misread it)."""
    if choose_reader(path) == "rasterio":
        return raster_chunks(path, decode, tile, stride, chunk, options)
    return pillow_chunks(path, decode, tile, stride, chunk)


def read_tiles(path: str, decode, tile: int, stride: int,
               options: RasterOptions = RasterOptions()) -> Tuple[torch.Tensor, List[Box]]:
    """(T, C, H, W) uint8 kept tiles of one image after `decode` (resize + crop, the steps before
    ToTensor), and their boxes: all of them at once (tests and the benchmark; `index` streams)."""
    chunks = [c for c in file_chunks(path, decode, tile, stride, 256, options) if c.boxes]
    return torch.cat([c.tiles for c in chunks]), [b for c in chunks for b in c.boxes]


def scene_as_indexed(path: str, record: Dict):
    """The raster.Scene of `path` shown as index.json's `record` says it was indexed: the same
    bands, stretch and fill, so a picture of a hit shows what the model saw."""
    scene = open_scene(path, record["bands"])
    stretch = record["stretch"] and [tuple(s) for s in record["stretch"]]
    return replace(scene, stretch=stretch, fill=tuple(record["fill"]))


def picture(path: str, box: Box = None, record: Optional[Dict] = None,
            max_side: int = 1024, options: RasterOptions = RasterOptions()
            ) -> Tuple[Image.Image, float]:
    """(8-bit RGB picture, scale): the whole file (box None) at most `max_side` px a side, or the
    box at full resolution; scale = picture px per file px. `record`: the file's index.json
    raster record; None: a GeoTIFF is read as `options` say (an image query)."""
    if choose_reader(path) == "pillow":
        image = read_image(path, lambda im: im.copy())
        if box is not None:
            return image.crop(tuple(box)), 1.0
        scale = min(1.0, max_side / max(image.size))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BOX), scale
    scene = scene_as_indexed(path, record) if record else open_scene(
        path, options.bands, None, options.stretch, options.max_nodata)
    if box is None:
        rgb, scale = scene.overview(max_side)
        return Image.fromarray(rgb), scale
    return Image.fromarray(scene.window(box)), 1.0
