"""VL-Prompt: CoOp in the text tower and VPT-deep in the image tower, CLIP frozen (paper: 0.47M).

Configuration:
- image: VPT-deep as vpt.py, 50 tokens in each of the 12 vision blocks (460,800);
- text: CoOp in its published, input-level form, 16 context vectors inserted at block 0 only
  and carried through the others (8,192; KaiyangZhou/CoOp, trainers/coop.py `PromptLearner`);
- 468,992 trainable parameters on ViT-B/32.
The paper's 0.47M is its VPT count (0.46M) plus 0.01M, which is exactly the shallow CoOp
context, unlike the deep 0.10M of coop.py.
Inits and placement: coop.py, vpt.py. Does NOT start at zero-shot CLIP.
"""
from typing import Optional

from torch import nn

from . import freeze
from .coop import add_text_prompts
from .vpt import add_visual_prompts

TEXT_LENGTH = 16
TEXT_DEPTH = 1  # shallow: inserted at block 0, carried through the others
TEXT_INIT_STD = 0.02
VISION_LENGTH = 50
VISION_DEPTH = None  # deep: every vision block (12 on ViT-B/32)
PLACEMENT = "text: after the start token, block 0 only; vision: after [CLS], every block"
INIT = "text N(0, 0.02), vision as vpt (does not start at zero-shot)"


def apply(model: nn.Module, text_length: int = TEXT_LENGTH, text_depth: Optional[int] = TEXT_DEPTH,
          vision_length: int = VISION_LENGTH, vision_depth: Optional[int] = VISION_DEPTH,
          text_init_std: float = TEXT_INIT_STD) -> nn.Module:
    """CLIP -> CLIP, frozen, with CoOp prompts in the text tower and VPT-deep in the image tower."""
    freeze(model)
    add_text_prompts(model, text_length, text_depth, text_init_std)
    return add_visual_prompts(model, vision_length, vision_depth)
