"""The PETL methods of the paper's benchmark (docs/method.md §7), composed into CLIP by
mrs_adapter.methods.

Trainable counts on ViT-B/32 shapes (built on the meta device: shapes without memory, so one
deep copy per method is instant); everything else on tiny CLIPs (the make_tiny_clip fixture).
"""
import copy
import math

import pytest
import torch

from mrs_adapter.checkpoint import count_parameters, load_trainable, save_trainable
from mrs_adapter.loss import hmmc_loss
from mrs_adapter.methods import (
    ADAPTER_LR,
    METHODS,
    apply_method,
    default_lr,
    method_config,
    method_module,
)
from mrs_adapter.methods.convpass import Convpass
from mrs_adapter.methods.lora import LoRABlock
from mrs_adapter.methods.prompts import PromptedBlock, add_prompts
from mrs_adapter.model import CLIP
from mrs_adapter.paper import published_params

SOT, EOT = 49406, 49407
# name: our trainable count on ViT-B/32, exactly (the paper's, as it prints them: paper.BENCHMARK)
COUNTS = {
    "zero_shot": 0,
    "full": 151_277_313,
    "linear_probe": 1_050_624,
    "coop": 98_304,
    "vpt": 460_800,
    "vl_prompt": 468_992,
    "adapter": 169_080,
    "clip_adapter": 524_288,
    "convpass": 140_736,
    "adaptformer": 169_080,
    "cross_modal_adapter": 152_544,
    "uniadapter": 550_140,
    "mrs_adapter": 161_088,
    "houlsby": 153_696,  # not in the paper
    "lora": 245_760,  # not in the paper
}
# Where our count, printed as the paper prints counts, is not the paper's: no bottleneck and
# shared width of the official Cross-Modal Adapter reaches 0.16M (see the test below).
PRINTED_OTHERWISE = {"cross_modal_adapter": "0.15M"}
# Methods whose design cannot start at zero-shot CLIP: extra tokens change attention (prompts);
# CLIP-Adapter's final ReLU would never train from a zero up layer.
NOT_AT_ZERO_SHOT = {"coop", "vpt", "vl_prompt", "clip_adapter"}
# Methods whose published init draws every weight from a small normal (Houlsby: std 1e-3;
# Cross-Modal Adapter: 0.01): near zero-shot CLIP, within this tolerance, but not at it.
NEAR_ZERO_SHOT = {"houlsby": 1e-3, "cross_modal_adapter": 1e-2}
TEXT_ONLY, VISION_ONLY = {"coop"}, {"vpt"}
ADDS_MODULES = sorted(set(METHODS) - {"zero_shot", "full"})
TOUCHES_TEXT = sorted(set(ADDS_MODULES) - VISION_ONLY)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread: OpenMP's overhead outweighs ~1 ms matrix products,
    many times over on a busy machine. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def meta_vit_b32():
    """CLIP with ViT-B/32 shapes on the meta device (no memory, no values: for counting only)."""
    with torch.device("meta"):
        return CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                    vision_patch_size=32, context_length=77, vocab_size=49408,
                    transformer_width=512, transformer_heads=8, transformer_layers=12)


@pytest.fixture(scope="module")
def tiny(make_tiny_clip):
    """Tiny CLIP (text 96 wide, vision 128, 2 layers each); tests deep-copy it and never change
    it."""
    return make_tiny_clip(0)


def with_method(tiny, name, seed=0):
    """(a deep copy of `tiny` with method `name` composed in, ids of the copy's original CLIP
    tensors)."""
    model = copy.deepcopy(tiny)
    original = {id(p) for p in model.parameters()}
    torch.manual_seed(seed)
    return apply_method(model, name, verbose=False), original


def randomize_new(model, original, seed=1, std=0.1):
    """Random values in every tensor the method added, so that its modules change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in original:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def tokens(B, eot_at, seed=0):
    """(B, 77) ids: start token, random words, end-of-text (the largest id) at `eot_at`, zero
    padding."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(B, 77, dtype=torch.long)
    t[:, 0], t[:, eot_at] = SOT, EOT
    t[:, 1:eot_at] = torch.randint(1, SOT, (B, eot_at - 1), generator=g)
    return t


