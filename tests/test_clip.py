"""CLIP against an independent implementation (open_clip), shapes read off state dicts, strict
errors."""
import copy

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image

from mrs_adapter import clip
from mrs_adapter.model import CLIP, QuickGELU, build_model

VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
                transformer_heads=8, transformer_layers=12)


@pytest.fixture
def assert_parity(random_token_ids):
    """assert_parity(reference, image_size, context, vocab, tol=1e-4) -> our CLIP built from the
    reference's state dict, after checking both encoders agree within tol."""
    def check(reference, image_size: int, context: int, vocab: int, tol: float = 1e-4):
        model = build_model(reference.state_dict())
        g = torch.Generator().manual_seed(1)
        images = torch.randn(3, 3, image_size, image_size, generator=g)
        tokens = random_token_ids(4, context, vocab, g)
        with torch.no_grad():
            img_err = (model.encode_image(images) - reference.encode_image(images)).abs().max()
            txt_err = (model.encode_text(tokens) - reference.encode_text(tokens)).abs().max()
        img_err, txt_err = img_err.item(), txt_err.item()
        print(f"parity max abs error: image {img_err:.3g}, text {txt_err:.3g}")
        assert img_err <= tol and txt_err <= tol
        return model
    return check


@pytest.fixture(scope="module")
def open_clip_b32():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()


def test_parity_with_open_clip_vit_b_32(open_clip_b32, assert_parity):
    model = assert_parity(open_clip_b32, 224, 77, 49408)
    assert model.visual.input_resolution == 224 and model.context_length == 77


def test_parity_with_open_clip_non_standard_shape(assert_parity):
    torch.manual_seed(0)
    # other width, depth, patch size, image size, context length, vocabulary and embed dim
    reference = open_clip.model.CLIP(
        embed_dim=96,
        vision_cfg=CLIPVisionCfg(layers=3, width=192, head_width=64, patch_size=12, image_size=60),
        text_cfg=CLIPTextCfg(context_length=21, vocab_size=1000, width=128, heads=2, layers=2),
        quick_gelu=True).eval()
    # open_clip zero-initialises some tensors; make every one matter
    for p in reference.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    model = assert_parity(reference, 60, 21, 1000)
    assert (model.visual.input_resolution, model.context_length, model.vocab_size) == (60, 21, 1000)
    assert model.visual.transformer.resblocks[0].attn.heads == 3


def test_vit_b_32_parameter_count():
    assert sum(p.numel() for p in CLIP(**VIT_B_32).parameters()) == 151_277_313


def test_build_model_drops_archive_extras_and_returns_fp32_eval(tiny_clip):
    state = {k: v.half() for k, v in tiny_clip.state_dict().items()}
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    model = build_model(state)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())


def test_build_model_names_missing_and_unexpected_keys(tiny_clip):
    state = tiny_clip.state_dict()
    truncated = {k: v for k, v in state.items() if not k.startswith("transformer.resblocks.1.mlp")}
    truncated.pop("visual.ln_post.bias")
    missing = r"transformer\.resblocks\.1\.mlp\.c_fc\.weight.*|visual\.ln_post\.bias"
    with pytest.raises(ValueError, match=missing):
        build_model(truncated)
    with pytest.raises(ValueError, match="unexpected keys.*visual.extra"):
        build_model({**state, "visual.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing keys.*visual.conv1.weight"):
        build_model({"weight": torch.zeros(3), "bias": torch.zeros(3)})
    resnet = {"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
              "visual.layer1.0.conv1.weight": torch.zeros(1),
              "visual.attnpool.positional_embedding": torch.zeros(50, 2048)}
    with pytest.raises(ValueError, match="ResNet CLIP"):
        build_model({**{k: v for k, v in state.items() if not k.startswith("visual.")}, **resnet})


def test_text_pools_the_end_token_and_is_causal(tiny_clip):
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    with torch.no_grad():
        base = tiny_clip.encode_text(tokens)
        later = tokens.clone()
        later[0, 10] = 500  # after the end token: causal attention keeps it from the pooled token
        assert torch.equal(tiny_clip.encode_text(later), base)
        earlier = tokens.clone()
        earlier[0, 1] = 500
        assert not torch.allclose(tiny_clip.encode_text(earlier), base)


def test_torchscript_archive_loads_like_the_state_dict(tiny_clip, as_torchscript_archive, tmp_path):
    as_torchscript_archive(tiny_clip.state_dict(), tmp_path / "ViT-tiny.pt")
    torch.save({k: v.half() for k, v in tiny_clip.state_dict().items()}, tmp_path / "plain.pt")
    from_archive, preprocess = clip.load(str(tmp_path / "ViT-tiny.pt"))
    from_plain, _ = clip.load(str(tmp_path / "plain.pt"))
    archive = clip.read_state_dict(str(tmp_path / "ViT-tiny.pt"))
    assert set(archive) >= {"input_resolution", "visual.proj"}
    plain = from_plain.state_dict().items()
    for (name, a), (_, b) in zip(from_archive.state_dict().items(), plain):
        assert torch.equal(a, b), name
    images, tokens = torch.randn(2, 3, 32, 32), torch.tensor([[49406, 320, 49407] + [0] * 74] * 2)
    with torch.no_grad():
        assert torch.equal(from_archive.encode_image(images), from_plain.encode_image(images))
        assert torch.equal(from_archive.encode_text(tokens), from_plain.encode_text(tokens))
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_load_rejects_unknown_names_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"ViT-B/32.*ViT-L/14@336px"):
        clip.load("ViT-H/99")
    truncated = tmp_path / "truncated.pt"
    torch.save({"visual.conv1.weight": torch.zeros(64, 3, 8, 8)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.pt"):
        clip.load(str(truncated))
    assert clip.available_models()[:4] == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]


@pytest.mark.parametrize("size,mode", [((300, 200), "RGB"), ((224, 224), "L"), ((500, 333), "RGBA"),
                                       ((100, 50), "RGB"), ((256, 256), "P")])
def test_preprocess_matches_open_clip(size, mode):
    rng = np.random.default_rng(sum(size))
    array = rng.integers(0, 256, size=(size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(array, "RGBA").convert(mode)
    ours = clip.transform(224)(image)
    reference = open_clip.image_transform(224, is_train=False)(image)
    assert ours.shape == (3, 224, 224) and torch.equal(ours, reference)


def test_feature_views_equal_plain_encoders_without_dropout(tiny_clip):
    model = copy.deepcopy(tiny_clip)
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73] * 3)
    with torch.no_grad():
        clean, dropped = model.encode_image_views(images, 0.2)  # eval mode: dropout is off
        assert torch.allclose(clean, model.encode_image(images), atol=1e-5)
        assert torch.allclose(clean, dropped, atol=1e-5)
        clean, dropped = model.encode_text_views(tokens, 0.2)
        assert torch.allclose(clean, model.encode_text(tokens), atol=1e-5)
        assert torch.allclose(clean, dropped, atol=1e-5)


def test_quick_gelu_gradient():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(QuickGELU(), (x,))
    assert torch.equal(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
