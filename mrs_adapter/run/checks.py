"""Checks of shared flags: values -> None, or a ValueError of one line naming the flag.

- Shared by train.py, eval.py, petl_benchmark.py and the overlap command.
- Made before anything is loaded or written.
- Each failure is one line naming the flag and what was expected.
"""
import errno
import os
from typing import Optional, Sequence

import torch


def refuse_repeats(flag: str, values: Optional[Sequence]) -> None:
    """(flag, values) -> None, or a ValueError naming `flag` when it lists a value twice.

    - `--seeds 2 2` would report one seed as two (std 0.00);
    - `--dataset x x` would train on every pair twice.
    """
    repeated = sorted({str(v) for v in values or () if list(values).count(v) > 1})
    if repeated:
        raise ValueError(f"{flag} lists {', '.join(repeated)} more than once; give each value "
                         f"once")


def check_counts(least: dict) -> None:
    """{flag: (value, least)} -> None, or a ValueError for the first value below its least.

    A value of None (the default) is not checked.
    """
    for flag, (value, at_least) in least.items():
        if value is not None and value < at_least:
            expected = "a positive number" if at_least == 1 else f"{at_least} or more"
            raise ValueError(f"{flag} {value}: expected {expected}")


def check_device(device: str, processes: int = 1) -> None:
    """(--device, processes) -> None, or a ValueError naming --device unless torch can use it here.

    `processes` on CUDA (torchrun's on this machine) each take the GPU of their local rank.
    """
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device torch knows (e.g. cpu, cuda, "
                         f"cuda:1)") from None
    if where.type != "cuda":
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if processes > 1 and found < processes:
        raise ValueError(f"--device {device}: torchrun started {processes} processes here, each "
                         f"on a GPU of its own, and torch sees {found} CUDA GPU(s); use "
                         f"--device cpu or at most --nproc_per_node {max(found, 1)}")
    if processes == 1 and found <= (where.index or 0):
        raise ValueError(f"--device {device}: torch sees {found} CUDA GPU(s) here; use --device "
                         f"cpu" + (f" or cuda:0 to cuda:{found - 1}" if found else ""))


def local_processes() -> int:
    """() -> int: torchrun's processes on this machine (1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: OSError, intact: str) -> OSError:
    """(error, what is intact) -> `e` itself, or for a full disk one error naming the file.

    - The file is the one atomic_write names in `e`.
    - The new error also says what is `intact`.
    """
    if e.errno not in DISK_FULL:
        return e
    return OSError(e.errno, f"no space left on the device to write {e.filename}: {intact}")
