"""petl_benchmark.py: methods x seeds through train.main / eval.main, as Markdown and CSV."""
import csv
import json

import petl_benchmark as benchmark
from mrs_adapter import clip
from mrs_adapter.checkpoint import count_parameters
from mrs_adapter.methods import METHODS, apply_method
from mrs_adapter.paper import BENCHMARK


def test_benchmark_runs_methods_and_seeds_on_the_demo(demo, tmp_path):
    root, backbone = demo
    out = tmp_path / "bench"
    rows = benchmark.main(["--dataset", "demo", "--data-root", root, "--clip", backbone,
                           "--output", str(out), "--methods", "zero_shot", "mrs_adapter", "lora",
                           "--seeds", "2", "3",
                           "--", "--epochs", "1", "--lr", "1e-3", "--print-freq", "100"])
    with open(out / "benchmark.csv") as f:
        table = list(csv.DictReader(f))
    methods = ["zero_shot", "mrs_adapter", "lora"]
    assert [r["method"] for r in table] == methods == [r["method"] for r in rows]
    markdown = (out / "benchmark.md").read_text()
    assert all(f"| {m} |" in markdown for m in methods)
    for r in table[1:]:  # trained rows: the mean and std of the seeds' results.json
        results = [out / r["method"] / f"seed{s}" / "results.json" for s in (2, 3)]
        seeds = [json.load(open(path))["test"]["mR"] for path in results]
        assert float(r["mR"]) == round(sum(seeds) / 2, 2) and float(r["mR_std"]) > 0
        model = apply_method(clip.load(backbone)[0], r["method"], verbose=False)
        expected, _ = count_parameters(model)
        assert int(r["params"]) == expected > 0
        assert r["paper_mR"] == "-" and r["seeds"] == "2 3"  # the paper has no demo column
    zero_shot = json.load(open(out / "zero_shot" / "eval.json"))["metrics"]["mR"]
    assert float(table[0]["mR"]) == round(zero_shot, 2) and table[0]["params"] == "0"


def test_the_default_methods_are_the_papers_rows_then_every_other_registered_method():
    order = benchmark.METHOD_ORDER
    assert order[:len(BENCHMARK)] == list(BENCHMARK)
    assert sorted(order) == sorted(METHODS) and len(set(order)) == len(order)
    assert {"houlsby", "lora"} <= set(order[len(BENCHMARK):])
