"""train.py end to end on the demo data with a tiny CLIP: selection, run files, resume, NaN stop,
DDP."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import train
from mrs_adapter.adapter import add_adapters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(demo, output, *extra):
    root, backbone = demo
    return train.main(["--dataset", "demo", "--data-root", root, "--clip", backbone,
                       "--output", str(output), "--epochs", "3", "--lr", "1e-3",
                       "--print-freq", "10", *extra])


def test_demo_run_selects_on_val_and_writes_the_run_folder(demo, tmp_path):
    summary = run(demo, tmp_path / "run", "--seeds", "2", "3")
    assert set(os.listdir(tmp_path / "run")) == {"results.json", "seed2", "seed3"}
    assert json.load(open(tmp_path / "run" / "results.json"))["mean"] == summary["mean"]
    for seed in (2, 3):
        folder = tmp_path / "run" / f"seed{seed}"
        run_files = ["best.pt", "config.json", "last.pt", "log.jsonl", "results.json"]
        assert sorted(os.listdir(folder)) == run_files
        log = [json.loads(line) for line in open(folder / "log.jsonl")]
        val = [r for r in log if r["kind"] == "val"]
        assert [r["epoch"] for r in val] == [0, 1, 2] and any(r["kind"] == "train" for r in log)
        result = json.load(open(folder / "results.json"))
        best = max(val, key=lambda r: r["mR"])  # selected on validation, the first best on ties
        assert result["best_epoch"] == best["epoch"] and result["val"]["mR"] == best["mR"]
        config = json.load(open(folder / "config.json"))
        assert config["seed"] == seed and config["lr"] == 1e-3 and "torch" in config["environment"]
        checkpoint = torch.load(folder / "best.pt", weights_only=True)
        model = add_adapters(train.clip.load(demo[1])[0], verbose=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(checkpoint["trainable"]) == trainable
        assert all(".adapter." in n for n in trainable)
    per_seed = [r["test"]["mR"] for r in summary["per_seed"]]
    assert per_seed[0] != per_seed[1] and summary["std"]["mR"] > 0  # the seeds really differ
    assert summary["mean"]["mR"] > 2 * summary["chance"]["mR"]
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        run(demo, tmp_path / "run")


def test_overwrite_replaces_only_run_files(demo, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "results.json").write_text("{}")
    run(demo, tmp_path / "run", "--epochs", "1", "--overwrite")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert json.load(open(tmp_path / "run" / "results.json"))["method"] == "mrs_adapter"


def test_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(demo, tmp_path, monkeypatch):
    straight = run(demo, tmp_path / "straight")
    real_epoch = train.train_one_epoch

    def crash_at_epoch_2(args, epoch, *rest):
        if epoch == 2:
            raise KeyboardInterrupt  # e.g. the job was killed after epoch 1's checkpoint
        return real_epoch(args, epoch, *rest)

    monkeypatch.setattr(train, "train_one_epoch", crash_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(demo, tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "seed2" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    resumed = run(demo, tmp_path / "resumed", "--resume")
    assert resumed["per_seed"][0]["test"] == straight["per_seed"][0]["test"]
    assert resumed["per_seed"][0]["best_epoch"] == straight["per_seed"][0]["best_epoch"]
    a = torch.load(tmp_path / "straight" / "seed2" / "last.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "resumed" / "seed2" / "last.pt", weights_only=True)["trainable"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[r for r in map(json.loads, open(tmp_path / name / "seed2" / "log.jsonl"))
             if r["kind"] == "val"] for name in ("straight", "resumed")]
    assert [r["mR"] for r in logs[0]] == [r["mR"] for r in logs[1]]


def test_non_finite_loss_stops_with_the_terms_and_keeps_the_last_checkpoint(demo, tmp_path,
                                                                            monkeypatch):
    real_loss, calls = train.hmmc_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        total, terms = real_loss(*a, **k)
        if len(calls) == 50:  # in epoch 1: each epoch has 600 pairs / 16 = 38 steps
            terms["image_text"] = terms["image_text"] * float("nan")
            total = sum(terms.values())
        return total, terms

    monkeypatch.setattr(train, "hmmc_loss", poisoned)
    expected = (r"epoch 1 step 50: non-finite loss nan \(image_text = nan, "
                r"image_image = [0-9.]+, text_text = [0-9.]+\)")
    with pytest.raises(FloatingPointError, match=expected):
        run(demo, tmp_path / "run", "--epochs", "5")
    last = torch.load(tmp_path / "run" / "seed2" / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(t).all() for t in last["trainable"].values())


def test_missing_data_fails_fast_naming_layout_and_source(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset", "rsitmd",
               "--data-root", "/nonexistent", "--output", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "/nonexistent/rsitmd_precomp" in proc.stderr
    assert "github.com/xiaoyuan1996/AMFMN" in proc.stderr
    assert not out.exists()


def test_lr_schedule_is_the_published_step_decay():
    lrs = [train.lr_at(e, lr=2e-4, decay=0.7, start=19, every=20) for e in range(45)]
    assert lrs[:19] == [2e-4] * 19 and lrs[19:39] == [pytest.approx(1.4e-4)] * 20
    assert lrs[39:] == [pytest.approx(0.98e-4)] * 6


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str, fixed_problem, loss_args):
    # the two fixtures' values come as arguments: a spawned process has no fixtures
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, images, tokens = fixed_problem()
    views = DistributedDataParallel(train.Views(model, 0.0, both_views=True))
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)  # this rank's share of the batch
    loss, _ = train.forward_backward(views, model, images[rows], tokens[rows],
                                     torch.amp.GradScaler("cuda", enabled=False), **loss_args)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"loss": loss.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_loss_and_gradients(fixed_problem, loss_args,
                                                                      tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), fixed_problem, loss_args),
             nprocs=2, join=True)
    model, images, tokens = fixed_problem()
    views = train.Views(model, 0.0, True)
    loss, _ = train.forward_backward(views, model, images, tokens,
                                     torch.amp.GradScaler("cuda", enabled=False), **loss_args)
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g.abs().max() > 0 for g in expected.values())
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-5)
        for name, grad in expected.items():
            assert torch.allclose(got["grads"][name], grad, atol=1e-5), name


def test_cuda_graph_warm_up_leaves_no_trace(fixed_problem, adam_step):
    """The warm-up before recording a CUDA graph runs real steps; their effect must be undone, so
    the first recorded step equals a plain first step (checked with the eager step on the CPU)."""
    from mrs_adapter.run.cuda_graph import warm_up
    runs = []
    for warm in (False, True):
        model, images, tokens = fixed_problem()
        params, optimizer, step = adam_step(model)
        if warm:
            before = [p.detach().clone() for p in params]
            warm_up(step, optimizer, [images, tokens], steps=2)
            assert all(torch.equal(a, b) for a, b in zip(before, params))
            moments = [v for s in optimizer.state.values() for v in s.values()]
            assert all(torch.count_nonzero(v) == 0 for v in moments)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            step(images, tokens)
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_union_drops_exactly_the_copies_and_tests_each_dataset(demo, two_datasets, tmp_path,
                                                               capsys):
    source, copies = two_datasets  # 7 copies of test images in the training pools (conftest)
    root = str(tmp_path / "data")
    shutil.copytree(source, root)

    def loaded(*argv):
        run = train.setup(train.get_parser().parse_args(["--data-root", root, *argv]))
        splits, dropped = train.load_data(run)
        kept = {os.path.basename(p) for s in ("train", "val") for p in splits[s].image_paths}
        return run, splits, kept, dropped
    run, splits, kept, dropped = loaded("--dataset", "rsitmd", "rsicd")
    assert sorted(splits) == ["test:rsicd", "test:rsitmd", "train", "val"]
    assert kept.isdisjoint(copies) and len(kept) == 40  # every original of both pools stays
    assert dropped["train"] + dropped["val"] == 7
    assert run.output == os.path.join("runs", "rsitmd+rsicd-mrs_adapter")
    assert "dropped" in capsys.readouterr().out
    _, _, kept, _ = loaded("--dataset", "rsitmd", "rsicd", "--keep-overlap")
    assert set(copies) <= kept and len(kept) == 47
    run, splits, kept, _ = loaded("--dataset", "rsicd", "--test-dataset", "rsitmd")  # transfer
    assert sorted(splits) == ["test:rsitmd", "train", "val"]
    assert kept == {f"rsicd_train_{i}.png" for i in range(20)}
    assert run.output.endswith("rsicd-to-rsitmd-mrs_adapter")
    with pytest.raises(ValueError, match="--layout / --image-dir describe one dataset"):
        loaded("--dataset", "rsitmd", "rsicd", "--layout", "precomp")
    # one epoch on the union: one test row per dataset, in the table and in results.json
    summary = train.main(["--dataset", "rsitmd", "rsicd", "--data-root", root, "--clip", demo[1],
                          "--epochs", "1", "--batch-size", "8", "--output", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    rows = [line.split()[:2] for line in printed.splitlines() if "mrs_adapter" in line.split()[1:2]]
    assert rows == [["rsitmd", "mrs_adapter"], ["rsicd", "mrs_adapter"]]
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["mean"] == summary["mean"] and set(saved["mean"]) == {"rsitmd", "rsicd"}
    assert sum(saved["dropped_overlap"].values()) == 7
    assert set(saved["per_seed"][0]["test"]) == {"rsitmd", "rsicd"}
    assert saved["chance"]["rsitmd"]["t2i_r1"] == 100 / 8  # each test split alone: 8 images, not 16
