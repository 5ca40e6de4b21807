"""Remote-sensing CLIP backbones: formats, MLP activation, unequal tower depths.

The parity oracle is open_clip with random weights: its `ViT-B-32` config runs nn.GELU, its
`ViT-B-32-quickgelu` config QuickGELU, and both use OpenAI's parameter names, as RemoteCLIP,
GeoRSCLIP and SkyCLIP checkpoints do."""
import dataclasses
import hashlib
import json
import os
import re
import shutil
import zipfile

import open_clip
import pytest
import torch

import train
from mrs_adapter import clip
from mrs_adapter.demo.scenes import make_demo
from mrs_adapter.methods import METHODS, apply_method
from mrs_adapter.model import QuickGELU, build_model

FORMATS = {  # how the checkpoints in the wild hold the same tensors
    "plain": lambda sd: sd,  # RemoteCLIP, GeoRSCLIP
    "nested": lambda sd: {"epoch": 20, "name": "run", "state_dict": sd,
                          "optimizer": {"param_groups": []}},  # open_clip's training dict
    "module": lambda sd: {"epoch": 20,  # SkyCLIP's: the same, saved from a DDP-wrapped model
                          "state_dict": {"module." + k: v for k, v in sd.items()}},
}


@pytest.fixture(scope="module")
def inputs(random_token_ids):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 224, 224, generator=g), random_token_ids(2, 77, 49408, g)


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
    img, txt = encode(build_model(state, wrong), inputs)
    img_gap, txt_gap = (img - want_img).abs().max().item(), (txt - want_txt).abs().max().item()
    print(f"{config} loaded with {wrong}: max abs difference image {img_gap:.3g}, "
          f"text {txt_gap:.3g}")
    assert img_gap > 1e-2 and txt_gap > 1e-2


def test_skyclip_zip_archive_loads_like_the_checkpoint_inside(tiny_clip, tmp_path):
    state = tiny_clip.state_dict()
    inner = tmp_path / "epoch_20.pt"
    torch.save(FORMATS["module"](state), inner)
    with zipfile.ZipFile(tmp_path / "SkyCLIP_ViT_B32_top50pct.zip", "w") as z:
        z.write(inner, "SkyCLIP_ViT_B32_top50pct/epoch_20.pt")
    from_zip, _ = clip.load(str(tmp_path / "SkyCLIP_ViT_B32_top50pct.zip"), activation="gelu")
    from_pt, _ = clip.load(str(inner), activation="gelu")
    for (name, a), (_, b) in zip(from_zip.state_dict().items(), from_pt.state_dict().items()):
        assert torch.equal(a, b), name
    mlp = from_zip.visual.transformer.resblocks[0].mlp
    assert from_zip.activation == "gelu" and isinstance(mlp.gelu, torch.nn.GELU)
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        z.write(inner, "a/epoch_10.pt")
        z.write(inner, "a/epoch_20.pt")
    with pytest.raises(ValueError, match=r"two.zip is a zip archive holding 2 checkpoint.*_10"):
        clip.load(str(tmp_path / "two.zip"))


def test_file_defaults_to_quickgelu_and_says_so_unknown_activation_is_named(tiny_clip, tmp_path):
    torch.save(tiny_clip.state_dict(), tmp_path / "w.pt")
    model, _ = clip.load(str(tmp_path / "w.pt"))
    assert model.activation == "quickgelu"
    assert "default for a weights file" in clip.describe(model.backbone)
    assert isinstance(model.transformer.resblocks[1].mlp.gelu, QuickGELU)
    with pytest.raises(ValueError, match="unknown CLIP MLP activation 'relu'.*quickgelu.*gelu"):
        clip.load(str(tmp_path / "w.pt"), activation="relu")


