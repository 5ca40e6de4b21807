"""Cross-Modal Adapter (Jiang et al., 2022): per-tower adapters that share a middle layer across towers (paper: 0.16M).

Configuration: at every layer l, one module serves block l of BOTH towers: a modality's own down
projection, a bottleneck-to-bottleneck layer shared by the two towers (Cross-Modal Adapter's
weight-sharing component: both towers' gradients shape it, an encoder-level interaction that
needs no token exchange, which a dual encoder does not have), the modality's own up projection:
    A_m(x) = up_m(shared(dropout(relu(down_m(x)))))
placed before attention, sequentially on the block input: `x = x + A_m(x)`, then the frozen
block. Bottleneck 5, dropout 0.1; down and shared PyTorch's default Linear init with zero biases,
up zero, so step 0 is exactly zero-shot CLIP. Count on ViT-B/32: 12 x (512 x 5 + 5 + 768 x 5 + 5
+ 5 x 5 + 5 + 5 x 512 + 512 + 5 x 768 + 768) = 169,440 (paper: 0.16M).
"""
import torch
from torch import nn

from . import freeze

BOTTLENECK = 5
DROPOUT = 0.1
PLACEMENT = "sequential on the block input (before attention), every block; one module per layer for both towers"
INIT = "down and shared default, up zero (starts at zero-shot)"


class CrossModalAdapter(nn.Module):
    """Own down/up projections for text and vision around one shared (r, r) layer: (B, L, D_m) -> (B, L, D_m)."""

    def __init__(self, text_width: int, vision_width: int, bottleneck: int, dropout: float):
        super().__init__()
        self.text_down, self.vision_down = nn.Linear(text_width, bottleneck), nn.Linear(vision_width, bottleneck)
        self.shared = nn.Linear(bottleneck, bottleneck)
        self.text_up, self.vision_up = nn.Linear(bottleneck, text_width), nn.Linear(bottleneck, vision_width)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.text_down, self.vision_down, self.shared):
            nn.init.zeros_(layer.bias)
        for layer in (self.text_up, self.vision_up):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        down, up = (self.text_down, self.text_up) if modality == "text" else (self.vision_down, self.vision_up)
        return up(self.shared(self.dropout(torch.relu(down(x)))))  # D_m -> r -> r (shared) -> D_m


class CrossModalBlock(nn.Module):
    """A frozen CLIP block (`self.block`) after a residual adapter on its input."""

    def __init__(self, block: nn.Module, adapter: CrossModalAdapter, modality: str):
        super().__init__()
        self.block, self.adapter, self.modality = block, adapter, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.adapter(x, self.modality)
        return self.block(x)

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, dropout: float = DROPOUT) -> nn.Module:
    freeze(model)
    text, vision = model.transformer, model.visual.transformer
    if text.layers != vision.layers:
        raise ValueError(f"layer-wise sharing needs towers of equal depth: text {text.layers}, vision {vision.layers}")
    for i in range(text.layers):
        adapter = CrossModalAdapter(text.width, vision.width, bottleneck, dropout)  # one per layer, both towers
        text.resblocks[i] = CrossModalBlock(text.resblocks[i], adapter, "text")
        vision.resblocks[i] = CrossModalBlock(vision.resblocks[i], adapter, "vision")
    return model.to(model.logit_scale.device)
