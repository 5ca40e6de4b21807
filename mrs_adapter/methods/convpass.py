"""Convpass (Jie & Deng, 2022): a convolutional bypass, a spatial prior for the ViT (paper: 0.14M).

CLIP frozen. As in the official code (JieShibo/PETL-ViT, convpass/vtab/convpass.py):
a bypass reads the sublayer's normalised input and is added beside it, scaled by s
(`forward_block_attn`):

    h = ln_1(x);  x = x + attn(h) + s * C(h);  x = x + mlp(ln_2(x))
    C(h) = up(dropout(gelu(conv(gelu(down(h))))))                          (`Convpass.forward`)

- QuickGELU, dropout 0.1; down Xavier-uniform with zero bias, up zero,
  so step 0 is exactly zero-shot CLIP.
- [CLS] passes through the same conv as a 1x1 image (only the centre tap reaches it), as theirs.
Configuration:
- The official code has two variants, `convpass` (a bypass beside attention and one beside
  the MLP) and `convpass_attn` (beside attention only).
  The paper's 0.14M fits `convpass_attn` at bottleneck 4
  (140,736; `convpass` would need bottleneck 2, 154,944). Their bottleneck is 8.
- The init and s are `convpass_attn`'s (convpass/vtab/configs/convpass_attn/*.yaml,
  read by train.py into `set_Convpass`).
  Every task sets `xavier_init: True`: the conv Xavier-uniform with zero bias.
  (The identity-on-the-centre-tap init, `xavier_init=False`, is the function's default
  and some `convpass` tasks' choice; `xavier_init=False` here.)
- s is tuned per task from 0.1 to 100; we take RESISC45's s = 100,
  the one remote-sensing task of their benchmark (docs/method.md §7 gives a sweep on the demo).
Departure: Convpass is a vision method; the text tower gets a causal 1-D conv of width 3
instead (token t mixes t-2, t-1, t, so no token reads a later one), with the same init.
Count on ViT-B/32: 12 x (768 x 4 + 4 + 4 x 4 x 9 + 4 + 4 x 768 + 768)
                 + 12 x (512 x 4 + 4 + 4 x 4 x 3 + 4 + 4 x 512 + 512) = 140,736 (paper: 0.14M).
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model import QuickGELU
from . import freeze

BOTTLENECK = 4
KERNEL = 3
SCALE = 100.0  # Convpass's s: official convpass_attn on RESISC45
DROPOUT = 0.1
XAVIER_INIT = True  # the conv's init in every official convpass_attn config; False: identity tap
# False: official `convpass_attn`; True: `convpass`, a second bypass beside the MLP
MLP_BYPASS = False
PLACEMENT = ("parallel to attention, reading ln_1(x), every block (and to the MLP if mlp_bypass); "
             "3x3 conv on the patch grid (vision), causal width-3 conv (text)")
INIT = "down and conv Xavier-uniform, up zero (starts at zero-shot)"


class Convpass(nn.Module):
    """(B, L, D) -> (B, L, D): a convolution over neighbouring tokens, in a bottleneck.

        down -> QuickGELU -> conv over token neighbours -> QuickGELU -> dropout -> up

    image=True: tokens are [CLS] + a square grid of patches (2-D conv).
    image=False: a causal 1-D conv.
    """

    def __init__(self, width: int, bottleneck: int, image: bool, kernel: int = KERNEL,
                 dropout: float = DROPOUT, xavier_init: bool = XAVIER_INIT):
        super().__init__()
        self.image, self.kernel = image, kernel
        self.down = nn.Linear(width, bottleneck)
        conv = nn.Conv2d if image else nn.Conv1d
        self.conv = conv(bottleneck, bottleneck, kernel, padding=kernel // 2 if image else 0)
        self.up = nn.Linear(bottleneck, width)
        self.gelu, self.dropout = QuickGELU(), nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if xavier_init:  # fan-in = fan-out = bottleneck x taps
            nn.init.xavier_uniform_(self.conv.weight)
        else:  # identity on the tap of the token itself: centre (image), last (causal text)
            with torch.no_grad():
                self.conv.weight.zero_()
                centre = (kernel // 2, kernel // 2) if image else (kernel - 1,)
                self.conv.weight[(slice(None), slice(None)) + centre] = torch.eye(bottleneck)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def mix_image(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 1 + g * g, r) -> same: the 3x3 conv over the patch grid, [CLS] as a 1x1 image."""
        cls, patches = h[:, :1], h[:, 1:]
        B, N, r = patches.shape
        grid = math.isqrt(N)
        if grid * grid != N:
            raise ValueError("Convpass needs [CLS] + a square grid of patches, "
                             f"got {N} patch tokens")
        patches = patches.transpose(1, 2).reshape(B, r, grid, grid)  # shape = [B, r, grid, grid]
        patches = self.conv(patches).flatten(2).transpose(1, 2)  # shape = [B, grid ** 2, r]
        c = self.kernel // 2
        # [CLS] as a 1x1 image: zero padding leaves only the centre tap
        cls = F.linear(cls, self.conv.weight[:, :, c, c], self.conv.bias)
        return torch.cat([cls, patches], dim=1)

    def mix_text(self, h: torch.Tensor) -> torch.Tensor:
        """(B, L, r) -> same: 1-D conv padded on the left only.

        So position t reads t - kernel + 1 .. t.
        """
        h = F.pad(h.transpose(1, 2), (self.kernel - 1, 0))  # shape = [B, r, kernel - 1 + L]
        return self.conv(h).transpose(1, 2)  # shape = [B, L, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gelu(self.down(x))
        h = self.mix_image(h) if self.image else self.mix_text(h)
        return self.up(self.dropout(self.gelu(h)))


class ConvpassBlock(nn.Module):
    """(B, L, D) -> (B, L, D): a frozen CLIP block (`self.block`), a Convpass beside attention.

    With mlp_bypass, a second one beside the MLP.
    """

    def __init__(self, block: nn.Module, attn_bypass: Convpass, mlp_bypass: Optional[Convpass],
                 scale: float):
        super().__init__()
        self.block, self.scale = block, scale
        self.attn_bypass, self.mlp_bypass = attn_bypass, mlp_bypass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        h = block.ln_1(x)
        x = x + block.attn(h) + self.scale * self.attn_bypass(h)
        h = block.ln_2(x)
        x = x + block.mlp(h)
        if self.mlp_bypass is not None:
            x = x + self.scale * self.mlp_bypass(h)
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, kernel: int = KERNEL,
          scale: float = SCALE, dropout: float = DROPOUT, mlp_bypass: bool = MLP_BYPASS,
          xavier_init: bool = XAVIER_INIT) -> nn.Module:
    """CLIP -> CLIP, frozen, with a Convpass bypass in every block of both towers."""
    freeze(model)
    for tower, image in ((model.transformer, False), (model.visual.transformer, True)):
        options = (tower.width, bottleneck, image, kernel, dropout, xavier_init)
        for i, block in enumerate(tower.resblocks):
            attn = Convpass(*options)
            mlp = Convpass(*options) if mlp_bypass else None
            tower.resblocks[i] = ConvpassBlock(block, attn, mlp, scale)
    return model.to(model.logit_scale.device)
