"""MRS-Adapter (the paper's method, Sec. III-B): one adapter shared by every block of both towers.

Configuration (docs/method.md §2):
- bottleneck 64, the last 64 up channels shared across modalities, dropout 0.5;
- up layers zero-initialised (starts at zero-shot CLIP);
- in parallel with the MLP of every block of both towers;
- 161,088 trainable parameters on ViT-B/32 (paper: 0.16M).
The module itself is `mrs_adapter/adapter.py`.
"""
from torch import nn

from ..adapter import add_adapters

BOTTLENECK = 64
SHARED_DIM = 64  # last up channels shared by the text and the vision branch
DROPOUT = 0.5
SHARED = True  # one instance for all blocks of both towers (False: the per-block ablation)
PLACEMENT = ("parallel to the MLP, reading the post-attention stream, every block of both towers; "
             "one module for all")
INIT = "down default, up zero (starts at zero-shot)"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, shared_dim: int = SHARED_DIM,
          dropout: float = DROPOUT, shared: bool = SHARED) -> nn.Module:
    """CLIP -> CLIP, frozen, with the MRS-Adapter in every block of both towers (add_adapters)."""
    return add_adapters(model, bottleneck, shared_dim, dropout, shared, verbose=False)
