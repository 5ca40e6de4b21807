"""The tile grid of search: which boxes of an image are embedded (index.py, raster.py)."""
from typing import List, Optional, Tuple

# The retrieval sets' scenes are 256 px (RSITMD, UCM) or 224 px (RSICD), and CLIP sees 224 px:
# a 256 px tile shows a large image at the scale the model was trained on.
# Stride 192 = 25% overlap, so an object cut by one tile border lies whole in a neighbour if it
# is at most 64 px wide; images up to 1.5 tiles (384 px) stay whole (the crop keeps >= 2/3).
TILE, STRIDE, WHOLE_UP_TO = 256, 192, 1.5
Box = Optional[Tuple[int, int, int, int]]  # (left, top, right, bottom) in pixels; None = whole


def _starts(length: int, tile: int, stride: int) -> List[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # the last tile flush with the edge
    return starts


def tile_boxes(width: int, height: int, tile: int = TILE, stride: int = STRIDE) -> List[Box]:
    """[None] for an image of at most WHOLE_UP_TO tiles a side; else boxes of `tile` px every
    `stride` px, row by row, the last row and column flush with the edge: together they cover it."""
    if max(width, height) <= WHOLE_UP_TO * tile:
        return [None]
    return [(x, y, min(x + tile, width), min(y + tile, height))
            for y in _starts(height, tile, stride) for x in _starts(width, tile, stride)]
