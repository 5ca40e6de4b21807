"""Linear probe: a trainable linear map on each tower's output embedding (paper: 1.05M).

CLIP frozen. Configuration: per tower two Linear(E, E) layers in a row,
E = embedding width (512 on ViT-B/32).
- No non-linearity between them, so the probe stays linear (an affine map factorised in two).
- Both start as the identity (weight = I, bias = 0), so step 0 is exactly zero-shot CLIP.
2 towers x 2 x (512 x 512 + 512) = 1,050,624 trainable parameters on ViT-B/32.
The heads sit after CLIP's projections, so `apply` returns a `CLIPWithHeads` wrapper (heads.py).
"""
from collections import OrderedDict

from torch import nn

from . import freeze
from .heads import CLIPWithHeads, embed_dim

LAYERS = 2  # Linear(E, E) layers per tower
PLACEMENT = "after each tower's projection (on the output embeddings)"
INIT = "identity: weight I, bias 0 (starts at zero-shot)"


def linear_probe(width: int, layers: int) -> nn.Sequential:
    """(B, width) -> (B, width): `layers` Linear(width, width), each the identity at first."""
    named = ((f"fc{i + 1}", nn.Linear(width, width)) for i in range(layers))
    probe = nn.Sequential(OrderedDict(named))
    for fc in probe:
        nn.init.eye_(fc.weight)
        nn.init.zeros_(fc.bias)
    return probe


def apply(model: nn.Module, layers: int = LAYERS) -> nn.Module:
    """CLIP -> `CLIPWithHeads`: the frozen CLIP, a linear probe on each output embedding."""
    freeze(model)
    width = embed_dim(model)
    probed = CLIPWithHeads(model, linear_probe(width, layers), linear_probe(width, layers))
    return probed.to(model.logit_scale.device)
