"""CoOp (Zhou et al., IJCV 2022): learnable context tokens in the text tower (paper: 0.10M).

CLIP frozen; the image tower is untouched.
Follows the official code (KaiyangZhou/CoOp, trainers/coop.py) in what the context is:
16 vectors (`N_CTX` 16) right after the start token, before the caption, generic
(one context for every text, not class-specific), init N(0, 0.02) (`PromptLearner.__init__`).
Departures:
- Depth, forced by the paper's count.
  Published CoOp learns the context at the input only (`PromptLearner.forward` builds
  [start, context, words] in the token-embedding space and `TextEncoder.forward` runs the
  frozen transformer on it): 16 x 512 = 8,192 parameters, 0.008M, twelve times below the
  paper's 0.10M.
  0.10M is the context given to every one of the 12 text blocks, each block its own
  (deep, as VPT-deep for images): 16 x 12 x 512 = 98,304.
  The shallow, published form is what vl_prompt.py uses (`coop` with depth=1 gives it alone).
- Positions, forced by captions.
  CoOp adds the positional embedding after inserting the context, so a class name moves to
  positions 17+ and a long text loses its end.
  Here the caption tokens keep their own positional embeddings and the sequence grows to
  77 + 16 (no caption is cut); the context vectors get no positional embedding
  (a learned vector absorbs one).
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


def add_text_prompts(model: nn.Module, length: int, depth: Optional[int],
                     init_std: float = INIT_STD) -> nn.Module:
    """CLIP -> the same CLIP with text prompts composed in (no freezing; vl_prompt.py reuses it)."""
    add_prompts(model.transformer, length, depth, lambda t: nn.init.normal_(t, std=init_std))
    return model


def apply(model: nn.Module, length: int = LENGTH, depth: Optional[int] = DEPTH,
          init_std: float = INIT_STD) -> nn.Module:
    """CLIP -> CLIP, frozen, with learnable context tokens in the text tower."""
    freeze(model)
    return add_text_prompts(model, length, depth, init_std)
