"""MRS-Adapter (docs/method.md §2), its insertion into CLIP, trainable-state checkpoints, and the
feature-dropout views of model.py (docs/method.md §3). Tiny CLIPs except the ViT-B/32 count
checks."""
import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrs_adapter.adapter import AdaptedBlock, MRSAdapter, add_adapters
from mrs_adapter.checkpoint import (
    count_parameters,
    load_trainable,
    load_trainable_state_dict,
    print_trainable_parameters,
    save_trainable,
    trainable_state_dict,
)
from mrs_adapter.loss import hmmc_loss
from mrs_adapter.model import CLIP

CLIP_VIT_B32_PARAMS = 151_277_313  # docs/method.md §1
# wider than shared_dim=64; unequal, to catch mix-ups
TINY = dict(transformer_width=96, vision_width=128)


def linear_params(d_in, d_out):
    return d_in * d_out + d_out


def mrs_adapter_params(text_width, vision_width, bottleneck=64, shared=64):
    """The table of docs/method.md §2 as a formula: downs, own ups, shared up."""
    return (linear_params(text_width, bottleneck) + linear_params(vision_width, bottleneck)
            + linear_params(bottleneck, text_width - shared)
            + linear_params(bottleneck, vision_width - shared)
            + linear_params(bottleneck, shared))


def random_tokens(B, seed=0, context=77):
    """(B, context) ids: start token, random words, end-of-text (the largest id), zero padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(B, context, dtype=torch.long)
    for i in range(B):
        n = int(torch.randint(12, context - 1, (1,), generator=g))
        tokens[i, 0], tokens[i, n] = 49406, 49407
        tokens[i, 1:n] = torch.randint(1, 49406, (n - 1,), generator=g)
    return tokens


def random_images(B, seed=0, resolution=32):
    return torch.randn(B, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model, seed=1, std=0.1):
    """Non-zero weights everywhere in the adapters, so that they change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MRSAdapter):
                for p in module.parameters():
                    p.copy_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def adapted_tiny_clip(make_tiny_clip):
    """adapted_tiny_clip(seed=0, **sizes) -> a tiny CLIP of TINY's widths with fresh shared
    adapters."""
    def build(seed=0, **kwargs):
        return add_adapters(make_tiny_clip(seed, **{**TINY, **kwargs}), verbose=False)
    return build


@pytest.fixture(scope="module")
def adapted_vit_b32():
    """Full-size random CLIP with ViT-B/32 shapes and the published shared adapter (a few
    seconds)."""
    torch.manual_seed(0)
    model = CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                 vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
                 transformer_heads=8, transformer_layers=12)
    return add_adapters(model, verbose=False)


# ---- the module itself ----

def test_adapter_layers_follow_the_table_and_start_at_zero():
    adapter = MRSAdapter(512, 768)
    shapes = {n: tuple(p.shape) for n, p in adapter.named_parameters()}
    assert shapes == {"text_down.weight": (64, 512), "text_down.bias": (64,),
                      "vision_down.weight": (64, 768), "vision_down.bias": (64,),
                      "text_up.weight": (448, 64), "text_up.bias": (448,),
                      "vision_up.weight": (704, 64), "vision_up.bias": (704,),
                      "shared_up.weight": (64, 64), "shared_up.bias": (64,)}
    assert sum(p.numel() for p in adapter.parameters()) == 161_088
    # No LayerNorm, scale or gate: only the five Linear layers and the dropout.
    assert {type(m) for m in adapter.children()} == {nn.Linear, nn.Dropout}
    assert adapter.dropout.p == 0.5
    for up in (adapter.text_up, adapter.vision_up, adapter.shared_up):
        assert not up.weight.any() and not up.bias.any()
    for down in (adapter.text_down, adapter.vision_down):
        assert not down.bias.any() and down.weight.std() > 0
        # PyTorch's default Linear init is U(-1/sqrt(in), 1/sqrt(in))
        bound = down.in_features ** -0.5
        assert down.weight.abs().max() <= bound
    assert not adapter(torch.randn(2, 5, 512), "text").any()


