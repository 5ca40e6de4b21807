"""UniAdapter (Lu et al., ICLR 2024): adapters in both towers with a down projection unified across them (paper: 0.55M).

Configuration: at every layer l and each of its two sublayers, one module serves block l of BOTH
towers; UniAdapter shares the down projection across modalities and keeps an up projection per
modality. CLIP's towers differ in width (512 / 768), so the unified down projection reads the
first 512 channels of either stream, and the wider tower adds its own bias-free projection of its
remaining 256 channels:
    h = dropout(relu(down(x[..., :512]) + rest_m(x[..., 512:])));  A_m(x) = up_m(h)
each in parallel with its sublayer, reading the sublayer's normalised input:
    h = ln_1(x); x = x + attn(h) + A_attn(h);  h = ln_2(x); x = x + mlp(h) + A_mlp(h)
Bottleneck 11, dropout 0.1; down PyTorch's default init with zero bias, ups zero, so step 0 is
exactly zero-shot CLIP. UniAdapter's other parts act on a fusion encoder (its cross-modal adapter
and the query-residual adaptation of cross-attention); CLIP is a dual encoder with no fusion
encoder or cross-attention, so they have nothing to attach to and are left out.
Count on ViT-B/32: 24 x (512 x 11 + 11 + 256 x 11 + 11 x 512 + 512 + 11 x 768 + 768) = 571,656
(paper: 0.55M).
"""
from typing import Optional

import torch
from torch import nn

from . import freeze

BOTTLENECK = 11
DROPOUT = 0.1
PLACEMENT = ("parallel to attention and to the MLP, reading ln_1(x) / ln_2(x), every block; "
             "one module per layer and sublayer for both towers")
INIT = "down default, up zero (starts at zero-shot)"


class UniAdapter(nn.Module):
    """One down projection for both towers (on their first min(D_text, D_vision) channels), an up projection each."""

    def __init__(self, text_width: int, vision_width: int, bottleneck: int, dropout: float):
        super().__init__()
        self.common = min(text_width, vision_width)
        self.down = nn.Linear(self.common, bottleneck)  # unified across modalities
        self.text_rest = self._rest(text_width, bottleneck)  # None where the tower is the narrower one
        self.vision_rest = self._rest(vision_width, bottleneck)
        self.text_up, self.vision_up = nn.Linear(bottleneck, text_width), nn.Linear(bottleneck, vision_width)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.down.bias)
        for up in (self.text_up, self.vision_up):
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def _rest(self, width: int, bottleneck: int) -> Optional[nn.Linear]:
        return nn.Linear(width - self.common, bottleneck, bias=False) if width > self.common else None

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        rest, up = (self.text_rest, self.text_up) if modality == "text" else (self.vision_rest, self.vision_up)
        h = self.down(x[..., :self.common])  # (B, L, r)
        if rest is not None:
            h = h + rest(x[..., self.common:])
        return up(self.dropout(torch.relu(h)))  # (B, L, D_m)


class UniAdapterBlock(nn.Module):
    """A frozen CLIP block (`self.block`) with an adapter in parallel with each sublayer."""

    def __init__(self, block: nn.Module, attn_adapter: UniAdapter, mlp_adapter: UniAdapter, modality: str):
        super().__init__()
        self.block, self.attn_adapter, self.mlp_adapter, self.modality = block, attn_adapter, mlp_adapter, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, m = self.block, self.modality
        h = block.ln_1(x)
        x = x + block.attn(h) + self.attn_adapter(h, m)
        h = block.ln_2(x)
        x = x + block.mlp(h) + self.mlp_adapter(h, m)
        return x

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, dropout: float = DROPOUT) -> nn.Module:
    freeze(model)
    text, vision = model.transformer, model.visual.transformer
    if text.layers != vision.layers:
        raise ValueError(f"layer-wise sharing needs towers of equal depth: text {text.layers}, vision {vision.layers}")
    for i in range(text.layers):
        attn_adapter, mlp_adapter = (UniAdapter(text.width, vision.width, bottleneck, dropout) for _ in range(2))
        text.resblocks[i] = UniAdapterBlock(text.resblocks[i], attn_adapter, mlp_adapter, "text")
        vision.resblocks[i] = UniAdapterBlock(vision.resblocks[i], attn_adapter, mlp_adapter, "vision")
    return model.to(model.logit_scale.device)
