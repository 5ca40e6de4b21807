"""A training run around the paper's recipe: flags (args.py), resume and seeds (resume.py), the
run folder (files.py), several processes (distributed.py), recorded CUDA steps (cuda_graph.py),
several datasets joined (union.py), the end-of-run table (summary.py), and rebuilding the model
a checkpoint was trained with (rebuild.py).
"""
