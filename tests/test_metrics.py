"""recall_at_k against a brute-force sort-per-query reference, hand-built cases, and the encoding
loop."""
import time

import pytest
import torch

from mrs_adapter.metrics import (
    chance_recall,
    encode_dataset,
    evaluate,
    recall_at_k,
    retrieval_ranks,
)


def reference_ranks(sims, txt2img):
    """Sort every query's candidates (score descending; on a tie the WRONG item first) and read off
    the position of the first correct one: the documented pessimistic tie rule, written as loops."""
    n_img, n_cap = sims.shape
    i2t, t2i = [], []
    for i in range(n_img):
        order = sorted(range(n_cap), key=lambda j: (-sims[i, j].item(), txt2img[j] == i))
        i2t.append(min(pos for pos, j in enumerate(order) if txt2img[j] == i))
    for j in range(n_cap):
        order = sorted(range(n_img), key=lambda i: (-sims[i, j].item(), i == txt2img[j]))
        t2i.append(order.index(txt2img[j]))
    return i2t, t2i


def reference_recalls(sims, txt2img, ks=(1, 5, 10)):
    i2t, t2i = reference_ranks(sims, txt2img)
    out = {f"i2t_r{k}": 100 * sum(r < k for r in i2t) / len(i2t) for k in ks}
    out.update({f"t2i_r{k}": 100 * sum(r < k for r in t2i) / len(t2i) for k in ks})
    out["mR"] = sum(out.values()) / 6
    return out


def captions_of(counts):
    return [i for i, c in enumerate(counts) for _ in range(c)]


@pytest.mark.parametrize("counts", [[5] * 12, [1, 7, 3, 5, 2, 5, 4, 1, 6], [5] * 3, [2] * 15])
@pytest.mark.parametrize("integer_scores", [False, True])  # small integers: ties everywhere
def test_matches_brute_force(counts, integer_scores):
    g = torch.Generator().manual_seed(len(counts) + integer_scores)
    txt2img = captions_of(counts)
    shape = (len(counts), len(txt2img))
    if integer_scores:
        sims = torch.randint(0, 3, shape, generator=g).float()
    else:
        sims = torch.randn(shape, generator=g)
    got = recall_at_k(sims, torch.tensor(txt2img))
    want = reference_recalls(sims, txt2img)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    i2t, t2i = retrieval_ranks(sims, torch.tensor(txt2img))
    assert (i2t.tolist(), t2i.tolist()) == reference_ranks(sims, txt2img)


def test_perfect_and_constant_matrices():
    txt2img = torch.tensor(captions_of([5] * 20))
    perfect = (txt2img[None, :] == torch.arange(20)[:, None]).float()  # own captions 1, others 0
    m = recall_at_k(perfect, txt2img)
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")
    assert all(m[k] == 100 for k in keys)
    assert m["i2t_medr"] == m["t2i_medr"] == 1
    # constant similarity: every wrong item ties with the correct one and is ranked first
    m = recall_at_k(torch.full((20, 100), 0.3), txt2img)
    assert m["mR"] == 0
    assert m["i2t_medr"] == 96 and m["t2i_medr"] == 20  # 95 wrong captions / 19 wrong images ahead


def test_designed_ranks():
    # one caption per image; correct pairs score 0.5, S[i, j] = 1 above the diagonal. Caption j then
    # has j wrong images ahead of its own (t2i rank j) and image i has 9 - i wrong captions ahead.
    sims = torch.triu(torch.ones(10, 10), diagonal=1) + 0.5 * torch.eye(10)
    m = recall_at_k(sims, torch.arange(10))
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"]) == (10, 50, 100)
    assert (m["t2i_r1"], m["t2i_r5"], m["t2i_r10"]) == (10, 50, 100)
    assert m["mR"] == pytest.approx(160 / 3)
    assert m["t2i_medr"] == 5  # 0-based ranks 0..9: median 4.5 -> floor 4 -> 1-based 5


def test_image_rank_uses_its_best_caption():
    # image 0 owns captions 0 and 1: caption 0 is last, caption 1 first -> i2t rank 0
    sims = torch.tensor([[0.0, 0.9, 0.5, 0.4], [0.2, 0.1, 0.8, 0.7]])
    i2t, t2i = retrieval_ranks(sims, torch.tensor([0, 0, 1, 1]))
    assert i2t.tolist() == [0, 0]
    assert t2i.tolist() == [1, 0, 0, 0]  # caption 0 scores 0.2 on image 1 > 0.0 on its own


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="without any caption"):
        recall_at_k(torch.rand(3, 4), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="one entry per caption"):
        recall_at_k(torch.rand(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((2, 2), float("nan")), torch.tensor([0, 1]))


def test_rsicd_size_is_fast():
    txt2img = torch.tensor(captions_of([5] * 1093))
    sims = torch.randn(1093, 5465)
    start = time.time()
    m = recall_at_k(sims, txt2img)
    assert time.time() - start < 2.0
    assert m["t2i_r10"] < 5  # random scores: about 10 / 1093 = 0.9%


def test_chance_recall_is_the_mean_of_random_scores():
    txt2img = torch.tensor(captions_of([1, 7, 3, 5, 2, 5]))
    g = torch.Generator().manual_seed(0)
    runs = [recall_at_k(torch.rand(6, 23, generator=g), txt2img) for _ in range(1000)]
    chance = chance_recall(txt2img)
    for key, value in chance.items():
        assert sum(r[key] for r in runs) / len(runs) == pytest.approx(value, abs=2.5), key
    assert chance["t2i_r5"] == pytest.approx(500 / 6) and chance["t2i_r10"] == 100
    # image first with probability c / 23; the c sum to 23
    assert chance["i2t_r1"] == pytest.approx(100 / 6)


class OneHot(torch.nn.Module):
    """A stand-in for CLIP: image x -> x, caption t -> one-hot of t[0]; so image i matches
    caption 'i'."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.9)  # must be off during evaluation

    def encode_image(self, x):
        return self.dropout(x)

    def encode_text(self, t):
        return self.dropout(torch.nn.functional.one_hot(t[:, 0], 6).float()) * 3


def test_evaluate_encodes_in_eval_mode_and_restores_mode():
    model = OneHot().train()
    images = [torch.eye(6)[:4], torch.eye(6)[4:]]  # two batches: images 0..5
    txt2img = captions_of([2] * 6)
    captions = [torch.tensor(txt2img)[:, None].repeat(1, 3)]
    img, txt = encode_dataset(model, images, captions, "cpu")
    assert img.shape == (6, 6) and txt.shape == (12, 6)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(12))  # L2-normalised
    assert model.training  # mode restored
    # tuple batches work too
    m = evaluate(model, images, [(c, None) for c in captions], txt2img, "cpu")
    assert m["mR"] == 100


def test_encode_matches_direct_forward(tiny_clip):
    from mrs_adapter.tokenizer import tokenize
    images = torch.randn(5, 3, 32, 32)
    tokens = tokenize(["a red roof", "two planes", "a river"])
    img, txt = encode_dataset(tiny_clip, [images[:3], images[3:]], [tokens], "cpu")
    with torch.no_grad():
        want = torch.nn.functional.normalize(tiny_clip.encode_image(images), dim=-1)
    assert torch.allclose(img, want, atol=1e-5)
    assert not img.requires_grad and txt.shape == (3, 32)
