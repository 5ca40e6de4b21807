"""The run folder: config.json, log.jsonl, results.json, checkpoints - written so nothing is lost.

- Every file goes through `atomic.atomic_write` (a crash leaves the old file or the new one).
- A folder that already holds a run is never reused
  unless the user says `--resume` or `--overwrite`.
- `--overwrite` removes only the files a run writes.
"""
import json
import os
import platform
import re
import subprocess
from typing import List

from ..atomic import atomic_write, check_folder_writable

RUN_FILES = ("config.json", "log.jsonl", "last.pt", "best.pt", "results.json")


def read_jsonl(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLog:
    """log.jsonl, one JSON object per line: `write(**record)` appends one and rewrites the file.

    Rewritten atomically at each `write` (logs are small).
    """

    def __init__(self, path: str, records: List[dict] = ()):
        self.path, self.records = path, list(records)

    def write(self, **record) -> None:
        self.records.append(record)
        atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in self.records))


def written_by_a_run(name: str) -> bool:
    """File name -> whether a run writes it: one of RUN_FILES, or one's temporary copy.

    The temporary copy is what a killed atomic_write left:
    <name>.<8 random characters>.tmp (tempfile's naming).
    """
    return name in RUN_FILES or any(re.fullmatch(re.escape(f) + r"\.[a-z0-9_]{8}\.tmp", name)
                                    for f in RUN_FILES)


def remove_run_files(folder: str, seeds: bool = True) -> List[str]:
    """(folder, seeds) -> the paths removed, relative to `folder`: what a run wrote, nothing else.

    - Its run files; with `seeds`, also those of its seed<N>/ folders.
    - A seed folder that also holds a file of the user's stays, with that file.
    """
    removed = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if os.path.isfile(full) and written_by_a_run(name):
            os.remove(full)
            removed.append(name)
        elif seeds and re.fullmatch(r"seed\d+", name) and os.path.isdir(full):
            removed += [f"{name}/{inner}" for inner in remove_run_files(full, seeds=False)]
            if not os.listdir(full):
                os.rmdir(full)
    return removed


def prepare_run_dir(path: str, resume: bool, overwrite: bool) -> None:
    """(path, resume, overwrite) -> None: the run folder made, or a FileExistsError.

    - A folder that holds files is refused, unless resuming or told to overwrite.
    - --overwrite removes only the files a run writes (remove_run_files), nothing else.
    - train.py calls this only after every input has been checked (train.preflight).
    """
    check_folder_writable(path)
    if os.path.isdir(path) and os.listdir(path) and not (resume or overwrite):
        raise FileExistsError(f"run folder {path} is not empty; pass --resume to continue that "
                              f"run, --overwrite to replace it, or another --output")
    if overwrite and os.path.isdir(path):
        removed = remove_run_files(path)
        kept = sum(len(names) for _, _, names in os.walk(path))
        shown = ", ".join(removed[:6]) + (", ..." if len(removed) > 6 else "")
        print(f"--overwrite: removed {len(removed)} file(s) a run wrote in {path}"
              + (f" ({shown})" if removed else "")
              + (f"; kept {kept} other file(s)" if kept else ""))
    os.makedirs(path, exist_ok=True)


def environment() -> dict:
    """() -> dict: library versions and the git commit of the code, for config.json."""
    import numpy
    import PIL
    import torch
    import torchvision
    on_cuda = torch.cuda.is_available()
    env = {"python": platform.python_version(), "torch": str(torch.__version__),
           "torchvision": str(torchvision.__version__), "numpy": numpy.__version__,
           "pillow": PIL.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu"}
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip()
    try:
        env["git_commit"] = git("rev-parse", "HEAD") or None
        env["git_dirty"] = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env
