"""A procedurally generated aerial-scene captioning dataset: the pipeline without downloads.

- Each scene has a ground cover (green fields, brown farmland or sandy desert),
  maybe a river or a lake, maybe roads,
  and zero to four buildings of one colour grouped in one part of the image.
- Five template captions describe it, so a small CLIP can learn to retrieve it.
- `make_demo` writes the "precomp" layout of docs/method.md §5
  (`demo_precomp/`, `demo_images/*.tif`), so the readers of data.py run on it unchanged.
Deterministic given the seed; no image augmentation.
"""
import json
import os
import random
import re
import shutil
import tempfile
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

_VERSION = 1  # bump when the generator changes, so old folders are regenerated
GROUNDS = {"fields": ((70, 140, 60), "green fields"),
           "farmland": ((150, 115, 70), "brown farmland"),
           "desert": ((215, 190, 140), "a sandy desert")}
WATERS = {"none": None, "river": "a river", "lake": "a lake"}
ROADS = {"none": None, "horizontal": "a road running from east to west",
         "vertical": "a road running from north to south", "cross": "two roads crossing"}
COLOURS = {"red": (200, 40, 40), "blue": (50, 80, 210), "white": (245, 245, 245),
           "black": (25, 25, 25)}
PLACES = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom"}
NUMBERS = ["no", "one", "two", "three", "four"]


def sample_scene(rng: random.Random) -> Dict:
    """rng -> one random scene {ground, water, road, count, colour, place}.

    The draws happen in this order (the dict's), so a seed gives one set.
    """
    return {"ground": rng.choice(list(GROUNDS)), "water": rng.choice(list(WATERS)),
            "road": rng.choice(list(ROADS)), "count": rng.randint(0, 4),
            "colour": rng.choice(list(COLOURS)), "place": rng.choice(list(PLACES))}


