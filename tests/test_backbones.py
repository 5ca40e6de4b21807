"""Remote-sensing CLIP backbones: formats, MLP activation, unequal tower depths (issue 11).

The parity oracle is open_clip with random weights: its `ViT-B-32` config runs nn.GELU, its
`ViT-B-32-quickgelu` config QuickGELU, and both use OpenAI's parameter names, as RemoteCLIP,
GeoRSCLIP and SkyCLIP checkpoints do."""
import zipfile

import open_clip
import pytest
import torch

from conftest import make_tiny_clip
from mrs_adapter import clip
from test_clip import random_tokens

FORMATS = {  # how the checkpoints in the wild hold the same tensors
    "plain": lambda sd: sd,  # RemoteCLIP, GeoRSCLIP
    "nested": lambda sd: {"epoch": 20, "name": "run", "state_dict": sd, "optimizer": {"param_groups": []}},
    "module": lambda sd: {"epoch": 20, "state_dict": {"module." + k: v for k, v in sd.items()}},  # SkyCLIP
}


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 224, 224, generator=g), random_tokens(2, 77, 49408, g)


def encode(model, inputs):
    images, tokens = inputs
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("config,activation,wrong", [("ViT-B-32", "gelu", "quickgelu"),
                                                     ("ViT-B-32-quickgelu", "quickgelu", "gelu")])
def test_parity_with_open_clip_in_every_format(config, activation, wrong, inputs, tmp_path):
    torch.manual_seed(0)
    reference = open_clip.create_model(config, pretrained=None).eval()
    want_img, want_txt = encode(reference, inputs)
    state = reference.state_dict()
    del reference
    for name, wrap in FORMATS.items():
        path = tmp_path / f"{name}.pt"
        torch.save(wrap(state), path)
        model, _ = clip.load(str(path), activation=activation)
        assert model.activation == activation and model.backbone["activation"] == activation
        img, txt = encode(model, inputs)
        img_err, txt_err = (img - want_img).abs().max().item(), (txt - want_txt).abs().max().item()
        print(f"{config} {name}: parity max abs error image {img_err:.3g}, text {txt_err:.3g}")
        assert img_err <= 1e-4 and txt_err <= 1e-4
        path.unlink()
    # negative control: the same tensors with the other activation load without error, and differ
    img, txt = encode(clip.build_model(state, wrong), inputs)
    img_gap, txt_gap = (img - want_img).abs().max().item(), (txt - want_txt).abs().max().item()
    print(f"{config} loaded with {wrong}: max abs difference image {img_gap:.3g}, text {txt_gap:.3g}")
    assert img_gap > 1e-2 and txt_gap > 1e-2
