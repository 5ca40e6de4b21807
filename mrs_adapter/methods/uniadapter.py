"""UniAdapter (Lu et al., ICLR 2024): one adapter a layer for both towers (paper: 0.55M).

Its LayerNorm and down projection are unified across the modalities.
As in the official code (RERV/UniAdapter):
- one module per layer serves block l of BOTH encoders
  (`blip_retrieval.BLIP_Retrieval.__init__` hands the same `adapters[l]` to the ViT and to BERT);
- it normalises its input with its own LayerNorm, shares LayerNorm and down projection across
  modalities, keeps an up projection per modality, and scales its output by 0.1
  (`UniAdapter.forward` in models/adapter.py, `adapter_layernorm_option="in"`,
  `adapter_scalar=0.1`):

    A_m(x) = 0.1 * up_m(dropout(relu(down(LN(x)))))

- it reads the residual stream after attention and is added beside the FFN
  (`Block.forward` in models/vit.py, `BertLayer.forward` in models/med.py):

    x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) + A_m(x)

- dropout 0 (their default);
- init (`UniAdapter.init_adapter_weights`, called by train_retrieval.py):
  down PyTorch's default with zero bias, text up zero.
  Their script leaves the visual up at BERT's N(0, 0.02) (init_adapter_weights resets only
  the text up); we zero both ups, the rule their init states, so step 0 is exactly zero-shot CLIP.
Unequal widths: BLIP's towers are both 768 wide; CLIP's are 512 (text) and 768 (vision).
- The shared LayerNorm affine and down projection are built at the wider width, and the narrower
  tower reads their leading channels (the same function as zero-padding its normalised input),
  so every tensor UniAdapter shares stays one tensor.
- LayerNorm statistics use each tower's own width.
- The towers' channels correspond in no way, so no mapping of one into the other is more natural.
Left out: the multimodal up branch and cross-attention query-residual adapter act on BLIP's
fusion encoder, which a dual encoder like CLIP does not have.
Configuration: their runs use bottleneck 512; the paper's 0.55M leaves 21.
Count on ViT-B/32: 12 x (2 x 768 + 768 x 21 + 21 + 21 x 512 + 512 + 21 x 768 + 768) = 550,140
(paper: 0.55M).
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import freeze

BOTTLENECK = 21
SCALE = 0.1  # UniAdapter's fixed output scale
DROPOUT = 0.0
PLACEMENT = ("parallel to the MLP, reading the post-attention stream through its own LayerNorm, "
             "every block; one module per layer for both towers")
INIT = "LayerNorm 1/0, down default, ups zero (starts at zero-shot)"


class UniAdapter(nn.Module):
    """(B, L, D_m), modality -> (B, L, D_m): LayerNorm and down shared by both towers, an up each.

    The shared tensors are max(D_text, D_vision) wide;
    a narrower tower reads their first D_m channels.
    """

    def __init__(self, text_width: int, vision_width: int, bottleneck: int, scale: float,
                 dropout: float):
        super().__init__()
        width = max(text_width, vision_width)
        self.norm = nn.LayerNorm(width)  # unified across modalities, like the down projection
        self.down = nn.Linear(width, bottleneck)
        self.text_up = nn.Linear(bottleneck, text_width)
        self.vision_up = nn.Linear(bottleneck, vision_width)
        self.scale, self.dropout = scale, nn.Dropout(dropout)
        nn.init.zeros_(self.down.bias)
        for up in (self.text_up, self.vision_up):
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        D = x.shape[-1]
        norm, down = self.norm, self.down
        h = F.layer_norm(x, (D,), norm.weight[:D], norm.bias[:D], norm.eps)  # statistics over D_m
        h = self.dropout(torch.relu(F.linear(h, down.weight[:, :D], down.bias)))  # (B, L, r)
        up = self.text_up if modality == "text" else self.vision_up
        return self.scale * up(h)  # (B, L, D_m)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class UniAdapterBlock(nn.Module):
    """(B, L, D_m) -> (B, L, D_m): a frozen block (`self.block`) with the adapter beside its MLP.

    The layer's UniAdapter, the same one that serves this layer's block in the other tower.
    """

    def __init__(self, block: nn.Module, adapter: UniAdapter, modality: str):
        super().__init__()
        self.block, self.adapter, self.modality = block, adapter, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        x = x + block.attn(block.ln_1(x))
        x = x + block.mlp(block.ln_2(x)) + self.adapter(x, self.modality)
        return x

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}"


def apply(model: nn.Module, bottleneck: int = BOTTLENECK, scale: float = SCALE,
          dropout: float = DROPOUT) -> nn.Module:
    """CLIP -> CLIP, frozen, with one UniAdapter per layer serving both towers."""
    freeze(model)
    text, vision = model.transformer, model.visual.transformer
    if text.layers != vision.layers:  # one adapter per layer serves both encoders
        raise ValueError(f"uniadapter shares one adapter per layer between the towers and needs "
                         f"towers of equal depth; this CLIP has {text.layers} text and "
                         f"{vision.layers} vision layers")
    for i in range(text.layers):
        adapter = UniAdapter(text.width, vision.width, bottleneck, scale, dropout)
        text.resblocks[i] = UniAdapterBlock(text.resblocks[i], adapter, "text")
        vision.resblocks[i] = UniAdapterBlock(vision.resblocks[i], adapter, "vision")
    return model.to(model.logit_scale.device)
