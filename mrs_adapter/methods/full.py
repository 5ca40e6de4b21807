"""Full fine-tuning: every CLIP weight trains (the paper's "full fine-tuning" row,
151M on ViT-B/32).

Configuration: all 151,277,313 parameters of ViT-B/32 trainable; train.py then freezes
`logit_scale` unless the objective is InfoNCE (HMMC never reads it; methods.freeze_unread), and
the checkpoint holds every trained tensor.
LR = 5e-6 (Adam, no weight decay), not the adapters' 2e-4. Adam moves each weight by up to about
lr per step whatever the gradient's size: at 2e-4, one RSITMD epoch (215 steps of 16) could shift
a weight by 0.04, the size of CLIP's weights themselves (std ~0.02-0.04), and erase what zero-shot
CLIP knows; the adapters start from zero and need that step size, pretrained weights do not.
Fine-tuning recipes for CLIP use about 1e-5 with batches of hundreds; the paper's batch of 16
gives noisier gradients, hence half of that (at most ~0.03 per weight over 30 epochs).
--lr overrides.
"""
from torch import nn

LR = 5e-6
PLACEMENT = "every CLIP weight"
INIT = "the pretrained weights (starts at zero-shot)"


def apply(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
