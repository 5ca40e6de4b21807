"""A tiny CLIP pre-trained offline, standing in for OpenAI's weights in the demo.

The paper transfers CLIP, pre-trained on natural images, to remote sensing.
Offline there are no pre-trained weights, so the demo first trains a tiny CLIP
(all weights, CLIP's contrastive loss) on a different synthetic domain:
coloured shapes seen from the side, on plain backgrounds.
It then adapts it to the aerial demo scenes with the published recipe.
The two domains share words (colours, counts, positions), not pictures.
The result is cached.
"""
import os
import random
import time

import torch
from PIL import Image, ImageDraw

from ..atomic import atomic_write
from ..clip import MEAN, STD
from ..loss import info_nce
from ..model import CLIP, build_model
from ..tokenizer import tokenize

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200),
           "yellow": (220, 200, 40), "white": (235, 235, 235), "black": (25, 25, 25),
           "grey": (128, 128, 128), "brown": (120, 80, 40)}
SHAPES = ["circle", "square", "triangle", "bar"]
NUMBERS = ["one", "two", "three", "four"]
ARCH = dict(embed_dim=64, image_resolution=64, vision_layers=3, vision_width=128,
            vision_patch_size=16, context_length=32, vocab_size=49408, transformer_width=128,
            transformer_heads=2, transformer_layers=3)


def shape_scene(rng: random.Random, size: int = 64):
    """rng -> (RGB image, caption): 1-4 same-coloured shapes on a plain background."""
    colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 4)
    background = rng.choice([c for c in COLOURS if c != colour])
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    side = "left" if rng.random() < 0.5 else "right"
    for _ in range(count):
        r = rng.randint(size // 12, size // 7)
        x = rng.randint(r, size // 2 - r) + (0 if side == "left" else size // 2)
        y = rng.randint(r, size - r)
        box = [x - r, y - r, x + r, y + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        elif shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        else:
            draw.rectangle([x - r, y - r // 3, x + r, y + r // 3], fill=COLOURS[colour])
    noun = shape + ("s" if count > 1 else "")
    number = NUMBERS[count - 1]
    caption = rng.choice([f"{number} {colour} {noun} on the {side} of a {background} background",
                          f"a {background} picture with {number} {colour} {noun} on the {side}",
                          f"{number} {colour} {noun} on {background}, {side} side"])
    return image, caption


def pretrain(steps: int = 400, n_images: int = 4000, batch_size: int = 64, lr: float = 5e-4,
             seed: int = 0, log_every: int = 50, arch: dict = None) -> CLIP:
    """-> a CLIP of `arch` (default ARCH) trained from scratch on shape scenes, in eval mode.

    `steps` steps: ~40 s on 2 CPU cores.
    """
    arch = arch or ARCH
    size = arch["image_resolution"]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    scenes = [shape_scene(rng, size) for _ in range(n_images)]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    pixels = [torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
              for im, _ in scenes]
    images = torch.stack(pixels).permute(0, 3, 1, 2)  # (N, 3, size, size) uint8
    tokens = tokenize([c for _, c in scenes], arch["context_length"])
    model = CLIP(**arch).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    start = time.time()
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"demo backbone: pre-training a tiny CLIP ({millions:.1f}M params) on {n_images} "
          f"synthetic shape pictures for {steps} steps (cached afterwards)")
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_images, (batch_size,))
        x = (images[idx].float() / 255 - mean) / std
        loss = info_nce(model.encode_image(x), model.encode_text(tokens[idx]), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap on the temperature, 100
        if step % log_every == 0:
            print(f"  pre-train step {step}: contrastive loss {loss.item():.3f} "
                  f"({time.time() - start:.0f}s)")
    return model.eval()


def default_path(data_root: str) -> str:
    """Data root -> where train.py / eval.py keep the demo backbone: beside the demo data."""
    return os.path.join(data_root, "demo_backbone.pt")


def load_or_pretrain(path: str, **kwargs) -> str:
    """Path -> the same path, holding the demo backbone.

    Pre-trained and saved (atomically) first if missing; an unreadable cache is rebuilt.
    """
    if os.path.isfile(path):
        try:
            build_model(torch.load(path, map_location="cpu", weights_only=True))
            return path
        except Exception as e:  # an unreadable cache is rebuilt, never trusted
            print(f"demo backbone cache {path} is unusable ({e}); pre-training again")
    model = pretrain(**kwargs)
    atomic_write(path, lambda f: torch.save(model.state_dict(), f), mode="wb")
    return path
