"""CoOp (Zhou et al., IJCV 2022): learnable context tokens in the text tower, CLIP frozen (paper: 0.10M).

Configuration: 16 context vectors (CoOp's default length) after the start token, in every text
block (deep: each of the 12 blocks its own, as VPT-deep does for images): 16 x 12 x 512 = 98,304
trainable parameters on ViT-B/32. CoOp's shallow form (16 x 512 = 8,192) is two orders of
magnitude below the paper's 0.10M, so the paper's count implies prompts at every layer.
Init N(0, 0.02) (CoOp's generic context). The image tower is untouched.
Differences from CoOp, forced by retrieval with captions instead of class names: the caption
tokens keep their own positional embeddings and the sequence grows to 77 + 16 (no caption is cut
to make room); the context vectors get no positional embedding (a learned vector absorbs one).
Does NOT start at zero-shot CLIP: extra tokens change what every caption token attends to.
"""
from typing import Optional

from torch import nn

from . import freeze
from .prompts import add_prompts

LENGTH = 16  # context vectors per prompted block
DEPTH = None  # prompted blocks from the first; None: all (12 on ViT-B/32)
INIT_STD = 0.02
PLACEMENT = "text tower: after the start token, every block"
INIT = "N(0, 0.02) (does not start at zero-shot)"


def add_text_prompts(model: nn.Module, length: int, depth: Optional[int], init_std: float = INIT_STD) -> nn.Module:
    """Compose text prompts into `model` (no freezing; vl_prompt.py reuses this)."""
    add_prompts(model.transformer, length, depth, lambda t: nn.init.normal_(t, std=init_std))
    return model


def apply(model: nn.Module, length: int = LENGTH, depth: Optional[int] = DEPTH) -> nn.Module:
    freeze(model)
    return add_text_prompts(model, length, depth)
