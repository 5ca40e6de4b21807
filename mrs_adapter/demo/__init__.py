"""The offline demo: generated aerial scenes and a tiny pre-trained CLIP, no download.

- scenes.py: generated aerial scenes with captions;
- backbone.py: a tiny CLIP pre-trained on another synthetic domain;
- embeddings.py: clustered unit embeddings (float16 .npy, up to 10M rows) for search at scale.
"""
