"""Cross-Modal Adapter (Jiang et al., 2022): up channels shared by both towers (paper: 0.16M).

"Cross-Modal Adapter for Text-Video Retrieval".
As in the official code (LeapLabTHU/Cross-Modal-Adapter):
- each adapter's up projection is `cat([up_m(h), up_shared(h)])`, its last SHARED_DIM output
  channels computed by one layer that both towers use
  (`MetaLayersUpShareAdapterController.call_adapter` in modules/adapter_controller.py):
  the weight sharing MRS-Adapter inherits;
- every layer has two adapters, one on the attention output and one on the MLP output,
  each with its own skip connection (`ResidualAttentionBlock.forward` and
  `CLIP.encode_image/encode_text` in modules/module_clip_jointvt_upshare_adapter.py:
  adapter weights indexed 2l and 2l + 1):

    a = attn(ln_1(x));  x = x + a + A_attn(a)
    f = mlp(ln_2(x));   x = x + f + A_mlp(f)
    A_m(z) = cat([up_m(h), up_shared(h)]),  h = dropout(quick_gelu(down_m(z)))

- down and the unique up part belong to one tower, the shared up part (r -> SHARED_DIM)
  to the layer;
- activation QuickGELU (their train.py asserts `quick_gelu`), dropout 0 (their default);
- every weight truncated N(0, 0.01) and every bias zero (`CLIP.initialize_parameters`,
  std 0.01): the published init is not zero-output,
  so step 0 is close to, not exactly, zero-shot CLIP.
Configuration: their runs use bottleneck 8 with 16 shared channels (519,168 parameters here).
The paper's 0.16M leaves a bottleneck of 2 (3 would be 0.21M); we keep their 16 shared channels.
Count on ViT-B/32: 24 x (512 x 2 + 2 + 2 x 496 + 496 + 768 x 2 + 2 + 2 x 752 + 752
                         + 2 x 16 + 16) = 152,544 (paper: 0.16M).
"""
import torch
from torch import nn

from ..model import QuickGELU
from . import freeze

BOTTLENECK = 2
SHARED_DIM = 16  # last up channels of every adapter, one layer for both towers
DROPOUT = 0.0
INIT_STD = 0.01  # truncated normal std of every weight (biases zero)
PLACEMENT = ("sequential on the attention output and on the MLP output, every block; "
             "the last up channels shared by the two towers per layer and sublayer")
INIT = "weights truncated N(0, 0.01), biases zero (official; does not start exactly at zero-shot)"


class CrossModalAdapter(nn.Module):
    """(B, L, D_m), modality m -> (B, L, D_m): a down and an up per tower, part of the up shared.

    The first D_m - shared_dim output channels come from `{m}_up`,
    the last shared_dim from `shared_up`, the same tensor for text and vision.
    """

    def __init__(self, text_width: int, vision_width: int, bottleneck: int, shared_dim: int,
                 dropout: float, init_std: float):
        super().__init__()
        narrower = min(text_width, vision_width)
        if not 1 <= shared_dim < narrower:  # sharing is the method: at least one channel
            raise ValueError(f"cross_modal_adapter shared_dim must be in 1..{narrower - 1} "
                             f"(some up channels shared, some per tower), got {shared_dim}")
        self.text_down = nn.Linear(text_width, bottleneck)
        self.vision_down = nn.Linear(vision_width, bottleneck)
        self.text_up = nn.Linear(bottleneck, text_width - shared_dim)
        self.vision_up = nn.Linear(bottleneck, vision_width - shared_dim)
        self.shared_up = nn.Linear(bottleneck, shared_dim)
        self.act, self.dropout = QuickGELU(), nn.Dropout(dropout)
        layers = (self.text_down, self.vision_down, self.text_up, self.vision_up, self.shared_up)
        for layer in layers:
            # cut at +-2 (absolute), as the official init
            nn.init.trunc_normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor, modality: str) -> torch.Tensor:
        if modality == "text":
            down, up = self.text_down, self.text_up
        else:
            down, up = self.vision_down, self.vision_up
        h = self.dropout(self.act(down(z)))  # (B, L, r)
        return torch.cat([up(h), self.shared_up(h)], dim=-1)  # (B, L, D_m - s) + (B, L, s)


class CrossModalBlock(nn.Module):
    """(B, L, D_m) -> (B, L, D_m): a frozen block (`self.block`), an adapter after each sublayer."""

    def __init__(self, block: nn.Module, attn_adapter: CrossModalAdapter,
                 mlp_adapter: CrossModalAdapter, modality: str):
        super().__init__()
        self.block, self.modality = block, modality
        self.attn_adapter, self.mlp_adapter = attn_adapter, mlp_adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, m = self.block, self.modality
        a = block.attn(block.ln_1(x))
        x = x + a + self.attn_adapter(a, m)
        f = block.mlp(block.ln_2(x))
        x = x + f + self.mlp_adapter(f, m)
        return x

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, shared_dim: int = SHARED_DIM,
          dropout: float = DROPOUT, init_std: float = INIT_STD) -> nn.Module:
    """CLIP -> CLIP, frozen, with two cross-modal adapters in every block of both towers."""
    freeze(model)
    text, vision = model.transformer, model.visual.transformer
    if text.layers != vision.layers:  # the official code indexes the shared layers by text layer
        raise ValueError(f"cross_modal_adapter shares up channels layer by layer and needs "
                         f"towers of equal depth; this CLIP has {text.layers} text and "
                         f"{vision.layers} vision layers")
    for i in range(text.layers):
        attn, mlp = (CrossModalAdapter(text.width, vision.width, bottleneck, shared_dim, dropout,
                                       init_std) for _ in range(2))
        text.resblocks[i] = CrossModalBlock(text.resblocks[i], attn, mlp, "text")
        vision.resblocks[i] = CrossModalBlock(vision.resblocks[i], attn, mlp, "vision")
    return model.to(model.logit_scale.device)
