"""train.py's command line: argv -> flags -> `Settings`, resolved once (`resolve`), checked early.

- Every flag carries the paper's default and its source.
- The recipe's defaults are those of docs/method.md §4 (Sec. IV-B of the paper).
- The checks here need no data, model or disk access.
"""
import argparse
import os

import torch

from .. import clip
from ..atomic import check_folder_writable
from ..data import CAPTIONS_PER_IMAGE, DATASETS
from ..datasets import default_workers
from ..methods import METHODS, default_lr, method_options
from ..metrics import AMP_DTYPES
from .checks import check_counts, check_device, local_processes, refuse_repeats
from .distributed import Processes

DATASET_NAMES = list(DATASETS)  # the registry of data.py


def _data_flags(a) -> None:
    a("--dataset", dest="datasets", nargs="+", required=True, choices=DATASET_NAMES,
      help="demo: generated offline (README 'Data' for the others); several: train on the union "
           "of their training splits, select on the union of their validation splits, test on "
           "each test split")
    a("--test-dataset", nargs="+", choices=DATASET_NAMES,
      help="transfer: test on these datasets' test splits instead (README 'Several datasets')")
    a("--keep-overlap", action="store_true", help="with several datasets or --test-dataset, keep "
      "the training and validation images that are copies of test images (the published, leaky "
      "setting)")
    a("--data-root", default="data",
      help="folder holding the datasets (README 'Data'); default: data")
    a("--layout", choices=["precomp", "json"],
      help="force an annotation layout (default: the dataset's usual one)")
    a("--image-dir", help="image folder (default: <data-root>/<dataset>_images)")
    a("--captions-per-image", type=int, default=CAPTIONS_PER_IMAGE,
      help="captions of each image where a file-name list has one line per image (default 5, "
           "as every known dataset); another ratio is an error")


def _model_flags(a) -> None:
    a("--clip", help="CLIP weights: a name of clip.available_models() or a file (default: "
                     "ViT-B/32, as in the paper; the demo uses a tiny CLIP pre-trained offline "
                     "and cached in <data-root>)")
    a("--clip-activation", choices=clip.ACTIVATIONS,
      help="CLIP's MLP activation (default: a named backbone's own; QuickGELU, OpenAI's, for a "
           "file; e.g. gelu for SkyCLIP ViT-B/32); recorded in the run")
    a("--clip-sha256", help="the sha256 the CLIP weights must have (pins a backbone published "
                            "without one)")
    a("--method", default="mrs_adapter", choices=sorted(METHODS),
      help="PETL method (default: the paper's)")
    a("--objective", default="hmmc", choices=["hmmc", "info_nce"],
      help="loss (default: HMMC, Sec. III-C)")
    a("--margin", type=float, default=0.2, help="HMMC hinge margin (paper: 0.2)")
    a("--loss-weights", type=float, nargs=3, default=(1.0, 1.0, 1.0),
      help="HMMC weights (paper: 1 1 1)")
    a("--feature-dropout", type=float, default=0.2,
      help="dropout of the augmented views (paper: 0.2)")
    a("--adapter-dropout", type=float, help="the method's `dropout` option (default: the method's; "
                                             "MRS-Adapter: 0.5, the paper's)")
    a("--bottleneck", type=int, help="the method's `bottleneck` option (default: the method's; "
                                     "MRS-Adapter: 64, the paper's)")


def _recipe_flags(a) -> None:
    a("--lr", type=float, help="Adam learning rate (default: the method's, methods.default_lr: "
                               "2e-4 as in the paper for the PETL methods, 5e-6 for full "
                               "fine-tuning)")
    a("--lr-decay", type=float, default=0.7, help="lr factor (paper: x0.7)")
    a("--lr-decay-start", type=int, default=19,
      help="first 0-indexed epoch with decayed lr (paper: 19)")
    a("--lr-decay-every", type=int, default=20, help="epochs between decays (paper: 20)")
    a("--epochs", type=int, default=30, help="training epochs (paper: 30)")
    a("--batch-size", type=int, default=16,
      help="GLOBAL batch of caption-image pairs (paper: 16)")
    a("--eval-batch-size", type=int,
      help="evaluation batch (paper: 64, the CPU default; 512 on CUDA, where 64 leaves the GPU "
           "idle; each item is encoded alone, so results do not change)")
    a("--seeds", type=int, nargs="+", default=[2],
      help="one run per seed s: python s, numpy s+1, torch s+2 (paper: 2, 3, 4, i.e. --seeds 2)")


def _run_flags(a) -> None:
    a("--output", help="run folder (default: runs/<dataset>-<method>; several: "
                       "runs/rsitmd+rsicd-<method>, runs/rsicd-to-rsitmd-<method>)")
    a("--resume", action="store_true", help="continue the run in --output from its last.pt")
    a("--overwrite", action="store_true",
      help="replace the run files in a non-empty --output")
    a("--precision", choices=["fp32", "bf16", "fp16"],
      help="autocast dtype on CUDA (default bf16); CPU: fp32")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--workers", type=int,
      help="DataLoader workers per process (default: min(8, CPUs) on CUDA; 0 on CPU, where the "
           "model needs the cores and cached images cost little to serve)")
    a("--no-cache-images", dest="cache_images", action="store_false",
      help="decode images every epoch instead of once into memory (the recipe has no image "
           "augmentation)")
    a("--compile", action="store_true",
      help="torch.compile the training forward (an option; see README 'Speed')")
    a("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
      help="launch every kernel of a training step from Python instead of replaying a recorded "
           "CUDA graph (default: graphs on one CUDA device with bf16/fp32; off on CPU, under "
           "torchrun, with fp16 or --compile)")
    a("--print-freq", type=int, default=50,
      help="steps between progress lines (and non-finite loss checks)")


