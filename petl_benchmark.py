"""The paper's PETL benchmark (Tables II-IV): methods x seeds, one dataset -> mR beside the paper's.

    python petl_benchmark.py --dataset rsitmd --data-root data --seeds 2 3 4
    python petl_benchmark.py --dataset demo --methods zero_shot mrs_adapter lora -- --epochs 10

- Each method trains through `train.main` (same loop, loss, selection on validation,
  checkpoints) into <output>/<method>; zero_shot is evaluated with `eval.main`.
- Flags after `--` go to train.py.
- Writes <output>/benchmark.md and benchmark.csv:
  our mean +- std over seeds on the test split, the trainable-parameter count,
  and the paper's count and mR for that dataset.
"""
import argparse
import csv
import io
import os
import sys

import torch

import eval as eval_script
import train
from mrs_adapter.atomic import atomic_write, check_folder_writable
from mrs_adapter.data import DATASETS
from mrs_adapter.methods import METHODS
from mrs_adapter.model import ACTIVATIONS
from mrs_adapter.paper import BENCHMARK, published_mr, published_params
from mrs_adapter.run.args import check_flags
from mrs_adapter.run.checks import refuse_repeats
from mrs_adapter.run.distributed import reported_here
from mrs_adapter.run.resume import NOTHING_HALF_WRITTEN
from mrs_adapter.weights.download import DownloadError

# the paper's methods in its tables' order, then the registered ones it lacks (houlsby, lora)
METHOD_ORDER = list(BENCHMARK) + [m for m in METHODS if m not in BENCHMARK]
COLUMNS = ["method", "params", "paper_params", "i2t_r1", "i2t_r5", "i2t_r10",
           "t2i_r1", "t2i_r5", "t2i_r10", "mR", "mR_std", "paper_mR", "seeds"]


def run_method(args, method: str, train_argv: list) -> dict:
    """{metric: mean}, {metric: std} and the trainable count of one method, trained or zero-shot."""
    folder = os.path.join(args.output, method)
    common = ["--dataset", args.dataset, "--data-root", args.data_root]
    common += ["--clip", args.clip] if args.clip else []
    common += ["--clip-activation", args.clip_activation] if args.clip_activation else []
    if method == "zero_shot":  # nothing to train, and deterministic: one evaluation
        json_path = os.path.join(folder, "eval.json")
        metrics = eval_script.main(common + ["--zero-shot", "--json", json_path])
        return {"mean": metrics, "std": {k: 0.0 for k in metrics}, "params": 0, "seeds": "-"}
    summary = train.main(common + ["--method", method, "--output", folder, "--seeds",
                                   *map(str, args.seeds)] + train_argv)
    best = torch.load(os.path.join(folder, f"seed{args.seeds[0]}", "best.pt"), weights_only=True)
    return {"mean": summary["mean"], "std": summary["std"], "seeds": " ".join(map(str, args.seeds)),
            "params": sum(t.numel() for t in best["trainable"].values())}


def row(dataset: str, method: str, result: dict) -> dict:
    paper_params, paper_mr = published_params(method) or "-", published_mr(method)
    cells = {k: round(result["mean"][k], 2) for k in COLUMNS[3:10]}
    return {"method": method, "params": result["params"], "paper_params": paper_params, **cells,
            "mR_std": round(result["std"]["mR"], 2), "paper_mR": paper_mr.get(dataset, "-"),
            "seeds": result["seeds"]}


def markdown(dataset: str, rows: list) -> str:
    lines = [f"Test split of {dataset}; mean over seeds, model selected on validation mR "
             "(python petl_benchmark.py).", "",
             "| method | params | paper params | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | mR "
             "| paper mR |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        recalls = " | ".join(f"{r[k]:.2f}" for k in COLUMNS[3:9])
        lines.append(f"| {r['method']} | {r['params']:,} | {r['paper_params']} | {recalls} | "
                     f"{r['mR']:.2f} +- {r['mR_std']:.2f} | {r['paper_mR']} |")
    return "\n".join(lines) + "\n"


def check_output(output: str, train_argv: list):
    """Before any method runs: the output folder can be written, and one that holds a run is only
    reused when the train.py flags say how (`-- --resume` or `-- --overwrite`)."""
    check_folder_writable(output)
    reuse = {"--resume", "--overwrite"} & set(train_argv)
    if os.path.isdir(output) and os.listdir(output) and not reuse:
        raise FileExistsError(f"{output} already holds a benchmark; pass `-- --resume` to continue "
                              f"it, `-- --overwrite` to replace its run files, or another --output")


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--data-root", default="data")
    p.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=METHOD_ORDER,
                   help="default: every method of the paper's tables, then houlsby and lora")
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4],
                   help="train.py seeds (published rows average runs)")
    p.add_argument("--clip", help="CLIP weights for every method (default: train.py's)")
    p.add_argument("--clip-activation", choices=ACTIVATIONS,
                   help="CLIP's MLP activation (train.py)")
    p.add_argument("--output", help="default: runs/benchmark-<dataset>")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, rest = p.parse_known_args(argv[:split])
    train_argv = rest + argv[split + 1:]
    refuse_repeats("--methods", args.methods)  # a method twice: the same rows twice
    refuse_repeats("--seeds", args.seeds)  # a seed twice: one run counted as two, std 0.00
    # train.py's flags too, before the first method runs
    check_flags(train.get_parser().parse_args(["--dataset", args.dataset] + train_argv))
    args.output = args.output or os.path.join("runs", f"benchmark-{args.dataset}")
    check_output(args.output, train_argv)
    rows = []
    for method in args.methods:
        print(f"\n##### benchmark: {method} on {args.dataset}")
        rows.append(row(args.dataset, method, run_method(args, method, train_argv)))
    table = markdown(args.dataset, rows)
    atomic_write(os.path.join(args.output, "benchmark.md"), lambda f: f.write(table))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(os.path.join(args.output, "benchmark.csv"), lambda f: f.write(buffer.getvalue()))
    print("\n" + table)
    return rows


def cli() -> int:
    """`main` for the shell: an error is one line (exit 1), Ctrl-C one line saying what is intact
    (exit 130; a method's run continues with `-- --resume`); under torchrun one process reports
    it."""
    try:
        main()
    except KeyboardInterrupt as e:
        if reported_here(e):
            print(f"interrupted: {str(e) or NOTHING_HALF_WRITTEN}", file=sys.stderr)
        return 130
    except (OSError, ValueError, FloatingPointError, DownloadError) as e:
        if reported_here(e):
            print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
