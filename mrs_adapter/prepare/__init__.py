"""Preparing data before a long run: every problem of a dataset (check.py) and copies between
splits and datasets (overlap.py); `python -m mrs_adapter.prepare check|overlap` (cli.py)."""
