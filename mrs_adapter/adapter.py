"""MRS-Adapter: the multimodal remote sensing adapter (Yuan et al., TGRS 2023, Sec. III; method.md 2).

One bottleneck module, reused by every block of BOTH CLIP towers, adds
`A_m(x) = concat(up_m(h), up_shared(h))` with `h = dropout(relu(down_m(x)))` to the residual
stream, in parallel with the MLP: `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) + A_m(x)`.
CLIP is frozen first, then `AdaptedBlock`s wrapping the frozen blocks are composed in; the up
layers start at zero, so step 0 is zero-shot CLIP. Also here: parameter counting and strict
save/load of the trainable tensors only, written for any PETL method (nothing MRS-specific).
"""
import os
import tempfile
from typing import Dict, Optional, Tuple

import torch
from torch import nn

MODALITIES = ("text", "vision")


class MRSAdapter(nn.Module):
    """Per-modality down projections and up projections whose last `shared_dim` channels share weights.

    A width of None leaves that modality's branch out (used by the per-block ablation, so that no
    parameter sits unused and inflates the trainable count).
    """

    def __init__(self, text_width: Optional[int], vision_width: Optional[int], bottleneck: int = 64,
                 shared_dim: int = 64, dropout: float = 0.5):
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
        self.shared_up = nn.Linear(bottleneck, shared_dim)  # the cross-modal part of the up projection
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self):
        """Down: PyTorch's default Linear weights, zero bias. Up: all zero, so A_m(x) = 0 at step 0."""
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
            raise ValueError(f"modality {modality!r} is not one this adapter was built for: {built}")
        down, up = (self.text_down, self.text_up) if modality == "text" else (self.vision_down, self.vision_up)
        h = self.dropout(torch.relu(down(x)))  # (B, L, bottleneck)
        # The shared 64 channels are the LAST channels of the output, for both modalities.
        return torch.cat([up(h), self.shared_up(h)], dim=-1)  # (B, L, D_m - shared) ++ (B, L, shared)

    def extra_repr(self) -> str:
        return f"text_width={self.widths['text']}, vision_width={self.widths['vision']}, shared_dim={self.shared_dim}"


class AdaptedBlock(nn.Module):
    """A frozen CLIP `ResidualAttentionBlock` (`self.block`) with the adapter in parallel with its MLP.

    Holding the block renames its tensors in `model.state_dict()` (`transformer.resblocks.0.attn.*`
    becomes `transformer.resblocks.0.block.attn.*`); checkpoints written by `save_trainable` hold
    only the trainable tensors, so CLIP's names in the OpenAI archives are never affected.
    `block.attn` carries its own causal flag, so the text tower's causal mask passes through.
    """

    def __init__(self, block: nn.Module, adapter: MRSAdapter, modality: str):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.block, self.adapter, self.modality = block, adapter, modality

    accepts_query_index = True  # as CLIP's block: the last block may compute the pooled token only

    def forward(self, x: torch.Tensor, query_index: torch.Tensor = None) -> torch.Tensor:
        block = self.block
        # with query_index, x on the left is the residual stream of the pooled token only: (B, 1, D)
        x_out = x if query_index is None else x[torch.arange(x.shape[0], device=x.device), query_index][:, None]
        x = x_out + block.attn(block.ln_1(x), query_index)
        x = x + block.mlp(block.ln_2(x)) + self.adapter(x, self.modality)  # adapter reads the post-attention stream
        return x

    def extra_repr(self) -> str:
        frozen = not any(p.requires_grad for p in self.block.parameters())
        return f"modality={self.modality!r}, block_frozen={frozen}"


def add_adapters(model: nn.Module, bottleneck: int = 64, shared_dim: int = 64, dropout: float = 0.5,
                 shared: bool = True, verbose: bool = True) -> nn.Module:
    """Freeze every CLIP parameter, then wrap every block of both towers in an `AdaptedBlock`.

    shared=True (published, 161,088 parameters on ViT-B/32): ONE `MRSAdapter` instance serves all
    blocks of both towers. shared=False is an ablation (not in the paper's tables): each block gets
    its own adapter holding only its tower's branch, so nothing is shared across blocks or towers.
    Widths come from the model (`transformer.width`, `visual.transformer.width`).
    Modifies `model` in place and returns it.
    """
    # Freeze first: projections and logit_scale included (method.md 2), so nothing of CLIP trains.
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
                raise ValueError(f"{modality} block {i} already holds an adapter; add_adapters was called twice")
            tower.resblocks[i] = AdaptedBlock(block, adapter if shared else new_adapter(modality), modality)
    if verbose:
        print_trainable_parameters(model)
    return model


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; a module shared by several blocks counts once."""
    params = list(model.parameters())  # parameters() yields each shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{name: CPU copy} of every parameter with requires_grad (a shared adapter is stored once,
    under the first name `named_parameters()` gives it)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _names(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_trainable_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Copy `state_dict` into the model's trainable parameters, strictly.

    The names and shapes must equal those of `trainable_state_dict(model)`; otherwise a ValueError
    lists the missing names, the unexpected names and the shape mismatches, and nothing is copied.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = params.keys() - state_dict.keys()
    unexpected = state_dict.keys() - params.keys()
    mismatched = [f"{n}: checkpoint {tuple(state_dict[n].shape)} vs model {tuple(p.shape)}"
                  for n, p in params.items() if n in state_dict and state_dict[n].shape != p.shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} names: {_names(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} names: {_names(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: {'; '.join(sorted(mismatched))}")
        raise ValueError("trainable state does not match the model's trainable parameters: " + " | ".join(problems))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state_dict[n])


def save_trainable(model: nn.Module, path: str, **extra) -> None:
    """Write `{"trainable": trainable_state_dict(model), **extra}` atomically.

    The file is written under a temporary name in the same folder and renamed with `os.replace`,
    so `path` is always either the previous file or the complete new one. Keep `extra` to plain
    Python values (dicts, lists, numbers, strings) so `load_trainable` can read it with weights_only.
    """
    if "trainable" in extra:
        raise ValueError("'trainable' is the key of the tensors; name the extra entry otherwise")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"trainable": trainable_state_dict(model), **extra}, f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def read_checkpoint(path: str):
    """torch.load(path) of tensors and plain values only, with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding arbitrary objects
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from e


def load_trainable(model: nn.Module, path: str) -> dict:
    """Load a `save_trainable` file strictly into `model`; returns its extra entries (e.g. the config)."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "trainable" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a save_trainable checkpoint (no 'trainable' entry; found {found})")
    load_trainable_state_dict(model, checkpoint["trainable"])
    return {k: v for k, v in checkpoint.items() if k != "trainable"}
