"""MRS-Adapter: the multimodal remote sensing adapter (Sec. III-B; docs/method.md §2).

Yuan et al., TGRS 2023. One bottleneck module, reused by every block of BOTH CLIP towers,
is added to the residual stream in parallel with the MLP:

    h = dropout(relu(down_m(x))),  A_m(x) = concat(up_m(h), up_shared(h))
    x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) + A_m(x)

CLIP is frozen first, then `AdaptedBlock`s wrapping the frozen blocks are composed in.
The up layers start at zero, so step 0 is zero-shot CLIP.
Saving and loading the trainable tensors is checkpoint.py's.
Imports only torch and the standard library, so this file can be copied into another project
on its own.
"""
from typing import Optional

import torch
from torch import nn

MODALITIES = ("text", "vision")


class MRSAdapter(nn.Module):
    """(B, L, D_m), modality m -> (B, L, D_m): a down and an up projection per modality.

    The up projections' last `shared_dim` channels come from one layer shared by the modalities.
    A width of None leaves that modality's branch out: the per-block ablation uses it,
    so that no parameter sits unused and inflates the trainable count.
    """

    def __init__(self, text_width: Optional[int], vision_width: Optional[int],
                 bottleneck: int = 64, shared_dim: int = 64, dropout: float = 0.5):
        super().__init__()
        widths = {"text": text_width, "vision": vision_width}
        for modality, width in widths.items():
            if width is not None and width <= shared_dim:
                raise ValueError(f"{modality} width {width} must exceed shared_dim {shared_dim}")
        if all(w is None for w in widths.values()):
            raise ValueError("MRSAdapter needs at least one of text_width, vision_width")
        self.widths, self.bottleneck, self.shared_dim = widths, bottleneck, shared_dim
        # Attribute names are the checkpoint names: text_down.weight, shared_up.bias, ...
        self.text_down = nn.Linear(text_width, bottleneck) if text_width else None
        self.vision_down = nn.Linear(vision_width, bottleneck) if vision_width else None
        self.text_up = nn.Linear(bottleneck, text_width - shared_dim) if text_width else None
        self.vision_up = nn.Linear(bottleneck, vision_width - shared_dim) if vision_width else None
        self.shared_up = nn.Linear(bottleneck, shared_dim)  # the cross-modal part of the up layer
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self):
        """Down: PyTorch's default Linear weights, zero bias. Up: all zero.

        So A_m(x) = 0 at step 0: the adapted model starts as zero-shot CLIP.
        """
        for down in (self.text_down, self.vision_down):
            if down is not None:
                down.reset_parameters()
                nn.init.zeros_(down.bias)
        for up in (self.text_up, self.vision_up, self.shared_up):
            if up is not None:
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, L, D_m) -> (B, L, D_m) for modality m in ("text", "vision")."""
        if self.widths.get(modality) is None:
            built = [m for m, w in self.widths.items() if w is not None]
            raise ValueError(f"modality {modality!r} is not one this adapter was built for: "
                             f"{built}")
        text = modality == "text"
        down, up = (self.text_down, self.text_up) if text else (self.vision_down, self.vision_up)
        h = self.dropout(torch.relu(down(x)))  # (B, L, bottleneck)
        # The shared 64 channels are the LAST channels of the output, for both modalities:
        # (B, L, D_m - shared) ++ (B, L, shared)
        return torch.cat([up(h), self.shared_up(h)], dim=-1)

    def extra_repr(self) -> str:
        w = self.widths
        return f"text_width={w['text']}, vision_width={w['vision']}, shared_dim={self.shared_dim}"


class AdaptedBlock(nn.Module):
    """(B, L, D_m) -> (B, L, D_m): a frozen pre-LN block (`self.block`), the adapter beside its MLP.

    The paper's two residual equations (docs/method.md §2):

        x = x + attn(ln_1(x))
        x = x + mlp(ln_2(x)) + A_m(x)        the adapter reads the stream after attention

    - The wrapped block provides `ln_1`, `attn`, `ln_2`, `mlp` (CLIP's `ResidualAttentionBlock`).
    - `block.attn` carries its own causal flag, so the text tower's causal mask passes through.
    - Holding the block renames its tensors in `model.state_dict()`:
      `transformer.resblocks.0.attn.*` becomes `transformer.resblocks.0.block.attn.*`.
      Checkpoints (checkpoint.py) hold only the trainable tensors,
      so CLIP's names in the OpenAI archives are never affected.
    """

    # block.attn(block.ln_1(x)) reads the input as it came,
    # and every other step acts on each token alone,
    # so a host may run this block on the one token its head reads
    # (model.py's Transformer.pooled, a speed-only option).
    per_token_but_attention = True

    def __init__(self, block: nn.Module, adapter: MRSAdapter, modality: str):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.block, self.adapter, self.modality = block, adapter, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D_m) -> (B, L, D_m): the two residual equations above."""
        block = self.block
        x = x + block.attn(block.ln_1(x))
        return x + block.mlp(block.ln_2(x)) + self.adapter(x, self.modality)

    def extra_repr(self) -> str:
        frozen = not any(p.requires_grad for p in self.block.parameters())
        return f"modality={self.modality!r}, block_frozen={frozen}"


def add_adapters(model: nn.Module, bottleneck: int = 64, shared_dim: int = 64,
                 dropout: float = 0.5, shared: bool = True, verbose: bool = True) -> nn.Module:
    """CLIP -> the same CLIP, every parameter frozen, then every block wrapped in an `AdaptedBlock`.

    - shared=True (published; 161,088 parameters on ViT-B/32):
      ONE `MRSAdapter` instance serves all blocks of both towers.
    - shared=False, an ablation (not in the paper's tables): each block gets its own adapter
      holding only its tower's branch, so nothing is shared across blocks or towers.
    Widths come from the model (`transformer.width`, `visual.transformer.width`).
    Modifies `model` in place and returns it.
    """
    # Freeze first: projections and logit_scale included (docs/method.md §2): no CLIP tensor trains.
    for p in model.parameters():
        p.requires_grad_(False)
    towers = {"text": model.transformer, "vision": model.visual.transformer}
    widths = {m: tower.width for m, tower in towers.items()}
    reference = next(model.parameters())

    def new_adapter(only: Optional[str] = None) -> MRSAdapter:
        w = {m: (widths[m] if only in (None, m) else None) for m in MODALITIES}
        adapter = MRSAdapter(w["text"], w["vision"], bottleneck, shared_dim, dropout)
        return adapter.to(device=reference.device, dtype=reference.dtype)

    adapter = new_adapter() if shared else None
    for modality, tower in towers.items():
        for i, block in enumerate(tower.resblocks):
            if isinstance(block, AdaptedBlock):
                raise ValueError(f"{modality} block {i} already holds an adapter; "
                                 f"add_adapters was called twice")
            own = adapter if shared else new_adapter(modality)
            tower.resblocks[i] = AdaptedBlock(block, own, modality)
    if verbose:  # the line of checkpoint.print_trainable_parameters; this file stands alone
        params = list(model.parameters())  # each shared tensor once
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return model