def test_adapter_equation_and_shared_channels():
    adapter = randomize_adapters(MRSAdapter(96, 128, bottleneck=16, shared_dim=32)).eval()
    for modality, width, down, up in (("text", 96, adapter.text_down, adapter.text_up),
                                      ("vision", 128, adapter.vision_down, adapter.vision_up)):
        x = torch.randn(3, 7, width)
        h = (x @ down.weight.t() + down.bias).clamp(min=0)  # (3, 7, 16)
        expected = torch.cat([h @ up.weight.t() + up.bias,
                              h @ adapter.shared_up.weight.t() + adapter.shared_up.bias], dim=-1)
        assert torch.allclose(adapter(x, modality), expected, atol=1e-6)
    # The LAST shared_dim channels of both modalities come from the one shared_up layer.
    with torch.no_grad():
        for p in adapter.parameters():
            p.zero_()
        adapter.shared_up.bias.fill_(1.0)
    for modality, width in (("text", 96), ("vision", 128)):
        out = adapter(torch.randn(2, 3, width), modality)
        assert out.shape == (2, 3, width)
        assert not out[..., :-32].any() and torch.equal(out[..., -32:], torch.ones(2, 3, 32))
    with pytest.raises(ValueError, match="audio"):
        adapter(torch.randn(1, 1, 96), "audio")


def test_adapter_dropout_is_active_in_train_mode_only():
    adapter = randomize_adapters(MRSAdapter(64, 96, bottleneck=32, shared_dim=16))
    x = torch.randn(4, 10, 64)
    assert torch.equal(adapter.eval()(x, "text"), adapter(x, "text"))
    assert not torch.allclose(adapter.train()(x, "text"), adapter.eval()(x, "text"))


# ---- insertion into CLIP ----

def test_vit_b32_trains_exactly_161088_parameters_and_no_clip_tensor(adapted_vit_b32):
    assert count_parameters(adapted_vit_b32) == (161_088, CLIP_VIT_B32_PARAMS + 161_088)
    trainable = [n for n, p in adapted_vit_b32.named_parameters() if p.requires_grad]
    assert len(trainable) == 10 and all(".adapter." in n for n in trainable)
    # Every CLIP tensor is frozen, the projections and logit_scale included.
    frozen = {n for n, p in adapted_vit_b32.named_parameters() if not p.requires_grad}
    assert {"visual.proj", "text_projection", "logit_scale", "token_embedding.weight"} <= frozen
    assert all(".adapter." not in n for n in frozen)
    assert len(frozen) + 10 == len(list(adapted_vit_b32.parameters()))
    # One adapter instance in all 24 blocks of both towers.
    blocks = (list(adapted_vit_b32.transformer.resblocks)
              + list(adapted_vit_b32.visual.transformer.resblocks))
    assert len(blocks) == 24 and len({id(b.adapter) for b in blocks}) == 1


def test_trainable_line_is_printed(adapted_vit_b32, make_tiny_clip, capsys):
    print_trainable_parameters(adapted_vit_b32)
    assert capsys.readouterr().out.strip() == \
        "trainable params: 161,088 || all params: 151,438,401 || trainable%: 0.1064"
    add_adapters(make_tiny_clip(**TINY))
    line = f"trainable params: {mrs_adapter_params(96, 128):,d} || all params: "
    assert capsys.readouterr().out.startswith(line)


@pytest.mark.parametrize("layers", [1, 2])
def test_adapter_follows_vit_l14_widths(layers):
    model = CLIP(embed_dim=768, image_resolution=28, vision_layers=layers, vision_width=1024,
                 vision_patch_size=14, context_length=77, vocab_size=1000, transformer_width=768,
                 transformer_heads=12, transformer_layers=layers)
    adapter = add_adapters(model, verbose=False).transformer.resblocks[0].adapter
    assert tuple(adapter.text_down.weight.shape) == (64, 768)
    assert tuple(adapter.vision_down.weight.shape) == (64, 1024)
    assert tuple(adapter.text_up.weight.shape) == (704, 64)
    assert tuple(adapter.vision_up.weight.shape) == (960, 64)
    assert tuple(adapter.shared_up.weight.shape) == (64, 64)
    # Shared adapter: the count depends on the widths only, not on the depth.
    assert count_parameters(model)[0] == mrs_adapter_params(768, 1024) == 227_136


