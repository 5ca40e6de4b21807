"""Reading scattered rows of a memory-mapped .npy (the embeddings, the tile columns) fast, warm or
cold: a query reads its hits' records and the ANN's 4,000 candidates, rows spread over files of
up to tens of GB.

- `will_need` asks the kernel for all the rows' pages at once (madvise WILLNEED), so that a cold
  disk serves them together: 4,000 random rows of a 1 GB file read cold took 746-1,086 ms one at a
  time, 49 ms asked for together. Asking costs ~1.5 us a range even where the pages are in memory
  (6 ms for 4,000 rows), so where Linux allows it the ranges go 1,024 to a system call
  (process_madvise): 3 ms.
- `take` then copies the rows out with one pread each: from the page cache, 4,000 random rows of
  a 10 GB file took 10 ms so and 18 ms through the mapping (a page fault a row, ~4.5 us on this
  machine).
Measured on the 2-core machine of docs/scale.md.
"""
import mmap
import os
import platform
from typing import Optional, Tuple

import numpy as np

IOV_MAX = 1024  # ranges one process_madvise call takes at most (Linux's UIO_MAXIOV)
_PROCESS_MADVISE = {"x86_64": 440, "aarch64": 440}  # the system call's number
_batch = {}  # pid -> (libc syscall, number, pidfd) or None: process_madvise for this process


def mapped(array: np.ndarray) -> bool:
    """Whether `array` is a whole .npy as np.load(mmap_mode=...) maps it (not a slice of one:
    a slice keeps its parent's offset)."""
    return isinstance(getattr(array, "base", None), mmap.mmap) and hasattr(array, "offset")


def page_runs(array: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) in bytes from the start of `array`'s mapping (np.memmap: its ._mmap,
    which begins at the allocation granularity below .offset) of the runs of adjacent pages
    holding `rows`: one range per run, a page between two rows left out."""
    start = array.offset % mmap.ALLOCATIONGRANULARITY + np.sort(np.asarray(rows, np.int64)) * \
        array.strides[0]
    first = start // mmap.PAGESIZE
    last = (start + array.strides[0] - 1) // mmap.PAGESIZE
    new_run = np.concatenate([[True], first[1:] > np.maximum.accumulate(last)[:-1] + 1])
    runs = np.flatnonzero(new_run)
    ends = np.maximum.reduceat(last, runs)
    return first[runs] * mmap.PAGESIZE, (ends - first[runs] + 1) * mmap.PAGESIZE


def _process_madvise() -> Optional[Tuple]:
    """(syscall, number, pidfd) to call process_madvise on this process, or None where the
    platform has none; a forked child opens its own pidfd."""
    pid = os.getpid()
    if pid not in _batch:
        _batch.clear()
        _batch[pid] = None
        number = _PROCESS_MADVISE.get(platform.machine())
        if number is not None and hasattr(os, "pidfd_open"):
            try:
                import ctypes
                syscall = ctypes.CDLL(None, use_errno=True).syscall
                syscall.restype = ctypes.c_long
                _batch[pid] = (syscall, number, os.pidfd_open(pid))
            except (OSError, AttributeError):
                pass
    return _batch[pid]


def _advise_batched(address: int, starts: np.ndarray, lengths: np.ndarray) -> int:
    """process_madvise(WILLNEED) of the ranges (byte offsets from `address`), IOV_MAX to a call:
    how many ranges were asked for (fewer where the kernel refuses it: older kernels, sandboxes;
    then it is not tried again)."""
    call = _process_madvise()
    if call is None:
        return 0
    import ctypes
    syscall, number, pidfd = call
    iov = np.empty((len(starts), 2), np.uint64)  # struct iovec {void *base; size_t len}
    iov[:, 0], iov[:, 1] = address + starts, lengths
    for at in range(0, len(iov), IOV_MAX):
        chunk = np.ascontiguousarray(iov[at:at + IOV_MAX])
        if syscall(ctypes.c_long(number), ctypes.c_int(pidfd), ctypes.c_void_p(chunk.ctypes.data),
                   ctypes.c_size_t(len(chunk)), ctypes.c_int(mmap.MADV_WILLNEED),
                   ctypes.c_uint(0)) < 0:
            _batch[os.getpid()] = None
            return at
    return len(iov)


def will_need(array: np.ndarray, rows: np.ndarray):
    """Ask the kernel for the pages holding `rows` of a memory-mapped array all at once
    (WILLNEED), so that reading them from a cold disk waits about once, not once a row: the hits'
    records, the ANN's candidates. Nothing is done for an array in memory, or where the platform
    has no madvise."""
    mm = getattr(array, "_mmap", None)  # np.memmap's mapping
    if mm is None or not hasattr(mm, "madvise") or not len(rows):
        return
    starts, lengths = page_runs(array, rows)
    done = 0
    if mapped(array):
        address = array.ctypes.data - array.offset % mmap.ALLOCATIONGRANULARITY
        done = _advise_batched(address, starts, lengths)
    for start, length in zip(starts[done:].tolist(), lengths[done:].tolist()):
        mm.madvise(mmap.MADV_WILLNEED, start, length)


def take(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] (rows ascending): for a .npy np.load mapped, its pages asked for together
    (will_need), then one pread a row, or one slice where the rows are consecutive. Read through
    the mapping (array[rows]) for anything else, and where the file is not the one mapped any
    more (a newer index run removed it: the mapping still holds it)."""
    rows = np.asarray(rows, np.int64)
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return np.array(array[rows[0]:rows[-1] + 1])
    if not mapped(array) or not array.flags.c_contiguous or not hasattr(os, "preadv") \
            or not len(rows):
        return array[rows]
    will_need(array, rows)
    size, offset = array.strides[0], array.offset
    try:
        fd = os.open(array.filename, os.O_RDONLY)
    except OSError:
        return array[rows]
    try:
        if os.fstat(fd).st_size != offset + len(array) * size:  # another file by that name
            return array[rows]
        out = np.empty((len(rows), *array.shape[1:]), array.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        for i, row in enumerate(rows.tolist()):
            if os.preadv(fd, [view[i * size:(i + 1) * size]], offset + row * size) != size:
                return array[rows]
        return out
    finally:
        os.close(fd)
