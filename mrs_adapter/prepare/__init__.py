"""Preparing data before a long run: a dataset -> its problems, datasets -> the images they share.

- check.py: every problem of a dataset;
- overlap.py: copies between splits and datasets;
- cli.py: `python -m mrs_adapter.prepare check|overlap`.
"""
