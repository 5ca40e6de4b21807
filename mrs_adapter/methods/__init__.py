"""The parameter-efficient transfer methods benchmarked by the paper (Sec. IV, Tables II-IV).

Each method is one file exposing `apply(model, **options) -> model`: it freezes what the method
keeps frozen, composes its trainable modules into the CLIP model, and prints the trainable count.
`METHODS` maps the `--method` names of train.py / eval.py to those files.
"""
import importlib
from typing import Dict

from torch import nn

from ..adapter import print_trainable_parameters

METHODS = {
    "zero_shot": "zero_shot",
    "mrs_adapter": "mrs_adapter",
}


def apply_method(model: nn.Module, name: str, options: Dict = None, verbose: bool = True) -> nn.Module:
    """Compose method `name` into `model` (in place) with its `options`; returns the model."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    module = importlib.import_module(f"{__name__}.{METHODS[name]}")
    model = module.apply(model, **(options or {}))
    if verbose:
        print(f"method {name}: ", end="")
        print_trainable_parameters(model)
    return model
