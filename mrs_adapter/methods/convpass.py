"""Convpass (Jie & Deng, 2022): a convolutional bypass that gives the ViT a spatial prior, CLIP frozen (paper: 0.14M).

Configuration: in every block of both towers, one bypass in parallel with the MLP, reading the
MLP's normalised input: `h = ln_2(x); x = x + mlp(h) + 1.0 * C(h)` (Convpass also puts one beside
attention; one per block keeps a bottleneck of 4 in the paper's budget instead of 2), with
`C(h) = up(dropout(gelu(conv(gelu(down(h))))))`, bottleneck 4, dropout 0.1, QuickGELU.
Vision: `conv` is a 3x3 conv over the patch grid; [CLS] has no neighbours, so it passes as a 1x1
image through the same conv (only the centre tap reaches it). Text: a causal 1-D conv of width 3
(token t mixes t-2, t-1, t), so no token reads a later one. Init: down PyTorch's default with zero
bias; conv = identity on the centre (vision) / current-token (text) tap, 0 elsewhere, so the bypass
starts as a plain adapter and learns its spatial mixing; up zero, so step 0 is exactly zero-shot.
Count on ViT-B/32: 12 x (768 x 4 + 4 + 4 x 4 x 9 + 4 + 4 x 768 + 768) +
12 x (512 x 4 + 4 + 4 x 4 x 3 + 4 + 4 x 512 + 512) = 140,736 (paper: 0.14M).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import freeze
from ..clip import QuickGELU

BOTTLENECK = 4
KERNEL = 3
SCALE = 1.0
DROPOUT = 0.1
PLACEMENT = ("parallel to the MLP, reading ln_2(x), every block; 3x3 conv on the patch grid (vision), "
             "causal width-3 conv (text)")
INIT = "down default, conv identity tap, up zero (starts at zero-shot)"


class Convpass(nn.Module):
    """down -> QuickGELU -> conv over token neighbours -> QuickGELU -> dropout -> up: (B, L, D) -> (B, L, D).

    image=True: tokens are [CLS] + a square grid of patches (2-D conv). image=False: a causal 1-D conv.
    """

    def __init__(self, width: int, bottleneck: int, image: bool, kernel: int = KERNEL, dropout: float = DROPOUT):
        super().__init__()
        self.image, self.kernel = image, kernel
        self.down = nn.Linear(width, bottleneck)
        conv = nn.Conv2d if image else nn.Conv1d
        self.conv = conv(bottleneck, bottleneck, kernel, padding=kernel // 2 if image else 0)
        self.up = nn.Linear(bottleneck, width)
        self.gelu, self.dropout = QuickGELU(), nn.Dropout(dropout)
        nn.init.zeros_(self.down.bias)
        with torch.no_grad():  # identity on the tap of the token itself: centre (image), last (causal text)
            self.conv.weight.zero_()
            centre = (kernel // 2, kernel // 2) if image else (kernel - 1,)
            self.conv.weight[(slice(None), slice(None)) + centre] = torch.eye(bottleneck)
            self.conv.bias.zero_()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def mix_image(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 1 + g * g, r) -> same: the 3x3 conv over the patch grid, [CLS] as a 1x1 image."""
        cls, patches = h[:, :1], h[:, 1:]
        B, N, r = patches.shape
        grid = math.isqrt(N)
        if grid * grid != N:
            raise ValueError(f"Convpass needs [CLS] + a square grid of patches, got {N} patch tokens")
        patches = patches.transpose(1, 2).reshape(B, r, grid, grid)  # shape = [B, r, grid, grid]
        patches = self.conv(patches).flatten(2).transpose(1, 2)  # shape = [B, grid ** 2, r]
        c = self.kernel // 2
        cls = F.linear(cls, self.conv.weight[:, :, c, c], self.conv.bias)  # zero padding leaves the centre tap
        return torch.cat([cls, patches], dim=1)

    def mix_text(self, h: torch.Tensor) -> torch.Tensor:
        """(B, L, r) -> same: 1-D conv padded on the left only, so position t reads t - kernel + 1 .. t."""
        h = F.pad(h.transpose(1, 2), (self.kernel - 1, 0))  # shape = [B, r, kernel - 1 + L]
        return self.conv(h).transpose(1, 2)  # shape = [B, L, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gelu(self.down(x))
        h = self.mix_image(h) if self.image else self.mix_text(h)
        return self.up(self.dropout(self.gelu(h)))


class ConvpassBlock(nn.Module):
    """A frozen CLIP block (`self.block`) with a Convpass in parallel with its MLP."""

    def __init__(self, block: nn.Module, convpass: Convpass, scale: float):
        super().__init__()
        self.block, self.convpass, self.scale = block, convpass, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        x = x + block.attn(block.ln_1(x))
        h = block.ln_2(x)
        x = x + block.mlp(h) + self.scale * self.convpass(h)
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, scale: float = SCALE, dropout: float = DROPOUT) -> nn.Module:
    freeze(model)
    for tower, image in ((model.transformer, False), (model.visual.transformer, True)):
        for i, block in enumerate(tower.resblocks):
            convpass = Convpass(tower.width, bottleneck, image, KERNEL, dropout)
            tower.resblocks[i] = ConvpassBlock(block, convpass, scale)
    return model.to(model.logit_scale.device)
