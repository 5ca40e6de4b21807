"""mrs-adapter: CLIP + MRS-Adapter + HMMC (Yuan, Zhan, Xiong, IEEE TGRS 2023; docs/method.md).

Parameter-efficient transfer of CLIP to remote sensing image-text retrieval.

The paper, at the top of the package:
    model.py       CLIP's ViT and text transformer (Sec. III-A)
    clip.py        loading CLIP weights; preprocessing
    tokenizer.py   CLIP's byte-level BPE
    adapter.py     MRS-Adapter and its two residual equations (Sec. III-B)
    loss.py        HMMC: the hybrid multi-modal contrastive loss (Sec. III-C)
    metrics.py     recall@K and mR (Sec. IV, Tables II-IV)
    data.py        annotations, splits, the validation split (Sec. IV-A)
    datasets.py    images and captions as tensors
    checkpoint.py  trainable-only checkpoints, loaded strictly
    paper.py       the paper's published numbers
    methods/       the PETL baselines of Tables II-IV
    atomic.py      files written whole or not at all

The wings, each a sub-package:
    run/       a training run: flags, resume, torchrun, CUDA graphs, dataset union,
               summary, rebuilding a checkpoint's model
    weights/   verified downloads; remote-sensing CLIP backbones
    prepare/   dataset checks and copies between datasets (python -m mrs_adapter.prepare)
    search/    searching your own imagery with a trained model
    demo/      the offline demo: generated scenes and a tiny pre-trained CLIP
"""
__version__ = "0.1.0"