def test_per_block_ablation_has_one_single_modality_adapter_per_block(make_tiny_clip):
    model = add_adapters(make_tiny_clip(vision_layers=3, **TINY), shared=False, verbose=False)
    text, vision = list(model.transformer.resblocks), list(model.visual.transformer.resblocks)
    assert len({id(b.adapter) for b in text + vision}) == 5
    assert all(b.adapter.vision_down is None for b in text)
    assert all(b.adapter.text_down is None for b in vision)
    per_text = linear_params(96, 64) + linear_params(64, 96)  # down, own up + shared up
    per_vision = linear_params(128, 64) + linear_params(64, 128)
    assert count_parameters(model)[0] == 2 * per_text + 3 * per_vision
    # No dead parameter: every trainable tensor receives a gradient.
    randomize_adapters(model).train()
    img, txt = model.encode_image(random_images(2)), model.encode_text(random_tokens(2))
    (img.sum() + txt.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_wrapper_holds_the_frozen_block_and_says_so(make_tiny_clip):
    model = make_tiny_clip(**TINY)
    original = model.transformer.resblocks[1]
    add_adapters(model, verbose=False)
    wrapper = model.transformer.resblocks[1]
    assert isinstance(wrapper, AdaptedBlock) and wrapper.block is original
    assert wrapper.modality == "text"
    assert model.visual.transformer.resblocks[0].modality == "vision"
    text = repr(model)
    shown = (r"AdaptedBlock\(\s+modality='text', block_frozen=True"
             r"\s+\(block\): ResidualAttentionBlock\(")
    assert re.search(shown, text)
    assert "(adapter): MRSAdapter(" in text
    # The wrapper renames the frozen tensors in model.state_dict() (documented in AdaptedBlock).
    assert "transformer.resblocks.0.block.attn.in_proj_weight" in model.state_dict()
    with pytest.raises(ValueError, match="already holds an adapter"):
        add_adapters(model, verbose=False)


def test_adapted_block_writes_the_parallel_equation(adapted_tiny_clip):
    model = randomize_adapters(adapted_tiny_clip()).eval()
    for wrapper in (model.transformer.resblocks[0], model.visual.transformer.resblocks[1]):
        block, adapter = wrapper.block, wrapper.adapter
        x = torch.randn(2, 9, block.ln_1.normalized_shape[0])
        after_attn = x + block.attn(block.ln_1(x))  # the residual stream the adapter must read
        mlp = block.mlp(block.ln_2(after_attn))
        expected = after_attn + mlp + adapter(after_attn, wrapper.modality)
        assert torch.allclose(wrapper(x), expected, atol=1e-6)
        # Reading the block's input instead (a sequential/pre-attention placement) would differ.
        wrong = after_attn + block.mlp(block.ln_2(after_attn)) + adapter(x, wrapper.modality)
        assert not torch.allclose(wrapper(x), wrong, atol=1e-4)


def test_fresh_adapters_leave_clip_outputs_unchanged(make_tiny_clip):
    plain = make_tiny_clip(**TINY)
    adapted = add_adapters(copy.deepcopy(plain), verbose=False)
    images, tokens = random_images(3), random_tokens(3)
    for mode in ("eval", "train"):  # train: adapter dropout is on, but the zero up layers output 0
        plain.train(mode == "train"), adapted.train(mode == "train")
        assert torch.equal(adapted.encode_image(images), plain.encode_image(images)), mode
        assert torch.equal(adapted.encode_text(tokens), plain.encode_text(tokens)), mode
    # ...and the comparison is sensitive: non-zero adapters change both towers.
    randomize_adapters(adapted).eval(), plain.eval()
    assert not torch.allclose(adapted.encode_image(images), plain.encode_image(images), atol=1e-4)
    assert not torch.allclose(adapted.encode_text(tokens), plain.encode_text(tokens), atol=1e-4)


def test_causal_mask_passes_through_adapted_text_blocks(adapted_tiny_clip):
    model = randomize_adapters(adapted_tiny_clip()).eval()
    tokens = random_tokens(2)
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1000) % 49406  # a later word, before the end-of-text token

    def hidden(t):
        return model.transformer(model.embed_text(t))  # (B, L, width) after all adapted blocks

    a, b = hidden(tokens), hidden(changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)  # earlier positions never see position 6
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)
    # Negative control: without the causal flag the earlier positions would change.
    for wrapper in model.transformer.resblocks:
        wrapper.block.attn.causal = False
    assert not torch.allclose(hidden(tokens)[:, :6], hidden(changed)[:, :6], atol=1e-3)


