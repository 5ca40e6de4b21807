"""Full fine-tuning: every CLIP weight trains (the paper's "full fine-tuning" row, 151M).

Configuration: all 151,277,313 parameters of ViT-B/32 trainable.
train.py then freezes `logit_scale` unless the objective is InfoNCE
(HMMC never reads it; methods.freeze_unread), and the checkpoint holds every trained tensor.
LR = 5e-6 (Adam, no weight decay), not the adapters' 2e-4; --lr overrides. Why:
- Adam moves each weight by up to about lr per step, whatever the gradient's size.
- A training item is one caption with its image: RSITMD trains on 17,160 pairs
  (3,432 images x 5 captions after the validation split), 1,073 steps of 16 an epoch.
  The recipe's 30 epochs (lr x 0.7 from epoch 19) add up to
  1,073 x (19 + 11 x 0.7) = 28,650 steps at full lr.
- At 2e-4 a weight could move by 0.21 in one epoch, 5 to 10 times the size of CLIP's weights
  (std ~0.02-0.04), and erase what zero-shot CLIP knows.
  The adapters start from zero and need that step size; pretrained weights do not.
- At 5e-6 the bound is 0.005 an epoch and 0.14 over the run.
  Only a gradient that pushed a weight the same way at every one of the 28,650 steps
  would carry it by a few times its size,
  and a batch of 16 gives noisy gradients whose steps largely cancel.
- That is the range of CLIP fine-tuning recipes
  (about 1e-5, with batches of hundreds: far fewer, less noisy steps an epoch).
"""
from torch import nn

LR = 5e-6
PLACEMENT = "every CLIP weight"
INIT = "the pretrained weights (starts at zero-shot)"


def apply(model: nn.Module) -> nn.Module:
    """CLIP -> CLIP with every parameter trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model
