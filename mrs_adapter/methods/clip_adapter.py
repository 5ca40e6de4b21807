"""CLIP-Adapter (Gao et al., IJCV 2023) on both output embeddings, CLIP frozen (paper: 0.52M).

As in the official code (gaopengcuhk/CLIP-Adapter, clip_adapter.py), per adapted embedding
(`Adapter`, `CustomCLIP.forward`):

    e' = (1 - RATIO) e + RATIO * relu(W_up relu(W_down e))

No biases, ratio 0.2, PyTorch's default Linear init.
The adapter ends in a ReLU, whose gradient at 0 is 0, so a zero-initialised W_up would never
train: this method does NOT start at zero-shot CLIP
(step 0 already mixes 20% adapter output into each embedding).
Departure: the official code adapts the image embedding only (classification against fixed
class-name prompts), with reduction 4 (512 -> 128 -> 512 here: 131,072).
Retrieval adapts both towers (the CLIP-Adapter paper also studies a text adapter),
and the paper's 0.52M is exactly two adapters at reduction 2 (512 -> 256 -> 512):
2 x 2 x 512 x 256 = 524,288.
(An image-only adapter at reduction 1 would also be 524,288, but then it is no bottleneck.)
The heads sit after CLIP's projections, so `apply` returns a `CLIPWithHeads` wrapper (heads.py).
"""
import torch
from torch import nn

from . import freeze
from .heads import CLIPWithHeads, embed_dim

REDUCTION = 2  # bottleneck = E / REDUCTION
RATIO = 0.2  # weight of the adapter's output in the residual mix
PLACEMENT = "after each tower's projection (on the output embeddings)"
INIT = "PyTorch default Linear (does not start at zero-shot)"


class CLIPAdapter(nn.Module):
    """(B, E) -> (B, E): e -> (1 - ratio) e + ratio * relu(up(relu(down(e))))."""

    def __init__(self, width: int, reduction: int = REDUCTION, ratio: float = RATIO):
        super().__init__()
        self.down = nn.Linear(width, width // reduction, bias=False)
        self.up = nn.Linear(width // reduction, width, bias=False)
        self.ratio = ratio

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        adapted = torch.relu(self.up(torch.relu(self.down(e))))
        return (1 - self.ratio) * e + self.ratio * adapted

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"


def apply(model: nn.Module, reduction: int = REDUCTION, ratio: float = RATIO) -> nn.Module:
    """CLIP -> `CLIPWithHeads`: the frozen CLIP, a CLIP-Adapter on each output embedding."""
    freeze(model)
    width = embed_dim(model)
    image_head, text_head = (CLIPAdapter(width, reduction, ratio) for _ in range(2))
    adapted = CLIPWithHeads(model, image_head, text_head)
    return adapted.to(model.logit_scale.device)
