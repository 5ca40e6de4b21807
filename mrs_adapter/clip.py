"""Loading CLIP: named weights, downloads, archives and state-dict files (docs/method.md §1).

The architecture is in model.py (as openai/CLIP keeps model.py apart from clip.py).
`load` returns the model with OpenAI's preprocessing, from
- OpenAI's TorchScript archives or a named remote-sensing CLIP (weights/backbones.py),
  verified by sha256 (weights/download.py);
- a local file: a TorchScript archive, a plain, nested or `module.`-prefixed state dict,
  or a zip holding one (SkyCLIP).
The MLP activation (QuickGELU or GELU) cannot be read off the tensors: named backbones carry
theirs, a file defaults to QuickGELU, and the model records which it got (`model.backbone`).
"""
import io
import os
import warnings
import zipfile
from typing import Callable, List, Tuple

import torch
from torchvision import transforms as T

from .model import ACTIVATIONS, CLIP, build_model, unwrap
from .weights.backbones import OPENAI_PUBLISHED, REMOTE_SENSING
from .weights.download import download, recorded_sha256, sha256_of

_URL = "https://openaipublic.azureedge.net/clip/models/{}/{}"
_MODELS = {  # name -> (sha256, which is also the URL's folder, file name)
    "ViT-B/32": ("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B/16": ("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L/14": ("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                       "ViT-L-14-336px.pt"),
}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def available_models() -> List[str]:
    """[name]: OpenAI's CLIPs, then the remote-sensing CLIPs of weights/backbones.py."""
    return list(_MODELS) + list(REMOTE_SENSING)


def model_url(name: str) -> str:
    """Backbone name -> the URL of its weights file."""
    if name in REMOTE_SENSING:
        return REMOTE_SENSING[name].url
    sha256, filename = _MODELS[name]
    return _URL.format(sha256, filename)


def published_mr(name: str) -> dict:
    """Backbone name -> {dataset: retrieval mR} published for it without further training."""
    if name in REMOTE_SENSING:
        return dict(REMOTE_SENSING[name].published)
    return dict(OPENAI_PUBLISHED.get(name, {}))


def _to_rgb(image):
    return image.convert("RGB")


def transform(n_px: int) -> Callable:
    """n_px -> PIL image to (3, n_px, n_px) tensor: OpenAI's preprocessing.

    Bicubic resize of the short side, center crop, RGB, normalise (MEAN, STD).
    """
    return T.Compose([
        T.Resize(n_px, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(n_px),
        _to_rgb,
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def _zip_kind(path: str):
    """Path -> ("torchscript" | "archive" | None, the archive's .pt members).

    torch.save files are zips too (holding data.pkl);
    a zip of checkpoints, as SkyCLIP ships, holds .pt/.pth files.
    """
    if not zipfile.is_zipfile(path):
        return None, []
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.endswith("/constants.pkl") for n in names):
        return "torchscript", []
    if any(n.endswith("data.pkl") for n in names):
        return None, []
    return "archive", [n for n in names if n.endswith((".pt", ".pth"))]


def _load_from_archive(path: str, members: List[str]):
    with zipfile.ZipFile(path) as z:
        return torch.load(io.BytesIO(z.read(members[0])), map_location="cpu", weights_only=True)


def read_state_dict(path: str) -> dict:
    """Weights file -> {name: tensor}.

    Reads an OpenAI TorchScript archive, a `torch.save`d plain, nested or `module.`-prefixed
    state dict, or a zip archive holding one such file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    kind, members = _zip_kind(path)
    if kind == "archive" and len(members) != 1:
        raise ValueError(f"{path} is a zip archive holding {len(members)} checkpoint files "
                         f"{members}; expected one: extract the one you want and pass it")
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is OpenAI's format
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(path, map_location="cpu").state_dict()
        if kind == "archive":
            state_dict = _load_from_archive(path, members)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is neither a TorchScript CLIP archive nor a readable state "
                         f"dict: {e}") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected a dict of tensors")
    return unwrap(state_dict)


def fetch_weights(name_or_path: str, download_root: str = None,
                  sha256: str = None) -> Tuple[str, str]:
    """Name or path -> (absolute path, sha256): a named backbone downloaded and verified, or a file.

    `sha256`: the hash the file must have (a user's pin).
    A named backbone's published hash applies without a pin; a pin contradicting it is an error.
    """
    if name_or_path in _MODELS or name_or_path in REMOTE_SENSING:
        entry = REMOTE_SENSING.get(name_or_path)
        pinned, filename = (entry.sha256, entry.filename) if entry else _MODELS[name_or_path]
        if sha256 and pinned and sha256 != pinned:
            raise ValueError(f"sha256 {sha256} given for {name_or_path}, whose published sha256 "
                             f"is {pinned}")
        path = download(model_url(name_or_path), pinned or sha256, download_root, filename)
        return os.path.abspath(path), pinned or sha256 or recorded_sha256(path)
    path = os.path.expanduser(name_or_path)
    if not os.path.isfile(path):
        raise ValueError(f"unknown CLIP model {name_or_path!r}: not a file, and not one of "
                         f"{available_models()}")
    actual = sha256_of(path)
    if sha256 and actual != sha256:
        raise ValueError(f"{os.path.abspath(path)} has sha256 {actual}, expected {sha256}")
    return os.path.abspath(path), actual


def known_as(sha256: str):
    """sha256 -> the name of the backbone whose published sha256 it is, or None."""
    pinned = {sha: name for name, (sha, _) in _MODELS.items()}
    pinned.update({b.sha256: name for name, b in REMOTE_SENSING.items() if b.sha256})
    return pinned.get(sha256)


def choose_activation(name_or_path: str, activation: str = None) -> Tuple[str, str]:
    """(name or path, activation or None) -> (activation, why).

    The caller's, else a named backbone's own, else QuickGELU for a file.
    """
    own = REMOTE_SENSING[name_or_path].activation if name_or_path in REMOTE_SENSING else (
        "quickgelu" if name_or_path in _MODELS else None)
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown CLIP MLP activation {activation!r}; "
                             f"expected one of {ACTIVATIONS}")
        if own is not None and activation != own:
            return activation, f"given, overriding {name_or_path}'s own {own}"
        return activation, "given"
    if own is not None:
        return own, f"{name_or_path}'s own"
    return "quickgelu", "the default for a weights file; --clip-activation gelu for a GELU CLIP"


def load(name_or_path: str, device="cpu", download_root: str = None, activation: str = None,
         sha256: str = None) -> Tuple[CLIP, Callable]:
    """Name or path -> (CLIP in eval mode, fp32, on `device`; its preprocessing transform).

    - `name_or_path`: one of `available_models()` (downloaded to `download_root`,
      else $MRS_ADAPTER_CACHE, else ~/.cache/clip), or a path to a TorchScript archive,
      a state dict or a zip holding one.
    - `activation`: "quickgelu" or "gelu" (default: see choose_activation).
    - `sha256`: the hash the file must have.
    `model.backbone` records what was loaded.
    """
    path, file_sha = fetch_weights(name_or_path, download_root, sha256)
    # a named backbone's file passed as a path is recognised by its published sha256
    name = name_or_path if name_or_path in available_models() else known_as(file_sha)
    activation, why = choose_activation(name or name_or_path, activation)
    state_dict = read_state_dict(path)
    try:
        model = build_model(state_dict, activation).to(device)
    except ValueError as e:  # the tensors do not make a ViT CLIP: say which file
        raise ValueError(f"CLIP weights {path}: {e}") from e
    model.backbone = {"clip": name_or_path, "name": name, "path": path, "sha256": file_sha,
                      "activation": activation, "activation_from": why}
    return model, transform(model.visual.input_resolution)


def describe(backbone: dict) -> str:
    """`model.backbone` -> one line saying which weights and which MLP activation a run uses."""
    named = backbone.get("name") and backbone["name"] != backbone["clip"]
    name = f" = {backbone['name']}" if named else ""
    return (f"CLIP {backbone['clip']}{name}: {backbone['path']} (sha256 {backbone['sha256']}), "
            f"MLP activation {backbone['activation']} ({backbone['activation_from']})")
