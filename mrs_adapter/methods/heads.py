"""Trainable heads on CLIP's output embeddings, for linear probe and CLIP-Adapter.

model.py has no module after the projections:
`ln_post(x[:, 0]) @ proj` and `text_head` end in a bare matrix product.
So these methods compose one level up: `CLIPWithHeads` holds the frozen CLIP and a head per
tower, `e'_m = head_m(e_m)`, and offers the same encode functions,
which call the frozen CLIP's own and apply the head to what they return.
Not a method itself.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class CLIPWithHeads(nn.Module):
    """Images, token ids -> embeddings (B, E): a frozen CLIP (`self.clip`) and a head per tower.

    The image and text embeddings pass through `heads["image"]`, `heads["text"]`.
    Holding CLIP prefixes its tensors with `clip.` in `state_dict()`;
    checkpoints hold only the trainable tensors (`heads.*`),
    so the OpenAI archives' names are never affected.
    """

    def __init__(self, clip: nn.Module, image_head: nn.Module, text_head: nn.Module):
        super().__init__()
        self.clip = clip
        self.heads = nn.ModuleDict({"image": image_head, "text": text_head})

    # What train.py / eval.py read off a CLIP besides the encoders.
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.dtype

    def encode_image(self, image: torch.Tensor, feature_dropout: float = 0.0) -> torch.Tensor:
        """Images (B, 3, H, W) -> (B, E): CLIP's embedding, then the image head (B, E) -> (B, E)."""
        return self.heads["image"](self.clip.encode_image(image, feature_dropout))

    def encode_text(self, text: torch.Tensor, feature_dropout: float = 0.0,
                    trim: bool = True) -> torch.Tensor:
        """Token ids (B, L) -> (B, E): CLIP's embedding, then the text head."""
        return self.heads["text"](self.clip.encode_text(text, feature_dropout, trim))

    def encode_image_views(self, image: torch.Tensor,
                           feature_dropout: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) -> (clean, dropped) (B, E) each, both through the image head."""
        clean, dropped = self.clip.encode_image_views(image, feature_dropout)
        return self.heads["image"](clean), self.heads["image"](dropped)

    def encode_text_views(self, text: torch.Tensor, feature_dropout: float,
                          trim: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) -> (clean, dropped) (B, E) each, both through the text head."""
        clean, dropped = self.clip.encode_text_views(text, feature_dropout, trim)
        return self.heads["text"](clean), self.heads["text"](dropped)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B_img, 3, H, W), (B_txt, L) -> logits (B_img, B_txt) and their transpose.

        Cosine similarities scaled by exp(logit_scale), as CLIP.forward.
        """
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


def embed_dim(model: nn.Module) -> int:
    """CLIP -> the width E of its output embeddings (512 on ViT-B/32)."""
    return model.text_projection.shape[1]
