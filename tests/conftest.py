"""Shared fixtures: tiny CLIP models built in the test (no downloads), OpenAI-style archives."""
import os
import warnings

import pytest
import torch
from PIL import Image

from mrs_adapter.demo.backbone import pretrain
from mrs_adapter.demo.scenes import make_demo, write_precomp
from mrs_adapter.model import CLIP

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128,
            vision_patch_size=8, context_length=32, vocab_size=49408, transformer_width=96,
            transformer_heads=1, transformer_layers=2)


def make_tiny_clip(seed: int = 0, embed_dim: int = 32, image_resolution: int = 32,
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


@pytest.fixture
def tiny_clip() -> CLIP:
    return make_tiny_clip()


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


def as_torchscript_archive(state_dict: dict, path):
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
    import random

    from mrs_adapter.demo.scenes import captions, render, sample_scene
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