def images(B, seed=0):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def encode(model, img, txt):
    return model.encode_image(img), model.encode_text(txt)


# ---- registry ----

def test_every_method_is_registered_and_configured():
    assert set(METHODS) == set(COUNTS)
    for name in METHODS:
        config = method_config(name)
        assert config["lr"] == default_lr(name)
        assert all(isinstance(k, str) and k == k.lower() for k in config)
    adaptformer = method_module("adaptformer")
    assert method_config("adaptformer") == {"bottleneck": 5, "scale": 0.1, "dropout": 0.1,
                                            "lr": ADAPTER_LR, "placement": adaptformer.PLACEMENT,
                                            "init": adaptformer.INIT}
    assert method_config("vpt")["length"] == 50 and method_config("coop")["length"] == 16
    assert {k: method_config("adapter")[k] for k in ("bottleneck", "scale", "dropout")} == {
        "bottleneck": 5, "scale": 0.1, "dropout": 0.1}
    assert method_config("convpass")["xavier_init"] is True


def test_default_lr_is_the_papers_except_where_a_method_sets_its_own():
    assert ADAPTER_LR == 2e-4
    assert all(default_lr(n) == 2e-4 for n in METHODS if n != "full")
    assert default_lr("full") == method_module("full").LR < 2e-4


def test_apply_method_prints_the_count_and_rejects_unknown_names(tiny, capsys):
    model = apply_method(copy.deepcopy(tiny), "adaptformer", verbose=True)
    trainable, total = count_parameters(model)
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        apply_method(copy.deepcopy(tiny), "nope")


# ---- ViT-B/32 counts: the paper's budget, and nothing of CLIP trainable ----

def as_printed(count: int) -> str:
    """A count as the paper's tables print it: 0, 0.16M, 1.05M, 151M."""
    return "0" if count == 0 else f"{count / 1e6:.0f}M" if count >= 10**7 else f"{count / 1e6:.2f}M"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trainable_count_on_vit_b32_matches_the_paper_and_clip_stays_frozen(name, meta_vit_b32):
    model = copy.deepcopy(meta_vit_b32)
    original = {id(p) for p in model.parameters()}
    model = apply_method(model, name, verbose=False)
    trainable, total = count_parameters(model)
    assert trainable == COUNTS[name]
    paper = published_params(name)
    if paper is not None:
        assert as_printed(trainable) == PRINTED_OTHERWISE.get(name, paper), (
            f"{name}: {trainable:,d} vs the paper's {paper}")
    else:
        assert name not in PRINTED_OTHERWISE
    added = []
    for n, p in model.named_parameters():
        if id(p) in original:
            assert p.requires_grad == (name == "full"), n
        else:
            assert p.requires_grad, n
            added.append(n)
    assert bool(added) == (name in ADDS_MODULES)
    # the frozen rest is CLIP ViT-B/32 (docs/method.md §1)
    assert total - trainable == (0 if name == "full" else 151_277_313)


def test_no_cross_modal_adapter_configuration_prints_the_papers_016m(meta_vit_b32):
    """Its count is 24 adapters x (r (2 (D_t + D_v) + 2 - s) + D_t + D_v - s) for bottleneck r and
    s shared channels (checked against two builds): r = 2 gives at most 0.15M (s = 1), r = 3 at
    least 0.17M (s = 511, the most below the text width), so the paper's 0.16M has no
    configuration and ours prints 0.15M."""
    def count(r, s):
        return 24 * (r * (2 * (512 + 768) + 2 - s) + 512 + 768 - s)

    for r, s in ((2, 16), (3, 511)):
        model = apply_method(copy.deepcopy(meta_vit_b32), "cross_modal_adapter",
                             {"bottleneck": r, "shared_dim": s}, verbose=False)
        assert count_parameters(model)[0] == count(r, s)
    printed = {as_printed(count(r, s)) for r in range(1, 6) for s in range(1, 512)}
    assert "0.16M" not in printed and {"0.15M", "0.17M"} <= printed
    assert published_params("cross_modal_adapter") == "0.16M"


