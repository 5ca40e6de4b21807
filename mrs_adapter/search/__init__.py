"""Searching your own imagery with a trained model (beyond the paper): building an index
(index.py) of an image folder (scan.py), its files on disk (store.py), and queries (query.py);
`search.py` is the command."""