def test_a_moved_named_file_is_recognised_by_its_sha256(tiny_clip, tmp_path, monkeypatch):
    path = tmp_path / "downloaded-by-hand.pt"
    torch.save(tiny_clip.state_dict(), path)
    sha = clip.sha256_of(str(path))
    entry = clip.REMOTE_SENSING["GeoRSCLIP-ViT-L/14"]
    monkeypatch.setitem(clip.REMOTE_SENSING, "GeoRSCLIP-ViT-L/14", dataclasses.replace(
        entry, sha256=sha, activation="gelu", published={"rsitmd": 40.0}))
    model, _ = clip.load(str(path))  # no flag: the publisher's activation, found by the file's hash
    assert model.backbone["name"] == "GeoRSCLIP-ViT-L/14" and model.activation == "gelu"
    assert clip.published_mr(model.backbone["name"]) == {"rsitmd": 40.0}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_handles_towers_of_unequal_depth_or_says_why(method, make_tiny_clip, capsys):
    """ViT-L/14 has 24 vision and 12 text blocks: here 4 and 2."""
    model = make_tiny_clip(vision_layers=4, transformer_layers=2)
    try:
        model = apply_method(model, method, verbose=False)
    except ValueError as e:
        print(f"{method}: ValueError: {e}")
        # the error says why: the depths differ, and it names both
        assert "depth" in str(e) and re.search(r"\b2 text\b|\btext 2\b", str(e)) and re.search(
            r"\b4 vision\b|\bvision 4\b", str(e)), str(e)
        return
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73] * 2)
    model.train()
    v, t = model.encode_image(images), model.encode_text(tokens)
    assert v.shape == t.shape == (2, 32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        (v.sum() + t.sum()).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def train_and_eval(root, clip_arg, run_dir, *extra):
    """train.py, one epoch, `--clip clip_arg`, from the current folder; (summary, eval args)."""
    summary = train.main(["--dataset", "demo", "--data-root", root, "--clip", clip_arg,
                          "--output", str(run_dir), "--epochs", "1", "--print-freq", "10", *extra])
    best = str(run_dir / "seed2" / "best.pt")
    return summary, ["--dataset", "demo", "--data-root", root, "--checkpoint", best,
                     "--workers", "0", "--device", "cpu"]


@pytest.fixture
def same_metrics(metric_keys):
    """same_metrics(got, want): every metric of the row equal to 1e-6."""
    def same(got, want):
        return all(got[k] == pytest.approx(want[k], abs=1e-6) for k in metric_keys)
    return same


def test_eval_from_another_folder_finds_the_clip_a_relative_path_named(demo, eval_script,
                                                                      same_metrics, tmp_path,
                                                                      monkeypatch):
    """Issue 15 item 12: the recorded CLIP path was relative to train.py's working folder."""
    root, backbone = demo
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copy(backbone, work / "tiny.pt")
    monkeypatch.chdir(work)
    summary, args = train_and_eval(root, "tiny.pt", tmp_path / "run")
    monkeypatch.chdir(elsewhere)
    assert same_metrics(eval_script.main(args), summary["per_seed"][0]["test"])
    os.rename(work / "tiny.pt", tmp_path / "moved.pt")
    sha = hashlib.sha256((tmp_path / "moved.pt").read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError, match=f"not at {work / 'tiny.pt'} .*{sha}.*--clip"):
        eval_script.main(args)
    assert same_metrics(eval_script.main(args + ["--clip", str(tmp_path / "moved.pt")]),
                        summary["per_seed"][0]["test"])


def test_gelu_checkpoint_trains_and_eval_rebuilds_it_without_flags(demo, eval_script, same_metrics,
                                                                   tmp_path, capsys):
    """Issue 11: a GELU CLIP in SkyCLIP's format; the activation is recorded with the run."""
    root, backbone = demo
    state = torch.load(backbone, weights_only=True)
    gelu_file = tmp_path / "epoch_20.pt"
    torch.save(FORMATS["module"](state), gelu_file)
    sha = hashlib.sha256(gelu_file.read_bytes()).hexdigest()
    run = tmp_path / "run"
    summary, args = train_and_eval(root, str(gelu_file), run, "--clip-activation", "gelu")
    with open(run / "seed2" / "config.json") as f:
        config = json.load(f)
    best = torch.load(run / "seed2" / "best.pt", weights_only=True)
    for recorded in (config["backbone"], best["config"]["backbone"]):
        assert recorded["path"] == str(gelu_file) and recorded["sha256"] == sha
        assert recorded["activation"] == "gelu"
    capsys.readouterr()
    assert same_metrics(eval_script.main(args), summary["per_seed"][0]["test"])
    printed = capsys.readouterr().out  # the activation came from the checkpoint alone
    assert f"MLP activation gelu (recorded in {run / 'seed2' / 'best.pt'})" in printed
    torch.save(state, tmp_path / "other.pt")  # same tensors, other bytes: not the recorded file
    other_sha = hashlib.sha256((tmp_path / "other.pt").read_bytes()).hexdigest()
    other = ["--clip", str(tmp_path / "other.pt")]
    with pytest.raises(ValueError, match=f"on {gelu_file} with sha256 {sha}.*-sha256 {other_sha}"):
        eval_script.main(args + other)
    on_purpose = eval_script.main(args + other + ["--clip-sha256", other_sha])
    assert same_metrics(on_purpose, summary["per_seed"][0]["test"])


def test_zero_shot_prints_the_published_figure_beside_ours(eval_script, make_tiny_clip, tmp_path,
                                                           monkeypatch, capsys):
    make_demo(str(tmp_path / "data"), n_train=10, n_test=12, size=64)
    weights = tmp_path / "RS5M_ViT-B-32.pt"  # as if downloaded by hand: known by its sha256
    torch.save(make_tiny_clip().state_dict(), weights)
    entry = clip.REMOTE_SENSING["GeoRSCLIP-ViT-B/32"]
    monkeypatch.setitem(clip.REMOTE_SENSING, "GeoRSCLIP-ViT-B/32", dataclasses.replace(
        entry, sha256=clip.sha256_of(str(weights)), published={"demo": 50.0}))
    out = str(tmp_path / "zs.json")
    args = ["--dataset", "demo", "--data-root", str(tmp_path / "data"), "--zero-shot", "--clip",
            str(weights), "--workers", "0", "--device", "cpu", "--json", out]
    ours = eval_script.main(args)["mR"]
    assert (f"published zero-shot mR of GeoRSCLIP-ViT-B/32 on demo test: 50.00; ours {ours:.2f} "
            f"({ours - 50.0:+.2f} points") in capsys.readouterr().out
    with open(out) as f:
        saved = json.load(f)
    assert saved["published_zero_shot_mR"] == 50.0
    assert saved["backbone"]["activation"] == "quickgelu"
    eval_script.main(args + ["--split", "val"])
    assert "published" not in capsys.readouterr().out  # published figures are test-split figures
