"""Counting, saving and strictly loading the trainable tensors of a PETL model (docs/method.md §4).

Written for any method (nothing MRS-specific).
- A checkpoint holds only the parameters with requires_grad, under their names in
  `model.named_parameters()`, plus plain Python extras (the run's config).
- Loading is strict: names and shapes must match exactly, or nothing is copied.
"""
import os
from typing import Dict, Tuple

import torch
from torch import nn

from .atomic import atomic_write


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """Model -> (trainable, total) parameter counts; a module shared by blocks counts once."""
    params = list(model.parameters())  # parameters() yields each shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """Model -> (trainable, total), printed on one line as peft prints it.

    `trainable params: N || all params: M || trainable%: P`
    """
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Model -> {name: CPU copy} of every parameter with requires_grad.

    A shared adapter is stored once, under the first name `named_parameters()` gives it.
    """
    params = model.named_parameters()
    return {n: p.detach().to("cpu", copy=True) for n, p in params if p.requires_grad}


def _names(names, limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_trainable_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """(model, {name: tensor}) -> None: copied into the model's trainable parameters, strictly.

    The names and shapes must equal those of `trainable_state_dict(model)`.
    Otherwise a ValueError lists the missing names, the unexpected names and the shape
    mismatches, and nothing is copied.
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
        raise ValueError("trainable state does not match the model's trainable parameters: "
                         + " | ".join(problems))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state_dict[n])


def save_trainable(model: nn.Module, path: str, **extra) -> None:
    """(model, path, **extra) -> None: `{"trainable": ..., **extra}` written atomically.

    "trainable" is `trainable_state_dict(model)`.
    The file is written under a temporary name in the same folder and renamed
    (atomic.atomic_write), so `path` is always either the previous file or the complete new one.
    Keep `extra` to plain Python values (dicts, lists, numbers, strings),
    so `load_trainable` reads it with weights_only.
    """
    if "trainable" in extra:
        raise ValueError("'trainable' is the key of the tensors; name the extra entry otherwise")
    state = {"trainable": trainable_state_dict(model), **extra}
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def read_checkpoint(path: str):
    """Path -> torch.load(path) of tensors and plain values only, with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding arbitrary objects
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise ValueError(f"{path} is not a readable checkpoint ({why})") from e


def load_trainable(model: nn.Module, path: str) -> dict:
    """(model, `save_trainable` file) -> its extra entries (the config); tensors loaded strictly."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "trainable" not in checkpoint:
        is_dict = isinstance(checkpoint, dict)
        found = sorted(checkpoint)[:10] if is_dict else type(checkpoint).__name__
        raise ValueError(f"{path} is not a save_trainable checkpoint "
                         f"(no 'trainable' entry; found {found})")
    load_trainable_state_dict(model, checkpoint["trainable"])
    return {k: v for k, v in checkpoint.items() if k != "trainable"}
