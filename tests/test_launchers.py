"""Every method under two gloo processes (torchrun's setting) equals one process on the global
batch; train.py's launch-time checks (zero_shot refused, cuda:N made current, capture mode)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import train
from mrs_adapter.methods import METHODS

# (method, objective): every method that trains, with HMMC; `full` also with InfoNCE, the one
# objective that reads logit_scale (so there it trains too)
CASES = [(m, "hmmc") for m in sorted(METHODS) if m != "zero_shot"] + [("full", "info_nce")]
WORLD, BATCH, STEPS = 2, 8, 2


def problem(weights: str, method: str, objective: str):
    """(model as train.py builds it, moved off its initial values, in eval mode so no dropout
    differs between processes; images; tokens): the same in every process."""
    argv = ["--dataset", "demo", "--clip", weights, "--method", method, "--objective", objective,
            "--device", "cpu"]
    run = train.setup(train.get_parser().parse_args(argv))
    torch.manual_seed(0)  # the methods' new modules draw their initial values
    model = train.build_model(run, verbose=False)[0].eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised up layers would give their down layers no gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    images = torch.randn(BATCH, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 49000, (BATCH, 77), generator=g)
    tokens[:, 12:] = 0
    tokens[:, 11] = 49407
    return model, images, tokens


def two_steps(model, images, tokens, objective: str, distributed: bool) -> dict:
    """Losses and trainable gradients of two Adam steps (DDP used to stop at the second)."""
    settings = dict(objective=objective, margin=0.2, loss_weights=(1.0, 1.0, 1.0), amp_dtype=None)
    views = train.Views(model, 0.0, both_views=objective == "hmmc")
    views = DistributedDataParallel(views) if distributed else views
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    out = {"losses": [], "grads": []}
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = train.forward_backward(views, model, images, tokens, scaler, **settings)
        out["losses"].append(loss.detach())
        out["grads"].append({n: p.grad.clone() for n, p in trainable.items()})
        optimizer.step()
    return out


def worker(rank: int, weights: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank,
                            world_size=WORLD)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)  # this rank's share
    results = {}
    for method, objective in CASES:
        model, images, tokens = problem(weights, method, objective)
        results[method, objective] = two_steps(model, images[rows], tokens[rows], objective, True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_every_method_trains_under_two_processes_as_one_process_on_the_global_batch(
        make_tiny_clip, tmp_path):
    weights = str(tmp_path / "tiny.pt")
    torch.save(make_tiny_clip().state_dict(), weights)
    mp.spawn(worker, args=(weights, str(tmp_path)), nprocs=WORLD, join=True)  # one pair for all
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for method, objective in CASES:
        want = two_steps(*problem(weights, method, objective), objective, distributed=False)
        learning = [g.abs().max() > 0 for g in want["grads"][1].values()]
        assert sum(learning) >= 0.8 * len(learning), method  # not zeros compared (ReLUs may die)
        read = any(n.endswith("logit_scale") for n in want["grads"][0])
        assert read == (objective == "info_nce"), method  # trained where the objective reads it
        for got in (r[method, objective] for r in ranks):
            assert set(got["grads"][0]) == set(want["grads"][0]), method
            for step in range(STEPS):
                loss = torch.allclose(got["losses"][step], want["losses"][step], atol=1e-5)
                assert loss, (method, objective, step)
                for name, grad in want["grads"][step].items():  # row noise ~1e-6, defects >= 1e-2
                    close = torch.allclose(got["grads"][step][name], grad, rtol=1e-4, atol=1e-5)
                    assert close, (method, objective, step, name)


def test_zero_shot_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="zero_shot trains nothing.*eval.py --zero-shot"):
        train.main(["--dataset", "demo", "--method", "zero_shot", "--output", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("device, current", [("cuda:1", "cuda:1"), ("cuda", None), ("cpu", None)])
def test_a_single_process_on_cuda_n_makes_it_current_first(device, current, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # two GPUs, here or not
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = train.get_parser().parse_args(["--dataset", "demo", "--device", device])
    train.setup(args)
    assert calls == ([current] if current else [])


def test_the_step_is_recorded_in_a_mode_other_threads_cannot_break(fixed_problem, adam_step,
                                                                   monkeypatch):
    """The pin-memory thread keeps calling CUDA while the step is recorded: the capture must reject
    unsafe calls of the recording thread only. (The recording itself: test_cuda_graph.py, GPU.)"""
    from mrs_adapter.run import cuda_graph
    modes = []

    class Capture:  # stands in for torch.cuda.graph on the CPU: runs the step, notes the mode
        def __init__(self, graph, capture_error_mode="global"):
            modes.append(capture_error_mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    model, images, tokens = fixed_problem()
    _, optimizer, step = adam_step(model)
    cuda_graph.GraphedStep(step, optimizer, images, tokens)
    assert modes == ["thread_local"]


def test_full_batches_replay_a_recording_made_again_when_the_lr_changes(monkeypatch, capsys):
    """GraphedOrEager (train.py's step dispatch): a full batch replays the recording, made at the
    first full batch and again when the lr changes; a smaller batch, a run without graphs and a
    run whose recording failed take the eager step."""
    from mrs_adapter.run import cuda_graph
    recordings, eager = [], []

    class Recording:  # stands in for GraphedStep on the CPU
        def __init__(self, step, optimizer, images, tokens):
            if fail:
                raise RuntimeError("capture failed")
            self.lr = optimizer.param_groups[0]["lr"]
            recordings.append(self.lr)

        def __call__(self, images, tokens):
            return "replayed", {}

    def step(images, tokens):
        eager.append(images.shape[0])
        return "eager", {}

    monkeypatch.setattr(cuda_graph, "GraphedStep", Recording)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    full, small, tokens = torch.zeros(4, 3), torch.zeros(3, 3), torch.zeros(4, 5)
    fail, steps = False, cuda_graph.GraphedOrEager(enabled=True, batch_size=4)
    assert [steps(step, optimizer, x, tokens)[0] for x in (full, full, small, full)] == [
        "replayed", "replayed", "eager", "replayed"]
    assert recordings == [1e-3] and eager == [3]
    optimizer.param_groups[0]["lr"] = 7e-4
    assert steps(step, optimizer, full, tokens)[0] == "replayed" and recordings == [1e-3, 7e-4]
    off = cuda_graph.GraphedOrEager(enabled=False, batch_size=4)
    assert off(step, optimizer, full, tokens)[0] == "eager" and len(recordings) == 2
    fail, broken = True, cuda_graph.GraphedOrEager(enabled=True, batch_size=4)
    assert [broken(step, optimizer, full, tokens)[0] for _ in range(2)] == ["eager", "eager"]
    assert capsys.readouterr().out.count("warning: recording the training step") == 1
