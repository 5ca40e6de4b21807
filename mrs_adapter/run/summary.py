"""The end of a run: each seed's best.pt on test -> mean +- std over seeds, as the paper's table.

- The test split selects nothing: best.pt was chosen on validation during training.
- Published rows look like averages of several runs (docs/method.md §4),
  so several --seeds report the mean and the sample std over seeds.
- The table also shows the model before training and chance.
"""
import os
import statistics
import time

import torch

from ..atomic import write_json
from ..checkpoint import load_trainable
from ..metrics import METRICS, chance_recall, format_table
from .union import test_keys


def score_selected(seed: int, model, run_dir: str, score, initial: dict, splits: dict) -> dict:
    """(seed, model, run_dir, ...) -> the seed's results.json: best.pt scored on every test split.

    best.pt was selected on validation.
    """
    best = load_trainable(model, os.path.join(run_dir, "best.pt"))
    t0 = time.time()
    tests = {k: score(k) for k in test_keys(splits)}
    test = tests["test"] if "test" in tests else {k.split(":", 1)[1]: v for k, v in tests.items()}
    results = {"seed": seed, "best_epoch": best["epoch"], "val": best["val"], "test": test,
               "test_seconds": time.time() - t0, "initial": initial, "run_dir": run_dir}
    write_json(os.path.join(run_dir, "results.json"), results)
    return results


def mean_std(values: list) -> tuple:
    """[{metric: value} per seed] -> ({metric: mean}, {metric: sample std, 0 for one seed})."""
    mean = {k: statistics.fmean(v[k] for v in values) for k in METRICS}
    std = {k: statistics.stdev([v[k] for v in values]) if len(values) > 1 else 0.0 for k in METRICS}
    return mean, std


def summarize_several(run, results: list, splits: dict, dropped: dict) -> dict:
    """(run, results, splits, dropped) -> the summary; one row per test dataset printed.

    Each row: mean +- std over seeds of every metric.
    """
    names, several = [k.split(":", 1)[1] for k in test_keys(splits)], len(results) > 1
    stats = {n: mean_std([r["test"][n] for r in results]) for n in names}
    chance = {n: chance_recall(torch.as_tensor(splits[f"test:{n}"].txt2img)) for n in names}
    print(f"\ntrained on {run.dataset}, {len(results)} seed(s), model selected on validation mR "
          f"(union of the validation splits); one row per test split:")
    # rows (name, mean) for one seed, (name, mean, std) for several
    print(format_table([(f"{n} {run.method}", *stats[n][:1 + several]) for n in names]))
    print(format_table([(f"{n} before training", results[0]["initial"][f"test:{n}"]) for n in names]
                       + [(f"{n} chance", chance[n]) for n in names]))
    return {"dataset": run.datasets, "test_datasets": names, "method": run.method,
            "seeds": run.seeds, "mean": {n: stats[n][0] for n in names},
            "std": {n: stats[n][1] for n in names}, "chance": chance,
            "dropped_overlap": dropped, "per_seed": results}


def summarize(run, results: list, splits: dict, dropped: dict) -> dict:
    """Per-seed results -> the summary train.py writes to <output>/results.json, printed as a table.

    - Every test metric: mean +- std (sample std over seeds; 0 for one seed).
    - `dropped`: load_data's count of training and validation images dropped as copies of
      test images.
    """
    if "test" not in splits:
        return summarize_several(run, results, splits, dropped)
    mean, std = mean_std([r["test"] for r in results])
    chance = chance_recall(torch.as_tensor(splits["test"].txt2img))
    print(f"\n{run.dataset} test split, {len(results)} seed(s), model selected on validation mR:")
    several = len(results) > 1
    name = f"{run.method}" + (" (mean +- std)" if several else "")
    print(format_table([("before training", results[0]["initial"]["test"]),
                        (name, mean, std if several else None),
                        ("chance", chance)]))
    return {"dataset": run.dataset, "method": run.method, "seeds": run.seeds, "mean": mean,
            "std": std, "chance": chance, "per_seed": results}