def test_pooled_last_block_equals_the_full_adapted_block_at_that_token(adapted_tiny_clip):
    """model.py's speed-only `Transformer.pooled` runs the last AdaptedBlock on the pooled token
    alone; its attention must read keys and values from every token's ln_1 and mask by the
    query's own position, so the result is the full computation at that token."""
    model = randomize_adapters(adapted_tiny_clip()).eval()
    g = torch.Generator().manual_seed(3)
    index = torch.tensor([0, 4, 10])  # pooled tokens at the start, the middle and the end
    for tower in (model.transformer, model.visual.transformer):  # causal, then not
        x = torch.randn(3, 11, tower.width, generator=g)
        rows = torch.arange(3)
        with torch.no_grad():
            pooled = tower.pooled(x, index)[:, 0]
            assert torch.allclose(pooled, tower(x)[rows, index], atol=1e-5)
            # negative controls, each an error the shortcut could make in its last block
            *body, last = tower.resblocks
            h = nn.Sequential(*body)(x)
            alone = last(h[rows, index][:, None])[:, 0]  # keys from the pooled token only
            assert not torch.allclose(pooled, alone, atol=1e-3)
            causal = last.block.attn.causal
            last.block.attn.causal = not causal  # the other mask
            assert not torch.allclose(pooled, last(h)[rows, index], atol=1e-3)
            last.block.attn.causal = causal


def test_one_adam_step_changes_only_adapter_tensors(adapted_tiny_clip):
    model = randomize_adapters(adapted_tiny_clip()).train()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    img, img_aug = model.encode_image_views(random_images(4), 0.2)
    txt, txt_aug = model.encode_text_views(random_tokens(4), 0.2)
    loss = hmmc_loss(img, txt, img_aug, txt_aug)
    assert loss.item() > 0
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    for name, tensor in before.items():
        if ".adapter." in name:
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapter." not in n)


# ---- trainable-state checkpoints ----

def test_save_load_reproduces_outputs_bit_identically(adapted_tiny_clip, tmp_path):
    trained = randomize_adapters(adapted_tiny_clip(seed=0)).eval()
    path = str(tmp_path / "adapter.pt")
    save_trainable(trained, path, config={"bottleneck": 64, "margin": 0.2}, epoch=3)
    fresh = randomize_adapters(adapted_tiny_clip(seed=0), seed=7).eval()
    images, tokens = random_images(2), random_tokens(2)
    assert not torch.equal(fresh.encode_image(images), trained.encode_image(images))
    assert load_trainable(fresh, path) == {"config": {"bottleneck": 64, "margin": 0.2}, "epoch": 3}
    assert torch.equal(fresh.encode_image(images), trained.encode_image(images))
    assert torch.equal(fresh.encode_text(tokens), trained.encode_text(tokens))
    assert os.listdir(tmp_path) == ["adapter.pt"]  # no temporary file left behind


def test_vit_b32_adapter_file_is_small_and_refused_by_other_widths(adapted_vit_b32,
                                                                   adapted_tiny_clip, tmp_path):
    path = str(tmp_path / "b32.pt")
    save_trainable(adapted_vit_b32, path)
    assert os.path.getsize(path) < 1_000_000
    state = torch.load(path, weights_only=True)["trainable"]
    assert sum(t.numel() for t in state.values()) == 161_088  # the shared adapter stored once
    with pytest.raises(ValueError) as error:
        load_trainable(adapted_tiny_clip(), path)
    assert "vision_down.weight: checkpoint (64, 768) vs model (64, 128)" in str(error.value)
    assert "text_up.weight: checkpoint (448, 64) vs model (32, 64)" in str(error.value)


