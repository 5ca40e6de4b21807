"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled adapter beside each MLP (paper: 0.17M).

As in the official code (ShoufaChen/AdaptFormer), all as main_image.py sets them:
- the adapter reads the residual stream after attention and its output is added beside the
  MLP's (`Block.forward` in models/vit_image.py, `ffn_option="parallel"`);
- `A(x) = s * up(dropout(relu(down(x))))` (`Adapter.forward` in models/adapter.py),
  with no LayerNorm (`ffn_adapter_layernorm_option="none"`), s = 0.1 (`ffn_adapter_scalar`),
  dropout 0.1;
- down PyTorch's default with zero bias and up zero (`init_option="lora"`):
  step 0 is exactly zero-shot CLIP.

    x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) + 0.1 * up(dropout(relu(down(x))))

This is the placement MRS-Adapter inherits.
Every block of both towers has its own adapter, no sharing.
Departure forced by the paper's 0.17M: their bottleneck (`ffn_num`) is 64; here 5.
Count on ViT-B/32: 12 x (2 x 512 x 5 + 5 + 512) + 12 x (2 x 768 x 5 + 5 + 768) = 169,080
(paper: 0.17M).
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
    """(B, L, D) -> (B, L, D): a frozen CLIP block (`self.block`), a scaled adapter beside its MLP.

        x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) + scale * adapter(x)
    """

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


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, scale: float = SCALE,
          dropout: float = DROPOUT) -> nn.Module:
    """CLIP -> CLIP, frozen, with an AdaptFormer adapter in every block of both towers."""
    freeze(model)
    for tower in (model.transformer, model.visual.transformer):
        for i, block in enumerate(tower.resblocks):
            tower.resblocks[i] = AdaptFormerBlock(block, tower.width, bottleneck, scale, dropout)
    return model.to(model.logit_scale.device)
