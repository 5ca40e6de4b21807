"""LoRA (Hu et al., ICLR 2022) on attention's query and value projections (not in the paper).

Configuration: rank 4, alpha 8 (scale alpha / rank = 2), no dropout,
on q and v of every block's `in_proj` in both towers (LoRA's own choice of matrices);
k, out_proj and the MLP stay as they are.

    q = W_q x + b_q + (alpha / r) B_q A_q x,  likewise v

A: PyTorch's default Linear init, B: zero, so step 0 is exactly zero-shot CLIP.
Count on ViT-B/32: 12 x 2 x 2 x 4 x (512 + 768) = 245,760.
CLIP's `Attention` keeps q, k and v in one `in_proj_weight`, so the wrapper block computes the
attention itself from the frozen block's tensors (same steps as model.Attention),
adding the low-rank terms to the q and v thirds of the projection.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import freeze

RANK = 4
ALPHA = 8.0
TARGETS = ("q", "v")
PLACEMENT = "q and v thirds of in_proj, every block of both towers"
INIT = "A default, B zero (starts at zero-shot)"


class LoRA(nn.Module):
    """(B, L, D) -> (B, L, D): x -> (alpha / rank) * B(A(x)), B zero at first."""

    def __init__(self, width: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Linear(width, rank, bias=False)
        self.B = nn.Linear(rank, width, bias=False)
        self.scale = alpha / rank
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.B(self.A(x))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class LoRABlock(nn.Module):
    """(B, L, D) -> (B, L, D): a frozen CLIP block (`self.block`), low-rank updates to q and v.

        x = x + attention(ln_1(x))   with q, v from (W + delta W)
        x = x + mlp(ln_2(x))
    """

    def __init__(self, block: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.block = block
        width = block.attn.out_proj.in_features
        self.lora_q, self.lora_v = LoRA(width, rank, alpha), LoRA(width, rank, alpha)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D): model.Attention.forward with (W + delta W) for q and v.

        `attn.causal` keeps the text mask.
        """
        attn = self.block.attn
        B, L, D = x.shape
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D): frozen q, k, v
        delta_q, delta_v = self.lora_q(x), self.lora_v(x)
        qkv = qkv + torch.cat([delta_q, torch.zeros_like(delta_q), delta_v], dim=-1)  # k unchanged
        # (B, L, 3D) -> (3, B, H, L, D/H)
        qkv = qkv.view(B, L, 3, attn.heads, D // attn.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=attn.causal)
        x = x.transpose(1, 2).reshape(B, L, D)  # (B, H, L, D/H) -> (B, L, D)
        return attn.out_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block
        x = x + self.attention(block.ln_1(x))
        x = x + block.mlp(block.ln_2(x))
        return x


def apply(model: nn.Module, rank: int = RANK, alpha: float = ALPHA) -> nn.Module:
    """CLIP -> CLIP, frozen, with LoRA on q and v in every block of both towers."""
    freeze(model)
    for tower in (model.transformer, model.visual.transformer):
        for i, block in enumerate(tower.resblocks):
            tower.resblocks[i] = LoRABlock(block, rank, alpha)
    return model.to(model.logit_scale.device)
