"""VPT-deep (Jia et al., ECCV 2022): learnable tokens in the image tower, CLIP frozen (paper: 0.46M).

Configuration: 50 prompt tokens after [CLS] in every vision block (deep: each of the 12 blocks
its own), removed after the last block so the head still reads [CLS] at token 0:
50 x 12 x 768 = 460,800 trainable parameters on ViT-B/32. Init: uniform in +-sqrt(6 / (3 p^2 + D))
(Xavier for the patch embedding, p = patch size, D = width), VPT's choice, so prompts start at
the scale of a patch embedding. The text tower is untouched.
Does NOT start at zero-shot CLIP: [CLS] attends to the prompts from block 0.
"""
import math
from typing import Optional

from torch import nn

from . import freeze
from .prompts import add_prompts

LENGTH = 50  # prompt tokens per prompted block
DEPTH = None  # prompted blocks from the first; None: all (12 on ViT-B/32)
PLACEMENT = "vision tower: after [CLS], every block; removed before the head"
INIT = "uniform +-sqrt(6 / (3 patch^2 + width)) (does not start at zero-shot)"


def add_visual_prompts(model: nn.Module, length: int, depth: Optional[int]) -> nn.Module:
    """Compose image prompts into `model` (no freezing; vl_prompt.py reuses this)."""
    visual = model.visual
    patch, width = visual.conv1.kernel_size[0], visual.transformer.width
    bound = math.sqrt(6.0 / (3 * patch * patch + width))
    add_prompts(visual.transformer, length, depth, lambda t: nn.init.uniform_(t, -bound, bound))
    return model


def apply(model: nn.Module, length: int = LENGTH, depth: Optional[int] = DEPTH) -> nn.Module:
    freeze(model)
    return add_visual_prompts(model, length, depth)
