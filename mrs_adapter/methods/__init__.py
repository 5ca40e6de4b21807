"""The PETL methods the paper benchmarks (Sec. IV, Tables II-IV; docs/method.md §7).

- Each method is one file exposing `apply(model, **options) -> model`:
  it freezes CLIP first, then composes its trainable modules in at build time
  (wrapper modules holding the frozen ones), and prints nothing.
- `METHODS` maps the `--method` names of train.py / eval.py to those files.
- A method's configuration is its module-level UPPERCASE constants (also the defaults of its
  `apply`); `method_config` returns them for tables, `default_lr` its Adam learning rate.
- `method_options` gives every keyword of `apply` with the value a run uses:
  train.py records it in config.json and best.pt, and eval.py passes it back whole,
  so a checkpoint rebuilds the model it was trained with even after a constant changes.
Every method trains through `model.encode_image/encode_text/encode_*_views`,
with the same loss and the same checkpoint format
(`save_trainable`: the tensors with requires_grad).
"""
import importlib
import inspect
from types import ModuleType
from typing import Dict, Optional

from torch import nn

from ..checkpoint import print_trainable_parameters

METHODS = {  # --method name -> file in this folder
    "zero_shot": "zero_shot",
    "full": "full",
    "linear_probe": "linear_probe",
    "coop": "coop",
    "vpt": "vpt",
    "vl_prompt": "vl_prompt",
    "adapter": "sequential_adapter",
    "clip_adapter": "clip_adapter",
    "convpass": "convpass",
    "adaptformer": "adaptformer",
    "cross_modal_adapter": "cross_modal_adapter",
    "uniadapter": "uniadapter",
    "mrs_adapter": "mrs_adapter",
    "houlsby": "houlsby",  # not in the paper: Houlsby's two adapters per block
    "lora": "lora",  # not in the paper
}
# the paper's Adam learning rate (docs/method.md §4), for every method that sets no LR
ADAPTER_LR = 2e-4


def freeze(model: nn.Module) -> nn.Module:
    """Model -> the same model, requires_grad=False on every parameter.

    CLIP's projections and logit_scale included.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def method_module(name: str) -> ModuleType:
    """--method name -> its file's module; a ValueError listing the names for an unknown one."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}")
    return importlib.import_module(f"{__name__}.{METHODS[name]}")


def default_lr(name: str) -> float:
    """Method name -> its file's `LR` if it defines one (e.g. `full`), else the paper's 2e-4."""
    return getattr(method_module(name), "LR", ADAPTER_LR)


def method_config(name: str) -> Dict:
    """Method name -> {constant name in lower case: value} of its file's configuration, and "lr"."""
    plain = (int, float, str, bool, tuple, type(None))
    config = {k.lower(): v for k, v in vars(method_module(name)).items()
              if k.isupper() and k != "LR" and isinstance(v, plain)}
    return {**config, "lr": default_lr(name)}


def method_options(name: str, overrides: Optional[Dict] = None) -> Dict:
    """(method name, overrides) -> {keyword: value} for every keyword of the method's `apply`.

    `overrides` where given, else the default (the file's constant).
    A key `apply` does not take is an error naming the method.
    """
    keywords = list(inspect.signature(method_module(name).apply).parameters.values())
    options = {k.name: k.default for k in keywords[1:]}  # keywords[0] is the model
    unknown = sorted(set(overrides or {}) - set(options))
    if unknown:
        raise ValueError(f"method {name} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(options) or 'none'}")
    return {**options, **(overrides or {})}


def freeze_unread(model: nn.Module, objective: str) -> nn.Module:
    """(model, objective) -> the model, what the objective never reads no longer trained.

    CLIP's temperature `logit_scale` (trainable under `full` only) is read by InfoNCE alone;
    HMMC compares embeddings.
    A trainable tensor without a gradient would also stop DistributedDataParallel at the second
    step (its remedy, find_unused_parameters, searches the autograd graph at every step).
    """
    if objective != "info_nce":
        model.logit_scale.requires_grad_(False)
    return model


def apply_method(model: nn.Module, name: str, options: Dict = None,
                 verbose: bool = True) -> nn.Module:
    """(CLIP, method name, options) -> the model to use from now on, the method composed in.

    Most methods change `model` in place and return it.
    `linear_probe` and `clip_adapter` return a wrapper holding it
    (their heads sit after CLIP's projections, see heads.py).
    """
    training = model.training
    model = method_module(name).apply(model, **(options or {}))
    # new modules start in train mode; give them the model's mode (dropout off in eval)
    model.train(training)
    if verbose:
        print(f"method {name}: ", end="")
        print_trainable_parameters(model)
    return model
