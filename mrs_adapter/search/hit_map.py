"""--map: where the hits lie in their scenes, as a picture. Each scene is a panel titled with its
file name: its overview (at most 1024 px a side) with every hit's outline in magenta, numbered
by rank on a black label. Outlines are drawn inside the tile's pixels, so an edge marks the
tile's own first or last row or column.
"""
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_write
from .outputs import png_mark

OUTLINE = (255, 0, 255)  # magenta: rare in aerial and satellite imagery, so it stands out
LABEL_TEXT, LABEL_BACK = (255, 255, 255), (0, 0, 0)
PAD, TITLE_H = 8, 24


def font(size: int):
    try:
        return ImageFont.load_default(size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()  # older Pillow: the small bitmap font


def fitted_overview(scene: Dict, max_side: int) -> Tuple[Image.Image, float, float]:
    """(RGB overview no larger than max_side a side, x scale, y scale): scales map the file's
    full-resolution pixels to the returned image's."""
    image = scene["overview"]
    image = (Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray)
             else image).convert("RGB")
    sx = sy = float(scene["scale"])
    if max(image.size) > max_side:
        factor = max_side / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        sx, sy = sx * size[0] / image.width, sy * size[1] / image.height
        image = image.resize(size, Image.Resampling.BOX)  # averages: no aliasing of fine texture
    return image, sx, sy


def overview_box(box, sx: float, sy: float, size: Tuple[int, int]) -> List[int]:
    """A full-resolution [left, top, right, bottom) box (None: the whole scene) as the inclusive
    overview pixels [x0, y0, x1, y1] it covers."""
    if box is None:
        return [0, 0, size[0] - 1, size[1] - 1]
    left, top, right, bottom = box
    x0, y0 = int(np.floor(left * sx)), int(np.floor(top * sy))
    x1, y1 = int(np.ceil(right * sx)) - 1, int(np.ceil(bottom * sy)) - 1
    x0, y0 = min(max(x0, 0), size[0] - 1), min(max(y0, 0), size[1] - 1)
    return [x0, y0, min(max(x1, x0), size[0] - 1), min(max(y1, y0), size[1] - 1)]


def draw_hits(image: Image.Image, hits: List[Dict], sx: float, sy: float):
    """Each hit's outline (magenta, lined inside with black so it shows on any ground) and its
    rank on a label in its top-left corner; a label that would cover an earlier (better) one
    moves down below it, so tiles sharing a corner keep readable numbers."""
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 400))  # 2-3 px on a 1024 px overview
    label_font = font(max(12, round(max(image.size) / 64)))  # 16 px on a 1024 px overview
    boxes = {h["rank"]: overview_box(h.get("box"), sx, sy, image.size) for h in hits}
    for x0, y0, x1, y1 in boxes.values():
        draw.rectangle([x0, y0, x1, y1], outline=OUTLINE, width=width)
        if x1 - x0 > 2 * width and y1 - y0 > 2 * width:
            draw.rectangle([x0 + width, y0 + width, x1 - width, y1 - width], outline=LABEL_BACK)
    placed = []
    for rank in sorted(boxes):
        left, top, right, bottom = draw.textbbox((0, 0), str(rank), font=label_font)
        w, h = right - left + 4, bottom - top + 4
        x, y = boxes[rank][0] + width, boxes[rank][1] + width
        while any(x < px + pw and px < x + w and y < py + ph and py < y + h
                  for px, py, pw, ph in placed):
            y += h
        x, y = min(x, image.width - w), min(y, image.height - h)  # stays in the panel
        placed.append((x, y, w, h))
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=LABEL_BACK)
        draw.text((x + 2 - left, y + 2 - top), str(rank), fill=LABEL_TEXT, font=label_font)


def render_map(scenes: List[Dict], max_side: int = 1024,
               columns: int = 2) -> Tuple[Image.Image, List[Tuple[int, int, float, float]]]:
    """(the picture, per scene (x, y) of its overview's top-left in it and its x, y scales).

    scenes: [{"path": the scene's file, "overview": (h, w, 3) uint8 array or PIL image,
    "scale": overview pixels per full-resolution pixel, "hits": [{"rank", "box"}, ...] with
    boxes in full-resolution pixels (None: the whole scene)}]; panels left to right, `columns`
    a row."""
    if not scenes:
        raise ValueError("no scene to draw: the query has no hits")
    panels = [fitted_overview(scene, max_side) for scene in scenes]
    cell_w = max(image.width for image, _, _ in panels)
    cell_h = TITLE_H + max(image.height for image, _, _ in panels)
    columns = min(columns, len(panels))
    rows = (len(panels) + columns - 1) // columns
    canvas = Image.new("RGB", (PAD + columns * (cell_w + PAD), PAD + rows * (cell_h + PAD)),
                       "white")
    draw, title_font, placements = ImageDraw.Draw(canvas), font(16), []
    for i, (scene, (image, sx, sy)) in enumerate(zip(scenes, panels)):
        x, y = PAD + (i % columns) * (cell_w + PAD), PAD + (i // columns) * (cell_h + PAD)
        draw_hits(image, scene["hits"], sx, sy)
        n = len(scene["hits"])
        title = f"{os.path.basename(scene['path'])}: {n} hit{'s' if n != 1 else ''}"
        while draw.textlength(title, font=title_font) > cell_w and len(title) > 12:
            title = "..." + title[4:]  # a long name keeps its end: the extension and the count
        draw.text((x, y + 2), title, fill="black", font=title_font)
        canvas.paste(image, (x, y + TITLE_H))
        placements.append((x, y + TITLE_H, sx, sy))
    return canvas, placements


def draw_map(path: str, scenes: List[Dict], max_side: int = 1024):
    """--map: render_map(scenes) written atomically as a PNG marked as this program's."""
    canvas, _ = render_map(scenes, max_side)
    atomic_write(path, lambda f: canvas.save(f, format="PNG", pnginfo=png_mark()), mode="wb")
