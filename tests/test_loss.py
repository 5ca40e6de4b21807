"""HMMC, its max-violation hinge and InfoNCE against plain double-loop references
(docs/method.md §3)."""
import math

import pytest
import torch

from mrs_adapter.loss import hmmc_loss, info_nce, max_violation_hinge


def cosine(u, v):
    return float(u @ v) / (float(u.norm()) * float(v.norm()))


def reference_hinge(a, b, margin):
    """H(a, b) of docs/method.md §3 written out with Python loops over pairs."""
    B = a.shape[0]
    S = [[cosine(a[i], b[j]) for j in range(B)] for i in range(B)]
    total = 0.0
    for i in range(B):  # a_i as the anchor, hardest b_j
        hinges = [max(0.0, margin - S[i][i] + S[i][j]) for j in range(B) if j != i]
        total += max(hinges, default=0.0)
    for j in range(B):  # b_j as the anchor, hardest a_i
        hinges = [max(0.0, margin - S[j][j] + S[i][j]) for i in range(B) if i != j]
        total += max(hinges, default=0.0)
    return total


def reference_info_nce(img, txt, logit_scale):
    """Symmetric cross-entropy with the log-softmax written out row by row."""
    scale = math.exp(logit_scale)
    B = img.shape[0]
    logits = [[scale * cosine(img[i], txt[j]) for j in range(B)] for i in range(B)]

    def ce(rows):
        losses = [math.log(sum(math.exp(x) for x in row)) - row[k] for k, row in enumerate(rows)]
        return sum(losses) / len(rows)

    columns = [[logits[i][j] for i in range(B)] for j in range(B)]
    return (ce(logits) + ce(columns)) / 2


def features(B, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("B", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("margin", [0.0, 0.2, 0.5])
def test_hmmc_matches_double_loop_reference(B, margin):
    v, t, v_aug, t_aug = features(B, seed=B)
    expected = [reference_hinge(v, t, margin), reference_hinge(v, v_aug, margin),
                reference_hinge(t, t_aug, margin)]
    total, terms = hmmc_loss(v, t, v_aug, t_aug, margin=margin, return_terms=True)
    assert list(terms) == ["image_text", "image_image", "text_text"]
    for term, ref in zip(terms.values(), expected):
        assert term.item() == pytest.approx(ref, abs=1e-10)
    assert total.item() == pytest.approx(sum(expected), abs=1e-10)
    weighted = hmmc_loss(v, t, v_aug, t_aug, margin=margin, weights=(0.5, 2.0, 3.0))
    want = 0.5 * expected[0] + 2 * expected[1] + 3 * expected[2]
    assert weighted.item() == pytest.approx(want, abs=1e-10)


def test_hinge_sums_over_batch_and_uses_hardest_negative():
    # Unit vectors with S = a @ b^T = [[1, 0, .6], [0, 1, .8], [.6, .8, 1]] (a = b).
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    # Hardest negatives: a_0 -> b_2 (0.6), a_1 -> b_2 (0.8), a_2 -> b_1 (0.8); the same by columns.
    # With margin 0.5 the hinges are 0.1, 0.3, 0.3 per direction: H = 2 * 0.7. The mean would be
    # 0.7 / 3.
    assert max_violation_hinge(a, a.clone(), margin=0.5).item() == pytest.approx(1.4)
    # A second copy of the batch in orthogonal dimensions adds no active hinge (cross cosines
    # 0 < 1 - 0.5), so the loss doubles: a sum over the batch, not a mean.
    doubled = torch.block_diag(a, a)  # (6, 4)
    assert max_violation_hinge(doubled, doubled.clone(), margin=0.5).item() == pytest.approx(2.8)


def test_batch_of_one_is_zero_with_finite_zero_gradient():
    a = torch.randn(1, 8, requires_grad=True)
    b = torch.randn(1, 8, requires_grad=True)
    loss = max_violation_hinge(a, b, margin=0.2)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
    total = hmmc_loss(a, b, a.detach() + 1, b.detach() - 1)
    assert total.item() == 0.0 and torch.isfinite(total)


def test_hinge_is_symmetric_in_its_two_directions():
    a, b, _, _ = features(6, seed=3)
    # H sums both directions, so swapping the arguments swaps the two sums and leaves H unchanged.
    h = max_violation_hinge(a, b).item()
    assert h == pytest.approx(max_violation_hinge(b, a).item(), abs=1e-12)
    # ...and it is scale invariant (cosine similarity).
    assert max_violation_hinge(3 * a, b).item() == pytest.approx(h, abs=1e-12)


def test_hmmc_and_hinge_pass_gradcheck():
    v, t, v_aug, t_aug = [x.requires_grad_() for x in features(5, D=6, seed=7)]
    # some hinges are active, so the check is meaningful
    assert hmmc_loss(v, t, v_aug, t_aug).item() > 0
    assert torch.autograd.gradcheck(lambda a, b: max_violation_hinge(a, b, 0.2), (v, t))
    def weighted(*x):
        return hmmc_loss(*x, weights=(1.0, 0.5, 2.0))
    assert torch.autograd.gradcheck(weighted, (v, t, v_aug, t_aug))


def test_wrong_number_of_weights_is_refused():
    v, t, v_aug, t_aug = features(3)
    with pytest.raises(ValueError, match="3 numbers"):
        hmmc_loss(v, t, v_aug, t_aug, weights=(1.0, 1.0))


@pytest.mark.parametrize("B", [1, 4, 9])
def test_info_nce_matches_reference(B):
    img, txt, _, _ = features(B, seed=B + 100)
    for log_scale in (0.0, math.log(1 / 0.07)):
        got = info_nce(img, txt, torch.tensor(log_scale, dtype=torch.float64))
        assert got.item() == pytest.approx(reference_info_nce(img, txt, log_scale), abs=1e-9)
    want = reference_info_nce(img, txt, 1.5)
    assert info_nce(img, txt, 1.5).item() == pytest.approx(want, abs=1e-9)


def test_info_nce_gradient_reaches_logit_scale():
    img, txt, _, _ = [x.float() for x in features(4, seed=5)]
    logit_scale = torch.nn.Parameter(torch.tensor(2.0))
    info_nce(img, txt, logit_scale).backward()
    assert logit_scale.grad is not None and logit_scale.grad.item() != 0.0
