"""Shared fixtures and helpers: tiny CLIP models built in the test (no downloads), OpenAI-style
archives, eval.py as a module, one fixed training step, and small datasets on disk.

Every helper more than one test module uses lives here, and no test module imports another or
this file: pytest does not promise conftest an importable module name (two conftest.py files, or
--import-mode=importlib, break `from conftest import ...`). A plain helper is offered as a
session fixture that returns the function (pytest's "factories as fixtures"): the tests call it
as before, with their own arguments, and module-scoped fixtures can ask for it too."""
import importlib.util
import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import train
from mrs_adapter.adapter import add_adapters
from mrs_adapter.demo.backbone import pretrain
from mrs_adapter.demo.scenes import captions, make_demo, render, sample_scene, write_precomp
from mrs_adapter.model import CLIP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- tiny CLIP models ----

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
            vision_patch_size=8, context_length=32, vocab_size=49408, transformer_width=96,
            transformer_heads=1, transformer_layers=2)


def _make_tiny_clip(seed: int = 0, embed_dim: int = 32, image_resolution: int = 32,
                    vision_layers: int = 2, vision_width: int = 128, vision_patch_size: int = 8,
                    context_length: int = 77, vocab_size: int = 49408, transformer_width: int = 96,
                    transformer_layers: int = 2) -> CLIP:
    """A randomly initialised CLIP small enough for CPU tests; heads = width // 64, as
    build_model reads them.

    The widths differ (text 96, vision 128) and exceed MRS-Adapter's shared 64 channels, so
    adapters fit and a text / vision mix-up shows."""
    torch.manual_seed(seed)
    model = CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, max(1, transformer_width // 64),
                 transformer_layers)
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny_clip():
    """make_tiny_clip(seed=0, **sizes) -> a fresh tiny CLIP, the same one for the same seed."""
    return _make_tiny_clip


@pytest.fixture
def tiny_clip() -> CLIP:
    return _make_tiny_clip()


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """(data root, backbone path): a small demo set and a tiny CLIP pre-trained on shapes for
    150 steps."""
    root = tmp_path_factory.mktemp("demo")
    make_demo(str(root), n_train=150, n_test=60, size=32)
    torch.manual_seed(0)
    backbone = pretrain(150, n_images=2000, log_every=1000, arch=TINY)
    torch.save(backbone.state_dict(), root / "backbone.pt")
    return str(root), str(root / "backbone.pt")


