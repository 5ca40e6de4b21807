"""eval.py end to end: zero-shot tiny CLIP on the generated demo dataset, JSON and PNG outputs."""
import json

import pytest
import torch
from PIL import Image

from mrs_adapter.checkpoint import save_trainable
from mrs_adapter.clip import transform
from mrs_adapter.data import load_splits
from mrs_adapter.datasets import read_image
from mrs_adapter.demo.scenes import make_demo
from mrs_adapter.methods import apply_method, method_options
from mrs_adapter.metrics import recall_at_k
from mrs_adapter.tokenizer import tokenize


@pytest.fixture(scope="module")
def setup(make_tiny_clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    weights = str(root / "tiny.pt")
    torch.save(make_tiny_clip().state_dict(), weights)
    make_demo(str(root / "data"), n_train=10, n_test=12, size=64)
    return root, weights


def test_zero_shot_end_to_end(setup, eval_script, make_tiny_clip, metric_keys):
    root, weights = setup
    out, png = str(root / "out" / "m.json"), str(root / "vis.png")
    metrics = eval_script.main(["--dataset", "demo", "--data-root", str(root / "data"),
                                "--zero-shot", "--clip", weights, "--workers", "0",
                                "--batch-size", "5", "--device", "cpu",
                                "--json", out, "--visualize", png])
    assert metric_keys <= set(metrics)
    saved = json.load(open(out))
    assert (metric_keys <= set(saved["metrics"]) and saved["n_images"] == 12
            and saved["n_captions"] == 60)
    assert Image.open(png).format == "PNG" and Image.open(png).size[0] > 100

    txt2img = torch.tensor(demo_test_split(root).txt2img)
    want = recall_at_k(direct_sims(make_tiny_clip(), root), txt2img)
    assert all(metrics[k] == pytest.approx(want[k]) for k in metric_keys)


def demo_test_split(root):
    return load_splits("demo", str(root / "data"), verbose=False)["test"]


def direct_sims(model, root):
    """All images x all captions in one unbatched pass: what eval.py must reproduce."""
    split = demo_test_split(root)
    with torch.no_grad():
        images = torch.stack([read_image(p, transform(32)) for p in split.image_paths])
        img = model.eval().encode_image(images)
        txt = model.encode_text(tokenize(split.captions))
    normalize = torch.nn.functional.normalize
    return normalize(img, dim=-1) @ normalize(txt, dim=-1).t()


def test_checkpoint_composes_the_method_and_loads_its_tensors(setup, eval_script, make_tiny_clip,
                                                              metric_keys):
    root, weights = setup
    model = apply_method(make_tiny_clip(), "mrs_adapter", {}, verbose=False)
    with torch.no_grad():  # trained-looking adapter weights (the up layers start at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    ckpt = str(root / "run" / "best.pt")
    save_trainable(model, ckpt, config={"clip": weights, "method": "mrs_adapter",
                                        "method_options": method_options("mrs_adapter")})
    metrics = eval_script.main(["--dataset", "demo", "--data-root", str(root / "data"),
                                "--checkpoint", ckpt, "--workers", "0", "--device", "cpu"])
    sims = direct_sims(model, root)
    plain = direct_sims(make_tiny_clip(), root)
    assert not torch.allclose(sims, plain, atol=1e-3)  # the adapter matters
    want = recall_at_k(sims, torch.tensor(demo_test_split(root).txt2img))
    assert all(metrics[k] == pytest.approx(want[k]) for k in metric_keys)
    beside = root / "run" / "eval_demo_test.json"  # beside the checkpoint
    assert metric_keys <= set(json.load(open(beside))["metrics"])


def test_default_json_path_and_no_overwrite_of_foreign_files(setup, eval_script, metric_keys,
                                                              tmp_path, monkeypatch):
    root, weights = setup
    monkeypatch.chdir(tmp_path)
    args = ["--dataset", "demo", "--data-root", str(root / "data"), "--zero-shot",
            "--clip", weights, "--workers", "0", "--device", "cpu"]
    eval_script.main(args)
    written = tmp_path / "results" / "zeroshot_tiny_demo_test.json"
    assert metric_keys <= set(json.load(open(written))["metrics"])
    eval_script.main(args + ["--split", "val"])  # its own file again: replaced without complaint
    eval_script.main(args)
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    with pytest.raises(FileExistsError, match="notes.json"):
        eval_script.main(args + ["--json", str(foreign)])
    assert foreign.read_text() == '{"mine": 1}'


def test_missing_checkpoint_is_named(setup, eval_script):
    root, _ = setup
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        eval_script.main(["--dataset", "demo", "--data-root", str(root / "data"),
                          "--checkpoint", "nope.pt"])


def test_unreadable_or_foreign_checkpoints_are_named(setup, eval_script, tmp_path):
    root, weights = setup
    args = ["--dataset", "demo", "--data-root", str(root / "data"), "--clip", weights,
            "--checkpoint"]
    truncated = tmp_path / "best.pt"
    truncated.write_bytes(open(weights, "rb").read()[:1000])  # e.g. a copy cut short
    with pytest.raises(ValueError, match="best.pt is not a readable checkpoint"):
        eval_script.main(args + [str(truncated)])
    # a CLIP state dict, not a run's best.pt
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        eval_script.main(args + [weights])


def test_several_datasets_give_one_row_each(setup, two_datasets, eval_script, tmp_path, capsys):
    _, weights = setup
    common = ["--data-root", two_datasets[0], "--zero-shot", "--clip", weights]
    both = eval_script.main(["--dataset", "rsitmd", "rsicd", *common,
                             "--json", str(tmp_path / "both.json")])
    printed = capsys.readouterr().out.splitlines()
    rows = [line.split()[:2] for line in printed if line.count("|") == 2]
    assert rows[1:] == [["rsitmd", "test"], ["rsicd", "test"]]
    alone = eval_script.main(["--dataset", "rsicd", *common, "--json", str(tmp_path / "one.json")])
    assert set(both) == {"rsitmd", "rsicd"} and both["rsicd"] == alone  # same split, same batches
    saved = json.load(open(tmp_path / "both.json"))
    assert saved["metrics"] == both and saved["n_images"] == {"rsitmd": 8, "rsicd": 8}
    with pytest.raises(ValueError, match="--visualize describe one dataset"):
        eval_script.main(["--dataset", "rsitmd", "rsicd", *common,
                          "--visualize", str(tmp_path / "v.png")])