def get_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for flags in (_data_flags, _model_flags, _recipe_flags, _run_flags):
        flags(p.add_argument)
    return p


METHOD_FLAGS = {"bottleneck": "bottleneck", "adapter_dropout": "dropout"}  # flag -> apply keyword


def resolve_method_options(args) -> dict:
    """Parsed flags -> {keyword: value} for every keyword of the method's `apply`.

    - --bottleneck / --adapter-dropout where given, else the method's default.
    - A flag the method has no option for is an error.
    """
    defaults = method_options(args.method)
    given = {}
    for flag, keyword in METHOD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if keyword not in defaults:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: method {args.method} has no "
                             f"{keyword} option (its options: {', '.join(defaults) or 'none'})")
        given[keyword] = value
    return method_options(args.method, given)


class Settings(argparse.Namespace):
    """Every setting of a run as attributes: resolved once (`resolve`), read-only after.

    - The flags;
    - their defaults that depend on the device, the processes or other flags;
    - the method's options.
    config.json records them all but `amp_dtype`, the torch dtype of `precision`.
    """

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"a run's settings are resolved once (run/args.py, resolve); "
                             f"{name} cannot change after")


def resolve(args: argparse.Namespace, options: dict, processes: Processes) -> Settings:
    """(args, options, processes) -> Settings: the run's settings, every default filled in.

    - `args`: as parsed (left unchanged);
    - `options`: the method's;
    - `processes`: distributed.start's;
    - every default that depends on them or on other flags.
    """
    world_size, device = processes.world_size, processes.device
    on_cuda = device.startswith("cuda")
    precision = args.precision or ("bf16" if on_cuda else "fp32")
    dataset = "+".join(args.datasets)  # one name as before; several: rsitmd+rsicd
    transfer = f"-to-{'+'.join(args.test_dataset)}" if args.test_dataset else ""
    return Settings(**{
        **vars(args), "method_options": options, "dataset": dataset,
        **processes._asdict(),
        "precision": precision, "amp_dtype": AMP_DTYPES[precision] if on_cuda else None,
        "cuda_graphs": (args.cuda_graphs and on_cuda and world_size == 1
                        and precision != "fp16" and not args.compile),
        "eval_batch_size": args.eval_batch_size or (512 if on_cuda else 64),
        "workers": default_workers(device) if args.workers is None else args.workers,
        "lr": args.lr if args.lr is not None else default_lr(args.method),
        "output": args.output or os.path.join("runs", f"{dataset}{transfer}-{args.method}"),
        "clip": default_clip(args.clip, dataset, args.data_root)})


def default_clip(clip_flag: str, dataset: str, data_root: str) -> str:
    """(--clip, dataset, data root) -> the CLIP to load: --clip, else ViT-B/32.

    The demo's default is a tiny CLIP pre-trained offline and cached in <data-root>
    (make_demo_clip makes it).
    """
    if clip_flag is not None:
        return clip_flag
    if dataset != "demo":
        return "ViT-B/32"
    from ..demo.backbone import default_path
    return default_path(data_root)


def make_demo_clip(run: Settings) -> None:
    """Settings -> None: the demo's tiny CLIP (default_clip) pre-trained once and cached.

    - Only where run.clip is the demo's default.
    - train.py calls this on rank 0 only; the others wait for its outcome.
    """
    from ..demo.backbone import default_path, load_or_pretrain
    if run.clip == default_path(run.data_root):
        load_or_pretrain(run.clip)


def check_flags(args: argparse.Namespace) -> None:
    """Parsed flags -> None, or a ValueError naming its flag: the errors in the flags alone.

    Checked before any process group, data, model or disk access,
    so every process of a torchrun stops alike.
    """
    a = args
    check_counts({"--epochs": (a.epochs, 1), "--batch-size": (a.batch_size, 1),
                  "--eval-batch-size": (a.eval_batch_size, 1), "--workers": (a.workers, 0),
                  "--print-freq": (a.print_freq, 1), "--lr-decay-every": (a.lr_decay_every, 1),
                  "--captions-per-image": (a.captions_per_image, 1)})
    if a.batch_size < 2:  # both objectives: hmmc's hinges and info_nce's softmax
        raise ValueError(f"--batch-size {a.batch_size}: the {a.objective} loss needs at least 2 "
                         f"pairs in a batch (the others of the batch are each pair's negatives; "
                         f"with one pair the loss is 0 and nothing trains). It is the global "
                         f"batch: under torchrun each process encodes batch / processes pairs, "
                         f"and the loss sees all of them")
    if not 0.0 <= a.feature_dropout <= 1.0:
        raise ValueError(f"--feature-dropout {a.feature_dropout}: expected a probability, 0 to 1")
    for flag, values in (("--seeds", a.seeds), ("--dataset", a.datasets),
                         ("--test-dataset", a.test_dataset)):
        refuse_repeats(flag, values)
    check_device(a.device, local_processes())


def check_arguments(run: Settings) -> None:
    """Settings -> None, or a ValueError: the output folder checked.

    The errors that need the resolved settings but no data or model.
    """
    check_folder_writable(run.output)