def _random_token_ids(n: int, context: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Ids < vocab - 1 with the end id (vocab - 1, the largest) at varied positions, zero padded
    after it."""
    tokens = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(2, context + 1, (1,), generator=generator))
        tokens[i, :length] = torch.randint(1, vocab - 1, (length,), generator=generator)
        tokens[i, length - 1] = vocab - 1
    return tokens


@pytest.fixture(scope="session")
def random_token_ids():
    """random_token_ids(n, context, vocab, generator) -> (n, context) ids for any vocabulary."""
    return _random_token_ids


# ---- weight files ----

def _as_torchscript_archive(state_dict: dict, path):
    """Write tensors the way the OpenAI archives hold them: a scripted module whose state_dict has
    the official nested names, fp16 weights and the three integer entries."""
    root = torch.nn.Module()
    for name, tensor in state_dict.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.half(), requires_grad=False))

    class Archive(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in root.named_children():
                self.add_module(name, child)
            for name, tensor in root.named_parameters(recurse=False):
                self.register_parameter(name, tensor)
            self.register_buffer("input_resolution", torch.tensor(32))
            self.register_buffer("context_length", torch.tensor(77))
            self.register_buffer("vocab_size", torch.tensor(49408))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the official format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(Archive()), str(path))


@pytest.fixture(scope="session")
def as_torchscript_archive():
    """as_torchscript_archive(state_dict, path): an OpenAI-style TorchScript archive at path."""
    return _as_torchscript_archive


# ---- eval.py ----

def _script(name: str):
    """The repository's script `name` (eval.py, search.py: not part of the package) loaded as a
    module."""
    spec = importlib.util.spec_from_file_location(f"{name[:-3]}_script", os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def eval_script():
    """eval.py, loaded once as a module."""
    return _script("eval.py")


@pytest.fixture(scope="session")
def metric_keys():
    """The names of the paper's row that eval.py returns and writes."""
    return frozenset({"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR"})


# ---- search.py ----

SEARCH_TILE = ["--tile", "64", "--stride", "48", "--workers", "0", "--batch-size", "8"]


@pytest.fixture(scope="session")
def search_cli():
    """search.py, loaded once as a module."""
    return _script("search.py")


@pytest.fixture(scope="session")
def search_tile():
    """The flags of the search tests' small tiling: 64 px tiles every 48, no workers, batches
    of 8."""
    return list(SEARCH_TILE)


@pytest.fixture(scope="session")
def search_index(search_cli):
    """search_index(images, out, weights, *extra) -> the exit code of `search.py index` with the
    small tiling (search_tile) and the CLIP weights file `weights`."""
    def index(images, out, weights, *extra) -> int:
        return search_cli.main(["index", str(images), "--out", str(out), "--clip", str(weights),
                                *SEARCH_TILE, *extra])
    return index


@pytest.fixture(scope="session")
def index_rows():
    """index_rows(index folder) -> ([(image path, box or None)] a row, (rows, E) float32
    embeddings)."""
    from mrs_adapter.search.query import SearchIndex

    def rows(out):
        index = SearchIndex(str(out))
        return ([index.entry(r) for r in range(len(index.embeddings))],
                np.asarray(index.embeddings, dtype=np.float32))
    return rows


@pytest.fixture(scope="session")
def random_images():
    """random_images(folder, {name: (width, height)}, seed=0) -> folder: images of uniform
    random RGB noise, in sub-folders where the names say."""
    def write(folder, sizes, seed: int = 0) -> str:
        rng = np.random.default_rng(seed)
        for name, (width, height) in sizes.items():
            path = os.path.join(folder, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        return str(folder)
    return write


@pytest.fixture(scope="session")
def tiny_clip_weights(tmp_path_factory, make_tiny_clip):
    """tiny_clip_weights(seed=0) -> the path of make_tiny_clip(seed)'s state_dict, written once
    a session."""
    folder, written = tmp_path_factory.mktemp("tiny_clip_weights"), {}

    def path(seed: int = 0) -> str:
        if seed not in written:
            written[seed] = str(folder / f"tiny{seed}.pt")
            torch.save(make_tiny_clip(seed).state_dict(), written[seed])
        return written[seed]
    return path


# ---- a script under torchrun ----

@pytest.fixture(scope="session")
def torchrun():
    """torchrun(script, argv, cwd) -> the finished process (output captured): the repository's
    `script` (train.py, search.py) under torchrun, 2 processes on this machine, a thread each,
    300 s at most (a hang fails the test, not CI)."""
    def run(script: str, argv, cwd):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", os.path.join(ROOT, script), *argv]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                              cwd=str(cwd))
    return run


@pytest.fixture(scope="session")
def error_lines():
    """error_lines(stderr) -> the lines a launcher printed as `error: ...`."""
    return lambda stderr: [line for line in stderr.splitlines() if line.startswith("error:")]


# ---- one training step of train.py on a fixed batch ----

_LOSS_ARGS = dict(objective="hmmc", margin=0.2, loss_weights=(1.0, 1.0, 1.0), amp_dtype=None)


def _fixed_problem():
    """A tiny CLIP with non-zero adapters, no dropout anywhere, and a fixed batch of 8 pairs."""
    model = add_adapters(_make_tiny_clip(), dropout=0.0, verbose=False).train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    images = torch.randn(8, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49000, (8, 77), generator=g)
    tokens[:, 12:] = 0
    tokens[:, 11] = 49407
    return model, images, tokens


def _adam_step(model, **adam):
    """(trainable params, Adam, step(images, tokens) -> (loss, terms)): forward, backward, Adam
    step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3, **adam)
    views = train.Views(model, 0.0, both_views=True)
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def step(images, tokens):
        loss = train.forward_backward(views, model, images, tokens, scaler, **_LOSS_ARGS)
        optimizer.step()
        return loss

    return params, optimizer, step


@pytest.fixture(scope="session")
def loss_args():
    """The HMMC loss settings of the fixed step (train.forward_backward's keywords)."""
    return _LOSS_ARGS


@pytest.fixture(scope="session")
def fixed_problem():
    """fixed_problem() -> (model, images, tokens), built afresh, the same every call."""
    return _fixed_problem


@pytest.fixture(scope="session")
def adam_step():
    """adam_step(model, **adam) -> (params, optimizer, step)."""
    return _adam_step


# ---- small datasets on disk ----

def _colour(name):  # a distinct colour per image name, so pixels tell which file was read
    h = sum(ord(c) * 31 ** k for k, c in enumerate(name))
    return (h % 251, (h // 251) % 251, (h // 63001) % 251)


def _write_images(folder, names, size=40):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        Image.new("RGB", (size, size + 8), _colour(name)).save(os.path.join(folder, name))


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _make_precomp(root, name="rsitmd", n_train=10, n_test=3):
    """<root>/<name>_precomp (the package's writer: 5 captions per image, train_filename one line
    per image, test_filename one per caption) and <name>_images in plain colours; returns the
    text folder."""
    text = os.path.join(root, f"{name}_precomp")
    os.makedirs(text)
    for split, n in (("train", n_train), ("test", n_test)):
        names = [f"{split}scene_{i}.tif" for i in range(n)]
        write_precomp(text, split, names, [f"caption {k} of {x}" for x in names for k in range(5)])
        _write_images(os.path.join(root, f"{name}_images"), names)
    return text


_JSON_SPLITS = ("train",) * 6 + ("val",) * 2 + ("test",) * 3


def _make_json_dataset(root, name="sydney", splits=_JSON_SPLITS, counts=None):
    images = []
    for i, split in enumerate(splits):
        filename = f"{i}.tif"
        n = counts[i] if counts else 5
        sentences = [{"raw": f"caption {k} of {filename}", "tokens": []} for k in range(n)]
        images.append({"filename": filename, "imgid": i, "split": split, "sentences": sentences})
    with open(os.path.join(root, f"dataset_{name}.json"), "w") as f:
        json.dump({"images": images, "dataset": name}, f)
    _write_images(os.path.join(root, f"{name}_images"), [x["filename"] for x in images])


@pytest.fixture(scope="session")
def image_colour():
    """image_colour(file name) -> the (r, g, b) every image the dataset fixtures write is
    filled with."""
    return _colour


@pytest.fixture(scope="session")
def write_lines():
    """write_lines(path, lines): one line each, newline-terminated (to edit a written dataset)."""
    return _write_lines


@pytest.fixture(scope="session")
def make_precomp():
    """make_precomp(root, name="rsitmd", n_train=10, n_test=3) -> its <name>_precomp folder."""
    return _make_precomp


@pytest.fixture(scope="session")
def make_json_dataset():
    """make_json_dataset(root, name="sydney", splits=..., counts=None): dataset_<name>.json (the
    split of each image in `splits`, `counts[i]` captions for image i, else 5) and its
    images."""
    return _make_json_dataset


def _write_scenes(root, name, images, captions_of):
    """<root>/<name>_precomp and <name>_images as released: {split: [(file name, PIL image)]}."""
    text, folder = os.path.join(root, f"{name}_precomp"), os.path.join(root, f"{name}_images")
    os.makedirs(text)
    os.makedirs(folder)
    for split, items in images.items():
        for file, image in items:
            quality = {"quality": 75} if file.endswith(".jpg") else {}
            image.save(os.path.join(folder, file), **quality)
        names = [file for file, _ in items]
        write_precomp(text, split, names, [c for file in names for c in captions_of[file]])


@pytest.fixture(scope="session")
def two_datasets(tmp_path_factory):
    """(root, copies): tiny "rsitmd" and "rsicd" precomp datasets of demo scenes (64 px), where
    copies[name] = the test image it copies: rsicd's training pool holds an exact copy, a JPEG
    (quality 75) and a 64 -> 56 px resized copy of two rsitmd test images each, and rsitmd's
    training pool a JPEG copy of one rsicd test image. Every other image is a distinct scene."""
    root, rng = tmp_path_factory.mktemp("two"), random.Random(5)
    scenes = {}

    def scene(name):
        s = sample_scene(rng)
        scenes[name] = (render(s, 64, rng), captions(s, rng))
        return name, scenes[name][0]
    data = {d: {split: [scene(f"{d}_{split}_{i}.png") for i in range(n)]
                for split, n in (("train", 20), ("test", 8))} for d in ("rsitmd", "rsicd")}
    copies = {}
    planted = [("tif", "rsitmd_test_0.png"), ("tif", "rsitmd_test_1.png"),
               ("jpg", "rsitmd_test_2.png"), ("jpg", "rsitmd_test_3.png"),
               ("small.png", "rsitmd_test_4.png"), ("small.png", "rsitmd_test_5.png"),
               ("jpg", "rsicd_test_0.png")]
    for k, (kind, source) in enumerate(planted):
        image = scenes[source][0]
        image = image.resize((56, 56), Image.Resampling.BICUBIC) if kind == "small.png" else image
        target = "rsitmd" if source.startswith("rsicd") else "rsicd"
        name = f"{target}_copy_{k}.{kind}"
        copies[name] = source
        scenes[name] = (image, [f"copy {k} caption {c}" for c in range(5)])  # no caption match
        data[target]["train"].insert(3 * k, (name, image))
    for d in data:
        _write_scenes(root, d, data[d], {name: caps for name, (_, caps) in scenes.items()})
    return str(root), copies
