"""train.py checkpoint -> the model it was trained with: its backbone and its method.

A `best.pt` records:
- the CLIP it was trained on (name or absolute path, sha256, MLP activation);
- the method's whole configuration (every keyword of its `apply`).
So eval.py and search.py rebuild it from the record alone, never from today's defaults.
"""
import os
from typing import Dict, Optional, Tuple

from torch import nn

from .. import clip
from ..checkpoint import load_trainable_state_dict, read_checkpoint
from ..methods import apply_method, freeze_unread, method_options


def load_backbone(config: Dict, clip_path: Optional[str] = None,
                  activation: Optional[str] = None, sha256: Optional[str] = None,
                  where: str = "the checkpoint") -> Tuple[nn.Module, object]:
    """train.py's `config` -> (CLIP, preprocess): the backbone it records.

    - The record: config["backbone"], with clip, path, sha256, activation.
    - `clip_path` points at the weights when they moved.
    - Weights with another sha256 are an error unless `sha256` names that hash on purpose.
    """
    recorded = config.get("backbone") or {}
    from_record = activation is None and recorded.get("activation") is not None
    activation = activation or recorded.get("activation")
    want = recorded.get("sha256")
    if clip_path is None:
        given = recorded.get("clip") or config.get("clip") or "ViT-B/32"
        named = given in clip.available_models()
        clip_path = given if named else recorded.get("path") or os.path.abspath(given)
        if not named and not os.path.isfile(clip_path):
            raise FileNotFoundError(
                f"the CLIP weights {where} was trained on are not at {clip_path} "
                f"(given to train.py as {given!r}); it wants the file with sha256 "
                f"{want or '(not recorded)'}: pass --clip <where it is now>")
    model, preprocess = clip.load(clip_path, "cpu", activation=activation, sha256=sha256)
    if from_record:
        model.backbone["activation_from"] = f"recorded in {where}"
    got = model.backbone["sha256"]
    if want and got != want and sha256 is None:
        raise ValueError(f"{model.backbone['path']} has sha256 {got}, but {where} "
                         f"was trained on {recorded.get('path')} with sha256 {want}; pass the "
                         f"right file with --clip, or, to evaluate on this one on purpose, "
                         f"--clip-sha256 {got}")
    return model, preprocess


def train_config(ckpt, where: str = "the checkpoint") -> Dict:
    """Checkpoint -> the run config of a train.py checkpoint; a ValueError naming `where` otherwise.

    - Anything else: a CLIP state dict, another project's file.
    - Checked before any weights are loaded for it.
    """
    config = (ckpt.get("config") if isinstance(ckpt, dict) else None) or {}
    if not isinstance(ckpt, dict) or "trainable" not in ckpt or "method" not in config:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{where} is not a train.py checkpoint: expected 'trainable' and "
                         f"config['method'], found {found} and config keys {sorted(config)}")
    return config


def read_train_checkpoint(path: str) -> Tuple[Dict, Dict]:
    """path -> (checkpoint, its run config) of a train.py best.pt / last.pt; errors name `path`."""
    ckpt = read_checkpoint(path)
    return ckpt, train_config(ckpt, path)


def apply_checkpoint(model: nn.Module, ckpt: Dict, method: Optional[str] = None) -> nn.Module:
    """(model, ckpt) -> `model` with ckpt's method composed in and its trained tensors loaded.

    - The PETL method is the one named in ckpt["config"], composed into `model`
      (as train.py built it).
    - ckpt["trainable"] is loaded strictly: a missing, unexpected or mis-shaped tensor is an error.
    """
    config = train_config(ckpt)
    if method is not None and method != config["method"]:
        raise ValueError(f"--method {method} given, but the checkpoint was trained with "
                         f"{config['method']}")
    recorded, takes = config.get("method_options") or {}, method_options(config["method"])
    if set(recorded) != set(takes):  # today's defaults would silently stand in for what was trained
        raise ValueError(f"the checkpoint records options {sorted(recorded)} for method "
                         f"{config['method']}, whose apply takes {sorted(takes)}: written by "
                         f"another version of the code")
    model = apply_method(model, config["method"], recorded)  # recorded, not today's constants
    freeze_unread(model, config.get("objective", "hmmc"))  # the trained set, as train.py made it
    load_trainable_state_dict(model, ckpt["trainable"])
    return model