# ---- behaviour on tiny models ----

@pytest.mark.parametrize("name", sorted(METHODS))
def test_apply_is_silent_and_starts_at_zero_shot_where_the_design_allows(name, tiny, capsys):
    model = method_module(name).apply(copy.deepcopy(tiny))
    assert capsys.readouterr().out == ""
    img, txt = images(3), tokens(3, 9)
    ours, plain = encode(model, img, txt), encode(tiny, img, txt)
    # Plain CLIP's last block computes only the pooled token (model.Transformer.pooled); a wrapper
    # block without that shortcut computes every token, so equal means equal up to summation order.
    same = [torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(ours, plain)]
    if name in NOT_AT_ZERO_SHOT:
        assert not all(same), f"{name} is listed as not starting at zero-shot but does"
    elif name in NEAR_ZERO_SHOT:
        atol = NEAR_ZERO_SHOT[name]
        assert all(torch.allclose(a, b, rtol=0, atol=atol) for a, b in zip(ours, plain))
    else:
        assert all(same), f"{name} should start exactly at zero-shot CLIP"


@pytest.mark.parametrize("name", ADDS_MODULES)
def test_method_changes_the_towers_it_adapts_and_only_those(name, tiny):
    model, original = with_method(tiny, name)
    randomize_new(model, original)
    img, txt = images(3), tokens(3, 9)
    (v, t), (v0, t0) = encode(model, img, txt), encode(tiny, img, txt)
    assert torch.equal(v, v0) == (name in TEXT_ONLY)
    assert torch.equal(t, t0) == (name in VISION_ONLY)


