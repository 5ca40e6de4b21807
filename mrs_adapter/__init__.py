"""mrs-adapter: CLIP + MRS-Adapter + HMMC for remote sensing image-text retrieval
(Yuan et al., TGRS 2023; docs/method.md).

Modules: model (CLIP's architecture), clip (weights, downloads, preprocessing), backbones
(remote-sensing CLIPs), tokenizer, adapter (MRS-Adapter), checkpoint (trainable tensors),
loss (HMMC), data (datasets), metrics (recall@K), methods (the PETL baselines),
demo / demo_backbone (offline demo).
"""
__version__ = "0.1.0"
