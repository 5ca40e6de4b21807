"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled bottleneck adapter in parallel with each MLP.

Configuration: in every block of both towers, one adapter reading the residual stream after
attention (AdaptFormer's placement, the one MRS-Adapter inherits), scaled by 0.1 (AdaptFormer's s):
    x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) + 0.1 * up(dropout(relu(down(x))))
bottleneck 5, dropout 0.1, up zero-initialised (step 0 is exactly zero-shot CLIP); every block has
its own adapter, no sharing. Count on ViT-B/32: 12 x (2 x 512 x 5 + 5 + 512) +
12 x (2 x 768 x 5 + 5 + 768) = 169,080 (paper: 0.17M).
"""
import torch
from torch import nn

from . import freeze
from .bottleneck import Bottleneck

BOTTLENECK = 5
SCALE = 0.1
DROPOUT = 0.1
PLACEMENT = "parallel to the MLP, reading the post-attention stream, every block of both towers"
INIT = "down default, up zero (starts at zero-shot)"


class AdaptFormerBlock(nn.Module):
    """A frozen CLIP block (`self.block`) with a scaled adapter in parallel with its MLP."""

    def __init__(self, block: nn.Module, width: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.block, self.scale = block, scale
        self.adapter = Bottleneck(width, bottleneck, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        x = x + block.attn(block.ln_1(x))
        x = x + block.mlp(block.ln_2(x)) + self.scale * self.adapter(x)
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, scale: float = SCALE, dropout: float = DROPOUT) -> nn.Module:
    freeze(model)
    for tower in (model.transformer, model.visual.transformer):
        for i, block in enumerate(tower.resblocks):
            tower.resblocks[i] = AdaptFormerBlock(block, tower.width, bottleneck, scale, dropout)
    return model.to(model.logit_scale.device)