@pytest.mark.parametrize("name", TOUCHES_TEXT)
def test_causal_mask_holds_through_the_method(name, tiny):
    """With the end-of-text token at 6, changing tokens after it leaves the pooled text embedding
    unchanged; changing one before it does not (so the test can fail).

    The three captions are rows of one batch, and GEMM kernels may block rows by position, so equal
    rows can differ in the last bits (~1e-7): the check uses a tolerance far below a leak
    (~1e-1)."""
    model, original = with_method(tiny, name)
    randomize_new(model, original)
    eot = 6
    txt = tokens(1, eot).repeat(3, 1)
    # after EOT: right after it (a width-3 conv's reach) and later
    txt[1, eot + 1], txt[1, eot + 4] = 1234, 4321
    txt[2, 3] = 1234 if txt[2, 3] != 1234 else 4321  # before EOT
    with torch.no_grad():
        t = model.encode_text(txt)
    leak, control = (t[0] - t[1]).abs().max().item(), (t[0] - t[2]).abs().max().item()
    assert leak < 1e-5, (
        f"a token after the end-of-text token reached its embedding (moved it by {leak:.2e})")
    assert control > 1e-3, (
        f"a token before the end-of-text token moved the embedding by only {control:.2e}")


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if n != "zero_shot"])
def test_adam_steps_on_hmmc_change_the_methods_tensors_and_nothing_else(name, tiny):
    model, original = with_method(tiny, name)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    img, txt = images(4, seed=2), tokens(4, 9, seed=2)
    pushed = set()  # trainable tensors that received a non-zero gradient
    # two steps: zero-initialised up layers give their down layers a gradient from step 2
    for _ in range(2):
        v, v_aug = model.encode_image_views(img, 0.2)
        t, t_aug = model.encode_text_views(txt, 0.2)
        loss = hmmc_loss(v, t, v_aug, t_aug)
        assert loss.item() > 0
        optimizer.zero_grad()
        loss.backward()
        pushed |= {n for n, p in model.named_parameters()
                   if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and torch.equal(p, before[n]), f"frozen {n} changed"
        elif not n.endswith("logit_scale"):  # HMMC never reads it (trainable only in `full`)
            assert p.grad is not None, f"trainable {n} is not connected to the loss"
            # A tensor stays put only if its gradient was exactly 0 all along: a bottleneck whose
            # ReLU units are all off for the tokens that reach the loss (e.g. [CLS] in the last
            # block).
            assert (not torch.equal(p, before[n])) == (n in pushed), n
    changed = [n for n in pushed if not torch.equal(model.get_parameter(n), before[n])]
    assert len(changed) >= 0.75 * len(trainable), (
        f"only {len(changed)} of {len(trainable)} trainable tensors moved")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_checkpoint_round_trip_reproduces_the_outputs(name, tiny, make_tiny_clip, tmp_path):
    model, original = with_method(tiny, name)
    randomize_new(model, original)
    model.eval()
    path = tmp_path / "trainable.pt"
    save_trainable(model, str(path), config={"method": name})
    # `full` keeps every tensor, so a CLIP with other weights must come back identical; the others
    # load into the same frozen CLIP with a freshly initialised method.
    other = make_tiny_clip(1) if name == "full" else tiny
    restored, _ = with_method(other, name, seed=5)
    img, txt = images(3), tokens(3, 9)
    expected = encode(model, img, txt)
    if name != "zero_shot":
        assert not all(torch.equal(a, b) for a, b in zip(encode(restored, img, txt), expected))
    assert load_trainable(restored, str(path)) == {"config": {"method": name}}
    assert all(torch.equal(a, b) for a, b in zip(encode(restored.eval(), img, txt), expected))
    held = torch.load(path, weights_only=True)["trainable"]
    if name == "full":
        assert len(held) == len(list(tiny.parameters()))


# ---- the mechanisms, against references ----

@pytest.mark.parametrize("tower", ["text", "vision"])
@pytest.mark.parametrize("depth", [1, 2])
def test_prompts_sit_after_token_0_and_leave_the_sequence_as_it_came(tower, depth, tiny):
    """Prompted transformer == the plain blocks run on [token 0, prompts_l, rest] (prompts replaced
    at each prompted layer), with the prompt positions dropped at the end."""
    model = copy.deepcopy(tiny)
    transformer = model.transformer if tower == "text" else model.visual.transformer
    plain = list((tiny.transformer if tower == "text" else tiny.visual.transformer).resblocks)
    n = 3
    add_prompts(transformer, n, depth, lambda t: torch.nn.init.normal_(t, std=0.5))
    prompts = [b.prompts for b in transformer.resblocks
               if isinstance(b, PromptedBlock) and b.prompts is not None]
    assert len(prompts) == depth
    x = torch.randn(2, 77 if tower == "text" else 17, transformer.width)
    with torch.no_grad():
        ours = transformer(x)
        ref = torch.cat([x[:, :1], prompts[0].expand(2, -1, -1), x[:, 1:]], dim=1)
        for i, block in enumerate(plain):
            if 0 < i < depth:
                ref = torch.cat([ref[:, :1], prompts[i].expand(2, -1, -1), ref[:, 1 + n:]], dim=1)
            ref = block(ref)
        ref = torch.cat([ref[:, :1], ref[:, 1 + n:]], dim=1)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_lora_block_equals_the_block_with_merged_weights(tiny):
    torch.manual_seed(0)
    block = copy.deepcopy(tiny.transformer.resblocks[0])  # causal text block
    lora = LoRABlock(copy.deepcopy(block), rank=4, alpha=8.0)
    for module in (lora.lora_q, lora.lora_v):
        torch.nn.init.normal_(module.B.weight, std=0.1)
    D = block.attn.out_proj.in_features
    with torch.no_grad():
        q, v = lora.lora_q, lora.lora_v
        block.attn.in_proj_weight[:D] += q.scale * q.B.weight @ q.A.weight
        block.attn.in_proj_weight[2 * D:] += v.scale * v.B.weight @ v.A.weight
        x = torch.randn(2, 77, D)
        torch.testing.assert_close(lora(x), block(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(lora(x), tiny.transformer.resblocks[0](x), atol=1e-3)


def test_convpass_mixes_grid_neighbours_in_images_and_only_earlier_tokens_in_text():
    torch.manual_seed(0)
    image, text = Convpass(16, 4, image=True), Convpass(16, 4, image=False)
    for module in (image, text):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)
    image.eval(), text.eval()
    # image: [CLS] + a 4x4 grid; patch (1, 1) reaches its 3x3 neighbourhood and nothing else
    # ([CLS] included)
    x = torch.randn(1, 17, 16)
    y = x.clone()
    y[0, 1 + 1 * 4 + 1] += 1.0
    changed = (image(x) - image(y)).abs().sum(-1)[0] > 0
    grid = math.isqrt(16)
    near = [abs(r - 1) <= 1 and abs(c - 1) <= 1 for r in range(grid) for c in range(grid)]
    expected = [False] + near
    assert changed.tolist() == expected
    # text: token 5 reaches tokens 5, 6, 7 (a causal width-3 conv) and no earlier one
    x = torch.randn(1, 12, 16)
    y = x.clone()
    y[0, 5] += 1.0
    changed = (text(x) - text(y)).abs().sum(-1)[0] > 0
    assert changed.tolist() == [5 <= i <= 7 for i in range(12)]


def sequential_reference(plain, block, adapter, x):
    """A block with an adapter on each sublayer's output, written out from the plain block:
    a = attn(ln_1 x); x = x + a + A_attn(a); f = mlp(ln_2 x); x = x + f + A_mlp(f)."""
    a = plain.attn(plain.ln_1(x))
    x = x + a + adapter(block.attn_adapter, a)
    f = plain.mlp(plain.ln_2(x))
    return x + f + adapter(block.mlp_adapter, f)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def test_cross_modal_adapter_shares_its_last_up_channels_between_the_towers(tiny):
    """Official Cross-Modal Adapter: per layer, an adapter on the attention output and one on the
    MLP output, each `z + cat([up_m(h), up_shared(h)])` with h = quick_gelu(down_m(z)); the
    up_shared tensor is one tensor for both towers, the down and unique up ones are not."""
    model, original = with_method(tiny, "cross_modal_adapter")
    randomize_new(model, original)
    text, vision = model.transformer.resblocks, model.visual.transformer.resblocks
    s = method_config("cross_modal_adapter")["shared_dim"]
    for t_block, v_block in zip(text, vision):
        for name in ("attn_adapter", "mlp_adapter"):
            t_ad, v_ad = getattr(t_block, name), getattr(v_block, name)
            assert t_ad.shared_up.weight is v_ad.shared_up.weight
            assert t_ad.shared_up.weight.shape[0] == s
            assert t_ad.text_down.weight is not t_ad.vision_down.weight
        assert t_block.attn_adapter is not t_block.mlp_adapter
    # the block against its equations, written out from the plain block and the adapter's tensors
    block, plain = vision[1], tiny.visual.transformer.resblocks[1]

    def adapter(ad, z):
        h = quick_gelu(z @ ad.vision_down.weight.T + ad.vision_down.bias)
        unique = h @ ad.vision_up.weight.T + ad.vision_up.bias
        return torch.cat([unique, h @ ad.shared_up.weight.T + ad.shared_up.bias], dim=-1)

    x = torch.randn(2, 17, vision[0].block.ln_1.normalized_shape[0])
    with torch.no_grad():
        ref = sequential_reference(plain, block, adapter, x)
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)
        # the shared channels: a change of up_shared moves the last s channels of both towers only
        z_t, z_v = torch.randn(1, 5, 96), torch.randn(1, 5, 128)
        ad = text[0].mlp_adapter
        before = ad(z_t, "text"), ad(z_v, "vision")
        ad.shared_up.bias += 1.0
        after = ad(z_t, "text"), ad(z_v, "vision")
    for b, a_ in zip(before, after):
        moved = (a_ - b).abs().amax(dim=(0, 1)) > 0.5
        assert moved[-s:].all() and not moved[:-s].any()


def test_near_identity_inits_are_the_official_ones():
    """Cross-Modal Adapter: every weight N(0, 0.01); Houlsby: truncated N(0, 1e-3) cut at 2 std.
    Biases zero. (std of a normal cut at 2 std: 0.88 of the uncut one.)"""
    from mrs_adapter.methods.cross_modal_adapter import CrossModalAdapter
    from mrs_adapter.methods.houlsby import HoulsbyAdapter
    torch.manual_seed(0)
    ad = CrossModalAdapter(512, 768, 8, 16, 0.0, init_std=0.01)
    for layer in (ad.text_down, ad.vision_down, ad.text_up, ad.vision_up, ad.shared_up):
        assert 0.009 < layer.weight.std().item() < 0.011 and not layer.bias.any()
    ad = HoulsbyAdapter(768, 8, 0.0, init_std=1e-3)
    for layer in (ad.down, ad.up):
        w = layer.weight
        assert w.abs().max() <= 2e-3 and 0.84e-3 < w.std().item() < 0.92e-3 and not layer.bias.any()


def test_uniadapter_shares_layernorm_and_down_projection_and_scales_its_output(tiny):
    """Official UniAdapter: one module per layer for both towers, `0.1 * up_m(relu(down(LN(x))))`
    beside the MLP on the post-attention stream; LayerNorm and down are shared, the narrower tower
    reading their leading channels."""
    model, original = with_method(tiny, "uniadapter")
    randomize_new(model, original)
    text, vision = model.transformer.resblocks, model.visual.transformer.resblocks
    for t_block, v_block in zip(text, vision):
        assert t_block.adapter is v_block.adapter
    ad = text[0].adapter
    bottleneck = method_config("uniadapter")["bottleneck"]
    assert ad.scale == 0.1 and ad.down.weight.shape == (bottleneck, 128)

    def reference(x, up, width):  # zero-pad the tower's own LayerNorm output to the shared width
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        h = (x - mu) / torch.sqrt(var + 1e-5) * ad.norm.weight[:width] + ad.norm.bias[:width]
        h = torch.nn.functional.pad(h, (0, 128 - width))
        return 0.1 * (torch.relu(h @ ad.down.weight.T + ad.down.bias) @ up.weight.T + up.bias)

    with torch.no_grad():
        for modality, width, up in (("text", 96, ad.text_up), ("vision", 128, ad.vision_up)):
            x = torch.randn(2, 7, width)
            torch.testing.assert_close(ad(x, modality), reference(x, up, width),
                                       rtol=1e-5, atol=1e-5)
            # the LayerNorm makes the adapter blind to the scale and offset of its input
            torch.testing.assert_close(ad(3 * x + 1, modality), ad(x, modality),
                                       rtol=1e-4, atol=1e-5)
        block, plain = vision[0], tiny.visual.transformer.resblocks[0]
        x = torch.randn(2, 17, 128)
        h = x + plain.attn(plain.ln_1(x))
        expected = h + plain.mlp(plain.ln_2(h)) + ad(h, "vision")
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cross_modal_adapter", "uniadapter"])
def test_layerwise_shared_methods_reject_towers_of_unequal_depth(name, make_tiny_clip):
    model = make_tiny_clip(0, vision_layers=3)
    with pytest.raises(ValueError, match="equal depth; this CLIP has 2 text and 3 vision layers"):
        apply_method(model, name, verbose=False)


def test_houlsby_block_is_the_two_sequential_gelu_adapters(tiny):
    model, original = with_method(tiny, "houlsby")
    randomize_new(model, original)
    block, plain = model.transformer.resblocks[0], tiny.transformer.resblocks[0]

    def adapter(ad, h):  # GELU in its tanh form, as adapter-bert's gelu
        z = h @ ad.down.weight.T + ad.down.bias
        z = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
        return z @ ad.up.weight.T + ad.up.bias

    x = torch.randn(2, 77, 96)
    with torch.no_grad():
        ref = sequential_reference(plain, block, adapter, x)
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_adapter_is_one_scaled_relu_adapter_on_the_mlp_output(tiny):
    """The paper's Adapter row: AdaptFormer's adapter in sequence, `x + f + s up(relu(down(f)))`
    with f the MLP's output, one per block (not on the attention output)."""
    model, original = with_method(tiny, "adapter")
    randomize_new(model, original)
    model.eval()
    s = method_config("adapter")["scale"]
    for tower in (model.transformer, model.visual.transformer):
        for block in tower.resblocks:  # one adapter, 2 D r + r + D parameters
            D, r = block.adapter.down.in_features, block.adapter.down.out_features
            trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
            assert trainable == 2 * D * r + r + D
    block, plain = model.visual.transformer.resblocks[1], tiny.visual.transformer.resblocks[1]
    ad = block.adapter

    def adapter(z):
        return s * (torch.relu(z @ ad.down.weight.T + ad.down.bias) @ ad.up.weight.T + ad.up.bias)

    x = torch.randn(2, 17, 128)
    with torch.no_grad():
        h = x + plain.attn(plain.ln_1(x))
        f = plain.mlp(plain.ln_2(h))
        torch.testing.assert_close(block(x), h + f + adapter(f), rtol=1e-5, atol=1e-5)
        # negative control: AdaptFormer's parallel placement (reading h) is another block
        assert not torch.allclose(block(x), h + f + adapter(h), atol=1e-3)


def test_convpass_conv_starts_xavier_uniform_as_official_convpass_attn(tiny):
    """Every official `convpass_attn` config sets xavier_init: the conv's weights are
    U(-b, b), b = sqrt(6 / (fan_in + fan_out)), fan = bottleneck x taps (3 x 3 image, 3 text),
    std b / sqrt(3), biases zero. The identity-tap init (`xavier_init=False`) is out of bounds."""
    model, _ = with_method(tiny, "convpass")
    for tower, taps in ((model.visual.transformer, 9), (model.transformer, 3)):
        convs = [block.attn_bypass.conv for block in tower.resblocks]
        r = convs[0].weight.shape[0]
        bound = math.sqrt(6 / (2 * r * taps))
        w = torch.cat([conv.weight.flatten() for conv in convs])
        assert w.numel() == len(convs) * r * r * taps
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and (w != 0).all()
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3)
        assert abs(w.mean().item()) < 0.15 * bound
        assert not any(conv.bias.any() for conv in convs)
    identity = Convpass(128, 4, image=True, xavier_init=False).conv.weight
    assert identity.abs().max() == 1 > math.sqrt(6 / 72)


