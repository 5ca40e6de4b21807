"""A training run around the paper's recipe: flags in, a run folder and the paper's table out.

- args.py: the flags;
- resume.py: resume and seeds;
- files.py: the run folder;
- distributed.py: several processes;
- cuda_graph.py: recorded CUDA steps;
- union.py: several datasets joined;
- summary.py: the end-of-run table;
- rebuild.py: rebuilding the model a checkpoint was trained with.
"""
