"""Retrieval metrics: R@1/5/10 both ways and their mean mR (Tables II-IV; docs/method.md §6).

Every test image is embedded once and every caption once;
S[i, j] is the cosine similarity of image i and caption j.
- image -> text ranks an image by its best-placed own caption;
- text -> image ranks each caption's own image;
- mR is the mean of the six recalls (the paper's Tables II-IV).
Ties are resolved pessimistically (see `retrieval_ranks`).
Imports only torch and the stdlib, so this file can be copied into another project on its own.
"""
import math
from typing import Dict, Iterable, Sequence, Tuple

import torch
import torch.nn.functional as F


def retrieval_ranks(sims: torch.Tensor, txt2img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """sims (N_img, N_cap), txt2img (N_cap,) -> ranks i2t (N_img,), t2i (N_cap,), 0-based.

    The rank of the correct item; 0 = retrieved first.
    txt2img[j] is the index of caption j's image; an image may own any number (>= 1) of captions.
    Tie rule (pessimistic, deterministic, independent of the order of the items):
    every WRONG item whose score is >= the correct score is ranked before it. So
    - rank = the number of wrong items scoring at least as high as the best correct one;
    - a constant similarity matrix retrieves nothing at R@1 instead of everything;
    - ties among an image's own captions do not matter (only the best own caption counts).
    """
    if sims.dim() != 2:
        raise ValueError(f"sims must be (N_img, N_cap), got shape {tuple(sims.shape)}")
    n_img, n_cap = sims.shape
    txt2img = torch.as_tensor(txt2img, dtype=torch.long, device=sims.device)
    if txt2img.shape != (n_cap,):
        raise ValueError(f"txt2img must have one entry per caption ({n_cap}), "
                         f"got shape {tuple(txt2img.shape)}")
    if n_cap and (txt2img.min() < 0 or txt2img.max() >= n_img):
        raise ValueError(f"txt2img holds image indices outside [0, {n_img})")
    if torch.isnan(sims).any():
        raise ValueError("sims contains NaN")
    counts = torch.bincount(txt2img, minlength=n_img)
    if (counts == 0).any():
        alone = torch.nonzero(counts == 0).flatten()[:10].tolist()
        raise ValueError(f"images without any caption: {alone}")
    sims = sims.float()
    own = txt2img[None, :] == torch.arange(n_img, device=sims.device)[:, None]  # (N_img, N_cap)

    # text -> image: the caption's own image against all others (only one correct item)
    correct = sims[txt2img, torch.arange(n_cap, device=sims.device)]  # (N_cap,)
    t2i = (sims >= correct[None, :]).sum(0) - 1  # minus the correct image itself

    # image -> text: the best own caption against every caption of other images
    best = sims.masked_fill(~own, -math.inf).amax(1)  # (N_img,)
    i2t = ((sims >= best[:, None]) & ~own).sum(1)
    return i2t, t2i


def _median_rank(ranks: torch.Tensor) -> float:
    # 1-based, as in VSE++: floor of the median 0-based rank (mean of the middle two), plus one
    return float(math.floor(torch.quantile(ranks.double(), 0.5).item()) + 1)


def recall_at_k(sims: torch.Tensor, txt2img: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """sims (N_img, N_cap), txt2img (N_cap,) long -> {metric: value}: R@K (%), mR, median ranks.

    - `i2t_r{k}`: the percentage of IMAGES with an own caption in the top k;
    - `t2i_r{k}`: the percentage of CAPTIONS whose image is in the top k;
    - `mR`: the mean of all those recalls;
    - `i2t_medr`, `t2i_medr`: 1-based median ranks.
    """
    i2t, t2i = retrieval_ranks(sims, txt2img)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
    out["mR"] = sum(out.values()) / len(out)
    out["i2t_medr"], out["t2i_medr"] = _median_rank(i2t), _median_rank(t2i)
    return out


def chance_recall(txt2img: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """txt2img (N_cap,) -> {metric: %}: the expected `recall_at_k` of random, tie-free scores.

    The floor a model must beat.
    - t2i: the own image is equally likely at any of N_img ranks, so R@K = K / N_img.
    - i2t: an image with c of the N_cap captions misses the top K
      with probability C(N_cap - c, K) / C(N_cap, K).
    """
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    counts = torch.bincount(txt2img).tolist()
    n_img, n_cap = len(counts), len(txt2img)
    out = {f"i2t_r{k}": 100.0 * sum(1 - math.comb(n_cap - c, k) / math.comb(n_cap, k)
                                    for c in counts) / n_img
           for k in ks}
    out.update({f"t2i_r{k}": 100.0 * min(k, n_img) / n_img for k in ks})
    out["mR"] = sum(out.values()) / len(out)
    return out


METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")


def format_table(rows: Sequence[tuple]) -> str:
    """[(name, metrics[, std])] -> the paper's table layout: a header, then one line a row.

    Columns: i2t R@1 R@5 R@10 | t2i R@1 R@5 R@10 | mR,
    each value with +- its std when std is given.
    """
    lines = [f"{'':<28} i2t R@1, R@5, R@10 | t2i R@1, R@5, R@10 | mR"]
    for name, metrics, *std in rows:
        std = std[0] if std else None
        cells = [f"{metrics[k]:6.2f}" + (f" +- {std[k]:4.2f}" if std else "") for k in METRICS]
        lines.append(f"{name:<28} {' '.join(cells[:3])} | {' '.join(cells[3:6])} | {cells[6]}")
    return "\n".join(lines)


def _first(batch):
    # loaders may yield a tensor or a tuple whose first element is the input
    return batch[0] if isinstance(batch, (list, tuple)) else batch


AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision: autocast


@torch.no_grad()
def encode_batches(encode, loader: Iterable, device: torch.device, amp_dtype) -> torch.Tensor:
    """Batches -> (N, E): `encode` of every batch of `loader`, L2-normalised, fp32, concatenated."""
    chunks = []
    for batch in loader:
        x = _first(batch).to(device, non_blocking=True)
        # bf16 autocast on CUDA only; the CPU path stays fp32 (and bit-reproducible)
        autocast = device.type == "cuda" and amp_dtype is not None
        with torch.autocast("cuda", dtype=amp_dtype, enabled=autocast):
            chunks.append(F.normalize(encode(x).float(), dim=-1))
    return torch.cat(chunks)


def encode_dataset(model: torch.nn.Module, image_loader: Iterable, caption_loader: Iterable, device,
                   amp_dtype=torch.bfloat16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Model, image and caption loaders -> (N_img, E), (N_cap, E), L2-normalised, fp32.

    Each image and each caption is encoded once.
    `model` has `encode_image` / `encode_text` (CLIP, with or without adapters).
    It runs in eval mode (dropout off) under no_grad; its previous train/eval mode is restored.
    `amp_dtype`: the autocast dtype used on CUDA (None: fp32); ignored on CPU.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        img = encode_batches(model.encode_image, image_loader, device, amp_dtype)
        txt = encode_batches(model.encode_text, caption_loader, device, amp_dtype)
    finally:
        model.train(was_training)
    return img, txt


def evaluate(model: torch.nn.Module, image_loader: Iterable, caption_loader: Iterable, txt2img,
             device, amp_dtype=torch.bfloat16, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Model, loaders, txt2img (N_cap,) -> `recall_at_k`'s metrics (docs/method.md §6).

    On the cosine similarities of `encode_dataset`'s embeddings.
    """
    img, txt = encode_dataset(model, image_loader, caption_loader, device, amp_dtype)
    txt2img = torch.as_tensor(txt2img, dtype=torch.long)
    if len(txt) != len(txt2img):
        raise ValueError(f"encoded {len(txt)} captions, but txt2img lists {len(txt2img)}")
    return recall_at_k(img @ txt.t(), txt2img.to(img.device), ks)
