"""The CUDA-graphed training step equals the eager one (runs only where CUDA is available)."""
import pytest
import torch

from mrs_adapter.run.cuda_graph import GraphedStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_replayed_steps_equal_eager_steps(fixed_problem, adam_step):
    results = []
    for graphed in (False, True):
        model, images, tokens = fixed_problem()
        model = model.cuda()
        # three different batches
        batches = [(images.cuda() * s, tokens.cuda().roll(s, 0)) for s in (1, 2, 3)]
        params, optimizer, step = adam_step(model, capturable=True)
        recorded = GraphedStep(step, optimizer, *batches[0]) if graphed else None
        losses = []
        for x, t in batches:
            if recorded is None:
                optimizer.zero_grad(set_to_none=True)
            loss, _ = recorded(x, t) if recorded else step(x, t)
            losses.append(loss.item())
        results.append((losses, [p.detach().clone() for p in params]))
    (eager_losses, eager), (graph_losses, graph) = results
    assert graph_losses == pytest.approx(eager_losses, abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager, graph))
