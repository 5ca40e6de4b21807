"""Adapter (Houlsby et al., ICML 2019): sequential bottleneck adapters after attention and after the MLP.

Configuration: in every block of both towers, two adapters, each applied to its sublayer's output
with its own skip connection before the residual sum (Houlsby's placement):
    h = attn(ln_1(x));  x = x + h + A_attn(h)
    h = mlp(ln_2(x));   x = x + h + A_mlp(h)
A = up(relu(down(.))) with bottleneck 2, no dropout; up zero-initialised, so step 0 is exactly
zero-shot CLIP. CLIP's LayerNorms stay frozen (Houlsby also tunes them; that alone would be
61,440 more parameters here). Count on ViT-B/32: 24 x (2 x 512 x 2 + 2 + 512) +
24 x (2 x 768 x 2 + 2 + 768) = 153,696 (paper: 0.17M). Two adapters in each of 24 blocks leave a
bottleneck of 2 in the paper's budget (61,488 parameters per unit of bottleneck); 3 would be 0.22M.
"""
import torch
from torch import nn

from . import freeze
from .bottleneck import Bottleneck

BOTTLENECK = 2
DROPOUT = 0.0
PLACEMENT = "sequential, on the attention output and on the MLP output, every block of both towers"
INIT = "down default, up zero (starts at zero-shot)"


class HoulsbyBlock(nn.Module):
    """A frozen CLIP block (`self.block`) with an adapter on the output of each of its two sublayers."""

    def __init__(self, block: nn.Module, width: int, bottleneck: int, dropout: float):
        super().__init__()
        self.block = block
        self.attn_adapter = Bottleneck(width, bottleneck, dropout)
        self.mlp_adapter = Bottleneck(width, bottleneck, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        h = block.attn(block.ln_1(x))
        x = x + h + self.attn_adapter(h)
        h = block.mlp(block.ln_2(x))
        x = x + h + self.mlp_adapter(h)
        return x


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, dropout: float = DROPOUT) -> nn.Module:
    freeze(model)
    for tower in (model.transformer, model.visual.transformer):
        for i, block in enumerate(tower.resblocks):
            tower.resblocks[i] = HoulsbyBlock(block, tower.width, bottleneck, dropout)
    return model.to(model.logit_scale.device)