def _building_boxes(scene: Dict, size: int, rng: random.Random) -> List[tuple]:
    """Non-overlapping squares of about size/7 inside the half of the image named by 'place'."""
    s, half = max(4, size // 7), size // 2
    x0, y0, x1, y1 = {"left": (0, 0, half, size), "right": (half, 0, size, size),
                      "top": (0, 0, size, half), "bottom": (0, half, size, size)}[scene["place"]]
    boxes = []
    for _ in range(200):  # rejection sampling; four squares always fit in a half
        if len(boxes) == scene["count"]:
            break
        x, y = rng.randint(x0 + 2, x1 - s - 2), rng.randint(y0 + 2, y1 - s - 2)
        apart = (x + s + 2 <= a or a + s + 2 <= x or y + s + 2 <= b or b + s + 2 <= y
                 for a, b, _, _ in boxes)  # a 2 px gap to every square placed so far
        if all(apart):
            boxes.append((x, y, x + s, y + s))
    return boxes


def render(scene: Dict, size: int, rng: random.Random) -> Image.Image:
    """(scene, size, rng) -> an aerial-like RGB image, size x size.

    Ground texture, then water, roads, and the roofs on top.
    """
    base = np.array(GROUNDS[scene["ground"]][0], dtype=np.float32)
    texture = np.random.default_rng(rng.getrandbits(32))
    noise = texture.normal(0, 8, (size, size, 1))  # field texture
    stripes = 0  # ploughed rows, except in the desert
    if scene["ground"] != "desert":
        stripes = 10 * np.sin(np.arange(size) * rng.uniform(0.3, 0.8))[None, :, None]
    image = Image.fromarray(np.clip(base + noise + stripes, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    water, w = (40, 90, 160), max(3, size // 10)
    if scene["water"] == "river":  # a meandering band across the image
        c = rng.uniform(0.3, 0.7) * size
        points = [(c + 0.15 * size * np.sin(t / size * 6 + rng.random()), t)
                  for t in range(0, size + 8, 8)]
        if rng.random() < 0.5:
            points = [(y, x) for x, y in points]
        draw.line(points, fill=water, width=w)
    elif scene["water"] == "lake":
        cx, cy = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size
        r = rng.uniform(0.15, 0.25) * size
        draw.ellipse((cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r), fill=water)
    road = (120, 120, 120)
    if scene["road"] in ("horizontal", "cross"):
        y = rng.randint(size // 3, 2 * size // 3)
        draw.rectangle((0, y - w // 2, size, y + w // 2), fill=road)
    if scene["road"] in ("vertical", "cross"):
        x = rng.randint(size // 3, 2 * size // 3)
        draw.rectangle((x - w // 2, 0, x + w // 2, size), fill=road)
    for box in _building_boxes(scene, size, rng):
        draw.rectangle(box, fill=COLOURS[scene["colour"]], outline=(60, 60, 60))
    return image


def captions(scene: Dict, rng: random.Random) -> List[str]:
    """(scene, rng) -> five captions in different words.

    Each names most of the scene, as human captions do.
    """
    n, colour = scene["count"], scene["colour"]
    noun = "building" if n == 1 else "buildings"
    bld = f"{NUMBERS[n]} {colour} {noun}" if n else "no buildings"
    place = f" {PLACES[scene['place']]}" if n else ""
    ground, water, road = GROUNDS[scene["ground"]][1], WATERS[scene["water"]], ROADS[scene["road"]]
    extras = [x for x in (water, road) if x]
    with_extras = f" with {' and '.join(extras)}" if extras else ""
    view = f"an aerial view of {ground}{with_extras}"
    near = f" near {extras[0]}" if extras else ""
    listed = f": {', '.join(extras)}" if extras else ""
    out = [f"{bld}{place} in {ground}{with_extras}",
           f"{view}, {bld}{place}" if n else view,
           f"there {'is' if n == 1 else 'are'} {bld}{place}{near} in {ground}",
           f"{ground} seen from above{listed} and {bld}",
           f"{' and '.join(extras)} and {bld}{place}" if extras else f"{ground} with {bld}{place}"]
    rng.shuffle(out)  # caption order carries no information
    return out


def write_precomp(folder: str, split: str, names: List[str], caps: List[str]):
    """(folder, split, names, captions) -> <split>_caps.txt, <split>_filename.txt in `folder`.

    As the public releases write them:
    - caps: 5 captions per image, in image order;
    - filename: train one line per image, test one line per caption.
    """
    listed = names if split == "train" else [name for name in names for _ in range(5)]
    for kind, lines in (("caps", caps), ("filename", listed)):
        with open(os.path.join(folder, f"{split}_{kind}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def _params(seed: int, n_train: int, n_test: int, size: int) -> Dict:
    return {"seed": seed, "n_train": n_train, "n_test": n_test, "size": size, "version": _VERSION}


_TEXT_FILES = {"demo.json"} | {f"{s}_{k}.txt" for s in ("train", "test")
                               for k in ("caps", "filename")}
_IMAGE_NAME = re.compile(r"(train|test)_[0-9]{4}\.tif")


def _foreign(text_dir: str, image_dir: str) -> str:
    """'' if both folders are absent or hold only what make_demo writes (with its marker), else
    the first path make_demo did not write: that folder is the user's, never to be deleted."""
    marked = os.path.isfile(os.path.join(text_dir, "demo.json"))
    for folder, ours in ((text_dir, _TEXT_FILES.__contains__), (image_dir, _IMAGE_NAME.fullmatch)):
        if not os.path.exists(folder):
            continue
        if not marked or not os.path.isdir(folder):
            return folder
        stray = next((n for n in sorted(os.listdir(folder)) if not ours(n)), None)
        if stray:
            return os.path.join(folder, stray)
    return ""


def make_demo(root: str, seed: int = 0, n_train: int = 300, n_test: int = 100, size: int = 64,
              verbose: bool = False) -> str:
    """Root -> root, with `<root>/demo_precomp/` and `<root>/demo_images/` written.

    - Skipped if already there with the same parameters.
    - Built in a temporary folder and renamed into place;
      the parameter file inside demo_precomp is the last thing to appear.
    - A previous demo (other parameters) is replaced only if its folders hold nothing but demo
      files; a folder with anything else in it, or without the marker, raises FileExistsError
      and is left as it is.
    """
    params = _params(seed, n_train, n_test, size)
    text_dir, image_dir = os.path.join(root, "demo_precomp"), os.path.join(root, "demo_images")
    marker = os.path.join(text_dir, "demo.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return root
    foreign = _foreign(text_dir, image_dir)
    if foreign:
        raise FileExistsError(f"{foreign} was not written by the demo generator; it is left as it "
                              f"is. Move it away, or pass another --data-root for the demo (or "
                              f"--layout / --image-dir to read your own files)")
    if verbose:
        print(f"no demo dataset in {root}: generating a new one there "
              f"({n_train} + {n_test} images)")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=root)
    try:
        _write(tmp, params)
        for path in (text_dir, image_dir):
            if os.path.exists(path):
                shutil.rmtree(path)
        os.rename(os.path.join(tmp, "demo_images"), image_dir)
        os.rename(os.path.join(tmp, "demo_precomp"), text_dir)  # holds the marker: renamed last
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def prepare(data_root: str, layout=None, image_dir=None, verbose: bool = True) -> None:
    """Generate the demo under `data_root` where `--dataset demo` names it and it is not there yet.

    Not when --layout json or --image-dir point at files of the user's.
    """
    if (layout or "precomp") == "precomp" and image_dir is None \
            and not os.path.isdir(os.path.join(data_root, "demo_precomp")):
        make_demo(data_root, verbose=verbose)  # the default parameters, generated once


def _write(tmp: str, params: Dict):
    rng = random.Random(params["seed"])
    os.makedirs(os.path.join(tmp, "demo_images"))
    os.makedirs(os.path.join(tmp, "demo_precomp"))
    for split, n in (("train", params["n_train"]), ("test", params["n_test"])):
        names, caps = [], []
        for i in range(n):
            scene = sample_scene(rng)
            name = f"{split}_{i:04d}.tif"
            render(scene, params["size"], rng).save(os.path.join(tmp, "demo_images", name))
            names.append(name)
            caps += captions(scene, rng)
        write_precomp(os.path.join(tmp, "demo_precomp"), split, names, caps)
    with open(os.path.join(tmp, "demo_precomp", "demo.json"), "w") as f:
        json.dump(params, f)
