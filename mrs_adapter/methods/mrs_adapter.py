"""MRS-Adapter (the paper's method, Sec. III-B): one adapter shared by every block of both towers.

Configuration (method.md 2): bottleneck 64, last 64 up channels shared across modalities,
dropout 0.5, up layers zero-initialised; 161,088 trainable parameters on ViT-B/32.
The module itself is `mrs_adapter/adapter.py`.
"""
from torch import nn

from ..adapter import add_adapters


def apply(model: nn.Module, bottleneck: int = 64, shared_dim: int = 64, dropout: float = 0.5,
          shared: bool = True) -> nn.Module:
    return add_adapters(model, bottleneck, shared_dim, dropout, shared, verbose=False)
