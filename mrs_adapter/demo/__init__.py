"""The offline demo: generated aerial scenes and a tiny pre-trained CLIP, no download.

- scenes.py: generated aerial scenes with captions;
- backbone.py: a tiny CLIP pre-trained on another synthetic domain.
"""
