"""Files written so that nothing is lost: a crash leaves the old file or the new one, never half.

- `atomic_write` writes to a temporary name beside the target, syncs it and renames it
  (`os.replace` is atomic).
- The `check_*_writable` functions refuse a path that cannot be written before any work is
  done, naming the path and the flag that gave it.
- `check_output` also refuses to replace a file the program did not write
  (its files carry a "written_by" mark).
"""
import json
import os
import tempfile
from typing import Callable

from PIL import Image


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
    except BaseException as e:
        os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from e  # a full disk: say which file
        raise


def write_json(path: str, obj) -> None:
    """(path, JSON-able object) -> None: written atomically, indented by 2."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def check_folder_writable(path: str, flag: str = "--output") -> None:
    """A ValueError naming `path` unless the folder exists or can be made, and is writable.

    It must not be a file, no folder above it may be a file, and the nearest existing one must
    accept new files. Called before anything is removed or computed: a bad path costs nothing.
    """
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


def has_mark(path: str, mark: str) -> bool:
    """(path, mark) -> whether `path` is a JSON object or PNG image whose "written_by" is `mark`.

    That is how a program of this project marks the files it may later replace.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("written_by") == mark
    except (ValueError, AttributeError, OSError):
        pass
    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get("written_by") == mark
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def check_output(path: str, flag: str, ours: Callable[[str], bool], program: str) -> None:
    """Before any work: `path` can be written and, if it exists, `program` wrote it (`ours`).

    A FileExistsError otherwise: nothing of the user's is replaced.
    """
    check_file_writable(path, flag)
    if os.path.exists(path) and not ours(path):
        raise FileExistsError(f"{path} exists and was not written by {program}; "
                              f"choose another {flag}")
