"""VPT-deep (Jia et al., ECCV 2022): learnable tokens in the image tower (paper: 0.46M).

CLIP frozen.
As in the official code (KMnP/vpt, src/models/vit_prompt/vit.py, class PromptedTransformer):
- prompts go in after [CLS] and before the patches in the sequence entering the first block
  (`incorporate_prompt`);
- each deeper block's prompt positions are replaced by that block's own prompts
  (`forward_deep_prompt`), 12 sets in all;
- init uniform in +-sqrt(6 / (3 p^2 + D)) (their "xavier_uniform" with p = patch size,
  D = width); no prompt projection and no prompt dropout (their defaults).
CLIP has a LayerNorm (`ln_pre`) between the patch embedding and the first block,
which VPT's ViT does not: the prompts go in AFTER ln_pre, into the sequence the first block
reads - where VPT puts them, and where the deep prompts of later blocks live too
(no LayerNorm is applied to those).
The prompt positions are removed after the last block, so the head reads [CLS] at token 0 as
before (VPT keeps them to the end and also reads [CLS]: the same output).
50 tokens x 12 blocks x 768 = 460,800 trainable parameters on ViT-B/32 (paper: 0.46M;
VPT tunes the number of tokens per dataset, and 50 is the one the paper's count gives).
The text tower is untouched.
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
    """CLIP -> the same CLIP with image prompts composed in (no freezing; vl_prompt.py uses it)."""
    visual = model.visual
    patch, width = visual.conv1.kernel_size[0], visual.transformer.width
    bound = math.sqrt(6.0 / (3 * patch * patch + width))
    add_prompts(visual.transformer, length, depth, lambda t: nn.init.uniform_(t, -bound, bound))
    return model


def apply(model: nn.Module, length: int = LENGTH, depth: Optional[int] = DEPTH) -> nn.Module:
    """CLIP -> CLIP, frozen, with VPT-deep prompts in the image tower."""
    freeze(model)
    return add_visual_prompts(model, length, depth)