def test_convpass_block_has_the_bypass_beside_attention_reading_ln_1(tiny):
    """Official `convpass_attn`: x + attn(ln_1 x) + s C(ln_1 x), then the plain MLP sublayer."""
    model, original = with_method(tiny, "convpass")
    randomize_new(model, original)
    model.eval()
    block, plain = model.visual.transformer.resblocks[0], tiny.visual.transformer.resblocks[0]
    assert block.mlp_bypass is None and block.scale == method_config("convpass")["scale"]
    x = torch.randn(2, 17, 128)
    with torch.no_grad():
        h = plain.ln_1(x)
        ref = x + plain.attn(h) + block.scale * block.attn_bypass(h)
        ref = ref + plain.mlp(plain.ln_2(ref))
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_dim", [0, 96])
def test_cross_modal_adapter_needs_shared_and_own_up_channels(tiny, shared_dim):
    with pytest.raises(ValueError, match=f"shared_dim must be in 1..95 .* got {shared_dim}"):
        apply_method(copy.deepcopy(tiny), "cross_modal_adapter", {"shared_dim": shared_dim},
                     verbose=False)
    model = apply_method(copy.deepcopy(tiny), "cross_modal_adapter", {"shared_dim": 95},
                         verbose=False)
    assert model.transformer.resblocks[0].attn_adapter.text_up.out_features == 1
