"""One `search.py index` run shared by torchrun's processes: each embeds a share of the files.

Time goes with the tiles a file is cut into, so with its pixels, not with the number of files:
an archive of a few 20,000 px scenes among thousands of 256 px chips would leave one process
with all the scenes if files were dealt out by count. The shares are balanced by the pixel
count each file's header gives (Pillow's, or rasterio's for what rasterio reads: readers.py),
largest first to the least loaded process, the same on every process (no randomness, ties by
position).
"""
import heapq
import warnings
from typing import List

from PIL import Image

from .readers import RasterioMissing, choose_reader


def pixel_count(path: str) -> int:
    """Width x height from the header of `path` (nothing decoded); 0 for a file that cannot be
    read, whose reader reports it when its share reaches it."""
    try:
        if choose_reader(path) == "rasterio":
            import rasterio
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                try:
                    with rasterio.open(path) as src:
                        return src.width * src.height
                except rasterio.errors.RasterioError:
                    return 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.width * image.height
    except (OSError, ValueError, SyntaxError, RasterioMissing, Image.DecompressionBombError):
        return 0


def share_by_pixels(pixels: List[int], world: int) -> List[List[int]]:
    """[the positions in `pixels` rank r embeds, ascending] for each rank: greedy, largest first
    to the least loaded rank (within 4/3 of the best balance; Graham 1969)."""
    loads = [(0, r) for r in range(world)]  # (pixels so far, rank): a heap
    shares = [[] for _ in range(world)]
    for i in sorted(range(len(pixels)), key=lambda i: (-pixels[i], i)):
        load, r = heapq.heappop(loads)
        shares[r].append(i)
        heapq.heappush(loads, (load + pixels[i], r))
    return [sorted(share) for share in shares]