def test_strict_loading_names_what_differs(make_tiny_clip, adapted_tiny_clip):
    source = randomize_adapters(adapted_tiny_clip())
    state = trainable_state_dict(source)
    target = adapted_tiny_clip()
    snapshot = trainable_state_dict(target)

    shapes = r"text_down\.weight: checkpoint \(64, 96\) vs model \(64, 128\)"
    with pytest.raises(ValueError, match=shapes):
        load_trainable_state_dict(adapted_tiny_clip(transformer_width=128), state)
    unexpected = r"unexpected 10 names: .*adapter\.shared_up\.bias"
    with pytest.raises(ValueError, match=unexpected) as error:
        # a plain CLIP: everything trainable, no adapter
        load_trainable_state_dict(make_tiny_clip(), state)
    assert "missing" in str(error.value) and "token_embedding.weight" in str(error.value)
    per_block = add_adapters(make_tiny_clip(**TINY), shared=False, verbose=False)
    missing = r"missing .*transformer\.resblocks\.1\.adapter\.text_down\.weight"
    with pytest.raises(ValueError, match=missing):
        load_trainable_state_dict(per_block, state)
    other_method = {"prompt_learner.ctx": torch.zeros(4, 64)}
    both = r"missing 10 names.*unexpected 1 names: prompt_learner\.ctx"
    with pytest.raises(ValueError, match=both):
        load_trainable_state_dict(target, other_method)
    # A refused state copies nothing; an exact one loads.
    assert all(torch.equal(trainable_state_dict(target)[n], t) for n, t in snapshot.items())
    load_trainable_state_dict(target, state)
    assert all(torch.equal(trainable_state_dict(target)[n], t) for n, t in state.items())


def test_save_is_atomic_and_load_checks_the_format(adapted_tiny_clip, tmp_path):
    path = str(tmp_path / "adapter.pt")
    model = randomize_adapters(adapted_tiny_clip())
    save_trainable(model, path, epoch=1)
    with pytest.raises(Exception):
        save_trainable(adapted_tiny_clip(), path, callback=lambda: None)  # pickling fails mid-write
    assert os.listdir(tmp_path) == ["adapter.pt"]
    assert load_trainable(randomize_adapters(adapted_tiny_clip(), seed=5), path) == {"epoch": 1}
    with pytest.raises(ValueError, match="'trainable' is the key"):
        save_trainable(model, path, trainable=1)
    torch.save({"state_dict": {}}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not a save_trainable checkpoint"):
        load_trainable(model, str(tmp_path / "other.pt"))


# ---- feature-dropout views (model.py, docs/method.md §3) ----

def test_feature_dropout_is_off_in_eval_mode(make_tiny_clip):
    model = make_tiny_clip().eval()
    images, tokens = random_images(3), random_tokens(3)
    assert torch.equal(model.encode_image(images, feature_dropout=0.2), model.encode_image(images))
    assert torch.equal(model.encode_text(tokens, feature_dropout=0.2), model.encode_text(tokens))
    for views, x, encode in ((model.encode_image_views, images, model.encode_image),
                             (model.encode_text_views, tokens, model.encode_text)):
        clean, dropped = views(x, 0.2)
        assert torch.allclose(clean, encode(x), atol=1e-5)
        assert torch.allclose(dropped, clean, atol=1e-5)


def test_feature_dropout_drops_a_fifth_of_the_embeddings_in_train_mode(make_tiny_clip):
    # plain CLIP has no other random op, so the draws can be replayed
    model = make_tiny_clip().train()
    images, tokens = random_images(8), random_tokens(8)
    trimmed = model.trim(tokens)  # encode_text drops the padding after the last end token first
    cases = (("image", images, model.encode_image, model.visual.embed, model.visual.encode),
             ("text", tokens, model.encode_text, lambda t: model.embed_text(model.trim(t)),
              lambda x: model.text_head(x, trimmed)))
    for name, inputs, encode, embed, blocks_and_head in cases:
        torch.manual_seed(11)
        out = encode(inputs, feature_dropout=0.2)
        torch.manual_seed(11)
        clean = embed(inputs)  # (B, L, width), the tokens entering the first block
        dropped = F.dropout(clean, 0.2, training=True)
        # The same draw replayed on the embeddings reproduces encode_*: the dropout sits exactly
        # there.
        assert torch.equal(out, blocks_and_head(dropped)), name
        assert abs((dropped == 0).float().mean().item() - 0.2) < 0.02, name
        kept = dropped != 0
        assert torch.allclose(dropped[kept], clean[kept] / 0.8), name  # inverted dropout scaling
        assert not torch.allclose(out, encode(inputs), atol=1e-4), name


def test_views_in_train_mode_give_a_clean_and_a_dropped_view(make_tiny_clip):
    model = make_tiny_clip().train()
    images, tokens = random_images(4), random_tokens(4)
    for views, x, encode in ((model.encode_image_views, images, model.encode_image),
                             (model.encode_text_views, tokens, model.encode_text)):
        clean, dropped = views(x, 0.2)
        assert torch.allclose(clean, encode(x), atol=1e-5)
        assert not torch.allclose(dropped, clean, atol=1e-4)
