"""The "Adapter" row (Houlsby et al., ICML 2019): a sequential adapter on each MLP (paper: 0.17M).

The paper gives no configuration; its count fixes one.
- Two adapters per block (Houlsby's own form, `houlsby`) give 0.15M at bottleneck 2
  and 0.22M at 3, never 0.17M.
- One adapter per block at bottleneck 5 gives 169,080,
  the paper's 0.17M exactly and the same count as its AdaptFormer row.
So this is the adapter as AdaptFormer's code builds it in sequence (ShoufaChen/AdaptFormer),
the code whose adapter and block the paper's released MRS-Adapter mirrors:
`Block.forward` in models/custom_modules.py with `ffn_option="sequential"` passes the MLP
output through `Adapter.forward` (models/adapter.py, `add_residual=True`: the adapter's own
identity skip) before the block's residual sum; in CLIP's pre-LN block:

    x = x + attn(ln_1(x))
    f = mlp(ln_2(x));  x = x + f + s * up(dropout(relu(down(f))))

Their code sets one `tuning_config` for its Adapter whichever `ffn_option` (main_image.py):
- no LayerNorm (`ffn_adapter_layernorm_option="none"`), s = 0.1 (`ffn_adapter_scalar`),
  dropout 0.1;
- down PyTorch's default with zero bias and up zero (`init_option="lora"`),
  so step 0 is exactly zero-shot CLIP.
Every block of both towers has its own adapter.
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
PLACEMENT = "sequential on the MLP output (own skip, then the block's residual), every block"
INIT = "down default, up zero (starts at zero-shot)"


class SequentialAdapterBlock(nn.Module):
    """(B, L, D) -> (B, L, D): a frozen block (`self.block`), a scaled adapter on its MLP output.

        x = x + attn(ln_1(x));  f = mlp(ln_2(x));  x = x + f + scale * adapter(f)
    """

    def __init__(self, block: nn.Module, width: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.block, self.scale = block, scale
        self.adapter = Bottleneck(width, bottleneck, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        x = x + block.attn(block.ln_1(x))
        f = block.mlp(block.ln_2(x))
        x = x + f + self.scale * self.adapter(f)
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, scale: float = SCALE,
          dropout: float = DROPOUT) -> nn.Module:
    """CLIP -> CLIP, frozen, with a sequential adapter on the MLP of every block of both towers."""
    freeze(model)
    for tower in (model.transformer, model.visual.transformer):
        for i, block in enumerate(tower.resblocks):
            tower.resblocks[i] = SequentialAdapterBlock(block, tower.width, bottleneck, scale,
                                                        dropout)
    return model.to(model.logit_scale.device)
