"""The hybrid multi-modal contrastive (HMMC) loss (Sec. III-C; docs/method.md §3).

Yuan et al., TGRS 2023. HMMC sums three max-violation hinge losses
(VSE++ style, hardest in-batch negative): images against texts,
images against their feature-dropout views, and texts against theirs:

    L_HMMC = H(v, t) + H(v, v') + H(t, t')

CLIP's symmetric InfoNCE is here as an alternative objective.
Pure functions: tensors in, tensors out; imports only torch and the standard library.
"""
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """S[i, j] = cos(a_i, b_j): (B, D), (B, D) -> (B, B)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


def max_violation_hinge(a: torch.Tensor, b: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """a (B, D), b (B, D) -> (): hinge on the hardest in-batch negative, both ways, summed.

        H(a, b) = sum_i max_{j != i} [margin - S(a_i, b_i) + S(a_i, b_j)]_+
                + sum_j max_{i != j} [margin - S(a_j, b_j) + S(a_i, b_j)]_+

    S is the cosine similarity.
    Row i of `a` and row i of `b` are the only positive pair;
    every other row is a negative, even one with the same content (as published).
    Batch size 1 has no negative: H = 0, with a zero gradient (finite, never NaN).
    """
    s = cosine_similarity_matrix(a, b)  # (B, B)
    positive = s.diagonal()  # (B,) S(a_i, b_i)
    # Hinges are >= 0, so setting the diagonal (j = i) to 0 is the same as leaving it out of
    # the max; for B = 1 the max then runs over that single 0.
    is_positive = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    # (B, B) a_i against b_j, then b_j against a_i
    cost_b = (margin - positive[:, None] + s).clamp(min=0).masked_fill(is_positive, 0)
    cost_a = (margin - positive[None, :] + s).clamp(min=0).masked_fill(is_positive, 0)
    return cost_b.max(dim=1).values.sum() + cost_a.max(dim=0).values.sum()


def hmmc_loss(img: torch.Tensor, txt: torch.Tensor, img_aug: torch.Tensor, txt_aug: torch.Tensor,
              margin: float = 0.2, weights: Sequence[float] = (1.0, 1.0, 1.0),
              return_terms: bool = False
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """img, txt, img_aug, txt_aug (B, D), unnormalised -> (): the HMMC loss.

        L_HMMC = w0 H(v, t) + w1 H(v, v') + w2 H(t, t')

    v = img, t = txt; v', t' = img_aug, txt_aug, the feature-dropout views of the same batch.
    The paper uses margin 0.2 and weights 1:1:1.
    return_terms=True returns (total, terms), the unweighted terms
    {"image_text", "image_image", "text_text"}, for logging.
    """
    if len(weights) != 3:
        raise ValueError(f"weights must hold 3 numbers (image_text, image_image, text_text), "
                         f"got {weights}")
    terms = {
        "image_text": max_violation_hinge(img, txt, margin),  # inter-modal
        "image_image": max_violation_hinge(img, img_aug, margin),  # intra-modal, image vs its view
        "text_text": max_violation_hinge(txt, txt_aug, margin),  # intra-modal, text vs its view
    }
    total = sum(w * term for w, term in zip(weights, terms.values()))
    return (total, terms) if return_terms else total


def info_nce(img: torch.Tensor, txt: torch.Tensor,
             logit_scale: Union[torch.Tensor, float]) -> torch.Tensor:
    """img (B, D), txt (B, D), logit_scale () -> (): CLIP's symmetric cross-entropy.

        logits = exp(logit_scale) * S(v, t)     # (B, B)
        L = (CE(logits, diag) + CE(logits^T, diag)) / 2, each a mean over the batch.

    `logit_scale` is CLIP's parameter, the log of the temperature scale
    (log 1/0.07 at initialisation), hence the exp.
    """
    if not torch.is_tensor(logit_scale):  # a plain number: keep the features' precision
        logit_scale = torch.tensor(logit_scale, dtype=img.dtype, device=img.device)
    logits = logit_scale.exp() * cosine_similarity_matrix(img, txt)  # (B_img, B_txt)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
