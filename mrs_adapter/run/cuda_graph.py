"""Training step -> a CUDA graph recorded once, replayed for each batch: same math, less launching.

Why: at the recipe's batch of 16 pairs, a ViT-B/32 step
(both towers, two views, backward, Adam) is a few thousand small kernels,
and launching them one by one from Python takes longer than running them
(speed_bench.py measured ~70 ms per step on an H200).
- `GraphedStep` records forward, loss, backward and optimizer step once,
  after a few warm-up steps whose effect is undone,
  and replays the recording for every batch of the same shape.
- `GraphedOrEager` is how train.py calls its step on a single CUDA device:
  replayed for full batches, eager for the rest.
"""
import contextlib
from typing import Callable, Dict, List, Tuple

import torch


def _state_of(optimizer: torch.optim.Optimizer) -> Tuple[List[torch.Tensor], Dict]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
             for p in params if p in optimizer.state}
    return [p.detach().clone() for p in params], state


@torch.no_grad()
def _restore(optimizer: torch.optim.Optimizer, saved: Tuple[List[torch.Tensor], Dict]):
    """(optimizer, saved) -> None: parameters and optimizer state put back in place.

    - Same tensors, so the recorded addresses stay valid.
    - State the warm-up created is zeroed: zero moments and step 0 are a fresh Adam state.
    """
    values, state = saved
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p, v in zip(params, values):
        p.copy_(v)
    for p in params:
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):
                v.copy_(state[p][k]) if p in state else v.zero_()


def warm_up(step: Callable, optimizer: torch.optim.Optimizer, inputs: List[torch.Tensor],
            steps: int = 3):
    """(step, optimizer, inputs) -> None: `step(*inputs)` run a few times, then every change undone.

    - The runs create the optimizer state and let libraries pick kernels.
    - Every change to the parameters and the optimizer state is then undone.
    """
    saved = _state_of(optimizer)
    cuda = inputs[0].is_cuda
    side = torch.cuda.Stream() if cuda else None
    if cuda:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            step(*inputs)
    if cuda:
        torch.cuda.current_stream().wait_stream(side)
    _restore(optimizer, saved)


class GraphedStep:
    """`step(*inputs) -> (loss, terms)`, forward, backward and optimizer.step() included, recorded.

    - The optimizer must be built with capturable=True.
    - Its learning rate is part of the recording: record again when it changes.
    - Calls must pass inputs of the recorded shapes.
    """

    def __init__(self, step: Callable, optimizer: torch.optim.Optimizer, *example: torch.Tensor):
        self.inputs = [x.clone() for x in example]  # the fixed buffers the recording reads
        self.lr = optimizer.param_groups[0]["lr"]
        warm_up(step, optimizer, self.inputs)
        self.graph = torch.cuda.CUDAGraph()
        # the recorded backward allocates (and then rewrites) the grads
        optimizer.zero_grad(set_to_none=True)
        # thread_local: only this thread's unsafe CUDA calls abort the recording. The default
        # ("global") also aborts it when another thread, e.g. the DataLoader's pin-memory thread
        # allocating pinned memory for the next batch, makes one while we record.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.loss, self.terms = step(*self.inputs)

    def __call__(self, *inputs: torch.Tensor):
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        # the outputs live in the recording's memory and are overwritten by the next replay
        return self.loss.clone(), {k: v.clone() for k, v in self.terms.items()}


class GraphedOrEager:
    """`self(step, optimizer, images, tokens) -> (loss, terms)`: one step, replayed or eager.

    - Replayed from a recording for full batches when `enabled`;
      run eagerly (zero_grad, then `step`) otherwise.
    - The recording is made at the first full batch,
      and again when the learning rate changes (it is part of the recording).
    - The last, smaller batch of an epoch runs eagerly.
    - A recording that fails turns recording off for the rest of the run, with a warning.
    """

    def __init__(self, enabled: bool, batch_size: int):
        self.graphs = {} if enabled else None
        self.batch_size = batch_size

    def __call__(self, step: Callable, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                 tokens: torch.Tensor):
        graphed = self.recorded(step, optimizer, images, tokens)
        if graphed is not None:
            return graphed(images, tokens)
        optimizer.zero_grad(set_to_none=True)
        return step(images, tokens)

    def recorded(self, step, optimizer, images, tokens):
        """(step, optimizer, images, tokens) -> the GraphedStep for this batch, or None.

        None for other batch sizes, when not enabled, or after a recording failed.
        """
        graphs = self.graphs
        if graphs is None or graphs.get("failed") or images.shape[0] != self.batch_size:
            return None
        if "step" not in graphs or graphs["step"].lr != optimizer.param_groups[0]["lr"]:
            graphs.pop("step", None)  # frees the previous recording first
            try:
                graphs["step"] = GraphedStep(step, optimizer, images, tokens)
            except RuntimeError as e:
                graphs["failed"] = True
                print(f"warning: recording the training step as a CUDA graph failed ({e}); "
                      f"continuing without")
                return None
        return graphs["step"]
