"""Shared fixtures: tiny CLIP models built in the test (no downloads)."""
import pytest
import torch

from mrs_adapter.clip import CLIP


def make_tiny_clip(seed: int = 0, embed_dim: int = 32, image_resolution: int = 32, vision_layers: int = 2,
                   vision_width: int = 64, vision_patch_size: int = 8, context_length: int = 77,
                   vocab_size: int = 49408, transformer_width: int = 64, transformer_layers: int = 2) -> CLIP:
    """A randomly initialised CLIP small enough for CPU tests; heads = width // 64, as build_model reads them."""
    torch.manual_seed(seed)
    model = CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
                 vocab_size, transformer_width, max(1, transformer_width // 64), transformer_layers)
    return model.eval()


@pytest.fixture
def tiny_clip() -> CLIP:
    return make_tiny_clip()
