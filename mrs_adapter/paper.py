"""The paper's published numbers (Tables II-IV, CLIP ViT-B/32), in one place.

README, docs/method.md §7, petl_benchmark.py, weights/backbones.py and the tests read them here.
Recalls are percentages: (i2t R@1, R@5, R@10, t2i R@1, R@5, R@10, mR).
"""
from typing import Dict, Optional

DATASETS = ("rsicd", "rsitmd", "ucm")

# (dataset, method) -> the full row, for the three methods the paper reports in full
ROWS = {
    ("rsitmd", "zero_shot"): (9.29, 26.33, 37.39, 7.79, 23.67, 38.89, 23.89),
    ("rsitmd", "full"): (24.16, 47.12, 61.28, 20.40, 50.53, 68.54, 45.33),
    ("rsitmd", "mrs_adapter"): (23.67, 44.07, 60.36, 20.10, 50.63, 67.97, 44.47),
    ("rsicd", "zero_shot"): (6.77, 15.37, 23.15, 5.01, 15.75, 24.21, 15.04),
    ("rsicd", "full"): (13.54, 30.83, 43.46, 11.55, 33.14, 49.83, 30.39),
    ("rsicd", "mrs_adapter"): (14.13, 31.51, 44.78, 11.63, 33.92, 50.73, 31.12),
    ("ucm", "zero_shot"): (10.95, 34.76, 55.71, 7.33, 35.14, 54.57, 33.08),
    ("ucm", "full"): (17.14, 55.24, 79.52, 13.90, 56.95, 91.81, 52.43),
    ("ucm", "mrs_adapter"): (22.71, 55.81, 80.33, 18.82, 62.84, 93.72, 55.71),
}

# --method -> (trainable parameters as the tables print them, mR on RSICD, RSITMD, UCM)
BENCHMARK = {
    "zero_shot": ("0", (15.04, 23.89, 33.08)),
    "full": ("151M", (30.39, 45.33, 52.43)),
    "linear_probe": ("1.05M", (24.46, 36.25, 51.30)),
    "coop": ("0.10M", (17.29, 30.51, 44.95)),
    "vpt": ("0.46M", (21.72, 34.14, 49.77)),
    "vl_prompt": ("0.47M", (19.61, 32.40, 47.50)),
    "adapter": ("0.17M", (24.84, 32.37, 52.74)),
    "clip_adapter": ("0.52M", (21.65, 32.38, 44.82)),
    "convpass": ("0.14M", (21.38, 32.55, 52.91)),
    "adaptformer": ("0.17M", (28.10, 34.81, 53.69)),
    "cross_modal_adapter": ("0.16M", (27.96, 38.06, 53.62)),
    "uniadapter": ("0.55M", (28.84, 39.23, 54.59)),
    "mrs_adapter": ("0.16M", (31.12, 44.47, 55.71)),
}


def published_mr(method: str) -> Dict[str, float]:
    """Method -> {dataset: mR} the paper reports for it ({} for a method not in the paper)."""
    return dict(zip(DATASETS, BENCHMARK[method][1])) if method in BENCHMARK else {}


def published_params(method: str) -> Optional[str]:
    """Method -> its trainable count as the paper prints it ("0.16M"), or None if not in it."""
    return BENCHMARK[method][0] if method in BENCHMARK else None


def params_as_number(printed: str) -> int:
    """"0.16M" -> 160,000; "151M" -> 151,000,000; "0" -> 0."""
    return round(float(printed.rstrip("M")) * (1_000_000 if printed.endswith("M") else 1))
