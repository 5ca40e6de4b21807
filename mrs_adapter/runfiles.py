"""The run folder: config.json, log.jsonl, results.json, checkpoints - written so nothing is lost.

Every file is written to a temporary name in its folder and renamed (`os.replace` is atomic),
so a crash leaves either the previous complete file or the new complete one. A folder that
already holds a run is never reused unless the user says `--resume` or `--overwrite`.
"""
import json
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Callable, List

RUN_FILES = ("config.json", "log.jsonl", "last.pt", "best.pt", "results.json")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable, mode: str = "w"):
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def read_jsonl(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLog:
    """log.jsonl, one JSON object per line, rewritten atomically at each `write` (logs are
    small)."""

    def __init__(self, path: str, records: List[dict] = ()):
        self.path, self.records = path, list(records)

    def write(self, **record) -> None:
        self.records.append(record)
        atomic_write(self.path, lambda f: f.writelines(json.dumps(r) + "\n" for r in self.records))


def check_folder_writable(path: str, flag: str = "--output") -> None:
    """A ValueError naming `path` unless the folder exists or can be made, and is writable: it is
    not a file, no folder above it is a file, and the nearest existing one accepts new files.
    Called before anything is removed or computed, so a bad path costs nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not a folder; choose another {flag}")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot make {path}: {existing} is a file, not a folder; "
                         f"choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {existing} (read-only for this user): change its "
                         f"permissions or choose another {flag}")


def check_file_writable(path: str, flag: str) -> None:
    """As check_folder_writable, for a file about to be written at `path`."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a file; choose another {flag}")
    check_folder_writable(os.path.dirname(os.path.abspath(path)), flag)


def prepare_run_dir(path: str, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a folder that holds files, unless resuming or told to overwrite.

    --overwrite removes only the files a run writes (RUN_FILES, seed folders), nothing else;
    train.py calls this only after every input has been checked (train.preflight)."""
    check_folder_writable(path)
    if os.path.isdir(path) and os.listdir(path) and not (resume or overwrite):
        raise FileExistsError(f"run folder {path} is not empty; pass --resume to continue that "
                              f"run, --overwrite to replace it, or another --output")
    if overwrite and os.path.isdir(path):
        for name in os.listdir(path):
            full = os.path.join(path, name)
            if name in RUN_FILES or name.startswith("results."):
                os.remove(full)
            elif name.startswith("seed") and os.path.isdir(full):
                shutil.rmtree(full)
    os.makedirs(path, exist_ok=True)


def environment() -> dict:
    """Library versions and the git commit of the code, for config.json."""
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
