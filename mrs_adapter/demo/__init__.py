"""The offline demo: generated aerial scenes with captions (scenes.py) and a tiny CLIP
pre-trained on another synthetic domain (backbone.py)."""
