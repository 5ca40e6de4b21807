"""The ReLU bottleneck adapter module (Houlsby et al., ICML 2019) as AdaptFormer builds it.

    up(dropout(relu(down(x)))):  (B, L, D) -> (B, L, D)

- Down: PyTorch's default Linear weights and a zero bias; up: all zero (AdaptFormer's "lora"
  init), so the module outputs exactly 0 until the first step,
  and a block that adds it starts as the frozen block.
- Used by adaptformer.py (beside the MLP) and sequential_adapter.py (on the MLP output).
Not a method itself (houlsby.py builds Houlsby's own GELU adapter with its near-identity init).
"""
import torch
from torch import nn


class Bottleneck(nn.Module):
    """(B, L, D) -> (B, L, D): up(dropout(relu(down(x)))), exactly 0 until the first step."""

    def __init__(self, width: int, bottleneck: int, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, D) -> (B, L, r) -> (B, L, D)
        return self.up(self.dropout(torch.relu(self.down(x))))
