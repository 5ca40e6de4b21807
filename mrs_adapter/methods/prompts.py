"""Learnable prompt tokens inside a frozen CLIP transformer, for CoOp, VPT and VL-Prompt.

CoOp: Zhou et al. 2022; VPT: Jia et al. 2022.
Prompts sit at positions 1..n, right after token 0 (the text start token, or the image [CLS]):
- block 0 inserts them;
- each deeper prompted block replaces the previous block's outputs there with its own;
- the last block removes them.
The towers' heads then see the original sequence:
the text head's `argmax` index and the image head's token 0 keep their meaning.
Prompts come before every caption token, so under the causal mask each caption token can read
them and still no token reads a later one.
Shared by coop.py, vpt.py and vl_prompt.py; not a method itself.
"""
from typing import Callable, Optional

import torch
from torch import nn


class PromptedBlock(nn.Module):
    """A frozen CLIP block (`self.block`) with prompt tokens at positions 1..n (n = length).

    - insert: `prompts` go in after token 0, (B, L, D) -> (B, L + n, D).
    - otherwise `prompts` (if any) replace positions 1..n (deep prompting: each layer its own),
      (B, L + n, D) -> (B, L + n, D).
    - remove: positions 1..n are dropped from the block's output, (B, L + n, D) -> (B, L, D).
    """

    def __init__(self, block: nn.Module, prompts: Optional[nn.Parameter], length: int, insert: bool,
                 remove: bool):
        super().__init__()
        if insert and prompts is None:
            raise ValueError("the block that inserts the prompts needs prompts")
        self.block, self.prompts, self.length = block, prompts, length
        self.insert, self.remove = insert, remove

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.length
        if self.prompts is not None:
            prompts = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, n, D)
            # the sequence after token 0, without old prompts
            rest = x[:, 1:] if self.insert else x[:, 1 + n:]
            x = torch.cat([x[:, :1], prompts, rest], dim=1)  # (B, 1 + n + L - 1, D)
        x = self.block(x)
        if self.remove:
            # (B, L, D): the original positions again
            x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"length={self.length}, insert={self.insert}, remove={self.remove}"


def add_prompts(transformer: nn.Module, length: int, depth: Optional[int],
                init: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """Transformer -> the same one, its first `depth` blocks (None: all) with `length` prompts each.

    depth 1 is shallow prompting (CoOp, VPT-shallow):
    the prompts enter at block 0 and travel through the blocks like any token.
    `init` fills each (length, width) prompt tensor in place.
    Also wraps the last block so that it removes the prompts.
    Modifies `transformer` in place.
    """
    blocks = transformer.resblocks
    depth = len(blocks) if depth is None else depth
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"prompt depth must be in 1..{len(blocks)} (or None for all), got {depth}")
    if any(isinstance(b, PromptedBlock) for b in blocks):
        raise ValueError("this transformer already holds prompts")
    device = next(transformer.parameters()).device
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        if i >= depth and not last:
            continue  # a plain block: the prompts pass through it as ordinary tokens
        prompts = None
        if i < depth:
            prompts = nn.Parameter(init(torch.empty(length, transformer.width, device=device)))
        blocks[i] = PromptedBlock(block, prompts, length, insert=i == 0, remove=last)
    return transformer
