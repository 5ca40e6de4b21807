"""A checkpoint records its method's whole configuration and eval.py rebuilds from it; eval.py's
contradictory flags are errors; the evaluation precision follows the checkpoint."""
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

import train
from mrs_adapter import clip
from mrs_adapter.checkpoint import load_trainable_state_dict, save_trainable
from mrs_adapter.methods import apply_method, method_options
from mrs_adapter.methods import mrs_adapter as mrs_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def evaluate(eval_script):
    """evaluate(demo, checkpoint, *extra) -> eval.py's metrics for the checkpoint on demo val."""
    def run(demo, checkpoint, *extra):
        return eval_script.main(["--dataset", "demo", "--data-root", demo[0], "--checkpoint",
                                 str(checkpoint), "--workers", "0", "--device", "cpu", "--split",
                                 "val", *extra])
    return run


def test_a_checkpoint_is_rebuilt_from_its_recorded_options_not_todays_constants(demo, evaluate,
                                                                                 tmp_path,
                                                                                 monkeypatch):
    root, backbone = demo
    train.main(["--dataset", "demo", "--data-root", root, "--clip", backbone, "--output",
                str(tmp_path / "run"), "--epochs", "1", "--lr", "1e-3", "--bottleneck", "32",
                "--adapter-dropout", "0.1"])
    folder = tmp_path / "run" / "seed2"
    want = {**method_options("mrs_adapter"), "bottleneck": 32, "dropout": 0.1}  # all of apply's
    with open(folder / "config.json") as f:
        assert json.load(f)["method_options"] == want
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["config"]["method_options"] == want
    before = evaluate(demo, folder / "best.pt")

    # the code changes its defaults after training: another bottleneck, per-block adapters
    monkeypatch.setattr(mrs_file, "BOTTLENECK", 16)
    monkeypatch.setattr(mrs_file, "SHARED", False)
    monkeypatch.setattr(mrs_file.apply, "__defaults__",
                        (16, mrs_file.SHARED_DIM, mrs_file.DROPOUT, False))
    todays = apply_method(clip.load(backbone)[0], "mrs_adapter", verbose=False)
    with pytest.raises(ValueError, match="does not match"):  # negative control: the defaults matter
        load_trainable_state_dict(todays, best["trainable"])
    assert evaluate(demo, folder / "best.pt") == before


def test_an_option_the_method_lacks_is_an_error_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    for method, flag, value in (("lora", "--bottleneck", "8"), ("full", "--bottleneck", "8"),
                                ("linear_probe", "--adapter-dropout", "0.3")):
        with pytest.raises(ValueError, match=f"{flag} {value}: method {method} has no"):
            train.main(["--dataset", "demo", "--method", method, flag, value, "--output", str(out)])
    assert not out.exists()
    args = Namespace(method="adaptformer", bottleneck=3, adapter_dropout=None)  # it has one
    assert train.resolve_method_options(args) == {**method_options("adaptformer"), "bottleneck": 3}


def test_an_unrecorded_option_is_an_error_not_a_default(eval_script, make_tiny_clip, tmp_path):
    model = apply_method(make_tiny_clip(), "adaptformer", verbose=False)
    path = tmp_path / "best.pt"
    options = method_options("adaptformer")
    lost = sorted(options)[-1]
    del options[lost]  # e.g. written before the configuration was recorded
    save_trainable(model, path, config={"method": "adaptformer", "method_options": options})
    with pytest.raises(ValueError, match=rf"records options .* whose apply takes .*'{lost}'"):
        eval_script.apply_checkpoint(make_tiny_clip(), torch.load(path, weights_only=True))


@pytest.mark.parametrize("objective", ["hmmc", "info_nce"])
def test_full_checkpoints_hold_logit_scale_only_where_the_objective_reads_it(objective, eval_script,
                                                                            make_tiny_clip,
                                                                            tmp_path):
    torch.save(make_tiny_clip().state_dict(), tmp_path / "tiny.pt")
    args = train.get_parser().parse_args(["--dataset", "demo", "--clip", str(tmp_path / "tiny.pt"),
                                          "--method", "full", "--objective", objective,
                                          "--device", "cpu"])
    run = train.setup(args)
    model, _, _ = train.build_model(run, verbose=False)
    options = run.method_options
    config = {"method": "full", "method_options": options, "objective": objective}
    save_trainable(model, tmp_path / "best.pt", config=config)
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ("logit_scale" in ckpt["trainable"]) == (objective == "info_nce")
    eval_script.apply_checkpoint(make_tiny_clip(), ckpt)  # strict: the same trainable set


def test_contradictory_eval_flags_are_errors(demo, eval_script, capsys):
    base = ["--dataset", "demo", "--data-root", demo[0]]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *base, "--checkpoint",
                           "x/best.pt", "--method", "zero_shot"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--method zero_shot evaluates plain CLIP, not --checkpoint x/best.pt" in proc.stderr
    for extra, message in ((["--zero-shot", "--method", "lora"], "not --method lora"),
                           ([], "one of --checkpoint or --zero-shot"),
                           (["--zero-shot", "--precision", "bf16", "--device", "cpu"],
                            "needs a CUDA --device")):
        with pytest.raises(SystemExit) as e:
            eval_script.parse_args(base + extra)
        assert e.value.code != 0 and message in capsys.readouterr().err
    assert eval_script.parse_args(base + ["--method", "zero_shot"]).zero_shot  # = --zero-shot


def test_precision_defaults_to_the_checkpoints_on_cuda_and_fp32_on_the_cpu(demo, eval_script,
                                                                            evaluate, tmp_path,
                                                                            monkeypatch):
    with monkeypatch.context() as gpu:  # a GPU, here or not: only the flags are read
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "device_count", lambda: 1)
        cuda = eval_script.parse_args(["--dataset", "demo", "--checkpoint", "x.pt", "--device",
                                       "cuda:0"])
    assert [eval_script.eval_precision(cuda, p) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    cuda.precision = "fp16"
    assert eval_script.eval_precision(cuda, "fp32") == "fp16"  # the flag wins
    # a bf16 run evaluated on the CPU: fp32, and autocast is given no dtype
    model = apply_method(clip.load(demo[1])[0], "mrs_adapter", verbose=False)
    save_trainable(model, tmp_path / "best.pt",
                   config={"method": "mrs_adapter", "clip": demo[1], "precision": "bf16",
                           "method_options": method_options("mrs_adapter")})
    seen, real = [], eval_script.encode_dataset
    monkeypatch.setattr(eval_script, "encode_dataset", lambda *a: seen.append(a[4]) or real(*a))
    evaluate(demo, tmp_path / "best.pt")
    with open(tmp_path / "eval_demo_val.json") as f:
        assert seen == [None] and json.load(f)["precision"] == "fp32"
