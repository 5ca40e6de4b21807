"""Reading scattered rows of memory-mapped .npy files (search/pages.py): the pages asked of the
kernel are the ones the rows lie on, in one call a run of pages or, batched, in process_madvise's
ranges; `take` returns what indexing the mapping returns, reading the file with pread, and falls
back to the mapping where the file was replaced."""
import ctypes
import mmap
import os

import numpy as np
import pytest

from mrs_adapter.search import pages


class Mapping:
    """Records what np.memmap's mapping (._mmap) is asked."""
    def __init__(self):
        self.asked = []

    def madvise(self, option, start, length):
        self.asked.append((option, start, length))


class Mapped:  # what np.memmap exposes of itself, its mapping recorded: not a whole .npy
    offset, strides, _mmap = 128, (1024,), Mapping()


def covered(ranges, page=mmap.PAGESIZE):
    return sorted(p for start, length in ranges for p in range(start // page,
                                                             (start + length) // page))


def test_the_pages_asked_are_the_ones_the_rows_lie_on():
    """Rows 0, 3 and 9 of 1,024-byte rows after a 128-byte header: row 0 on page 0, row 3
    (bytes 3,200-4,223) across pages 0 and 1, row 9 (9,344-10,367) on page 2; asked for a run
    of adjacent pages at a time."""
    if mmap.PAGESIZE != 4096:
        pytest.skip("the expected pages assume 4 KiB pages")

    def pages_asked(rows):
        Mapped._mmap.asked = []
        pages.will_need(Mapped, np.array(rows))
        assert all(option == mmap.MADV_WILLNEED for option, _, _ in Mapped._mmap.asked)
        return covered([(start, length) for _, start, length in Mapped._mmap.asked])
    assert pages_asked([9, 0, 3]) == [0, 1, 2]
    assert pages_asked([0, 9]) == [0, 2]  # not the page between them
    assert len(Mapped._mmap.asked) == 2  # a call per run of adjacent pages
    pages.will_need(np.zeros((4, 4)), np.array([1]))  # an array in memory: nothing to ask


@pytest.fixture
def npy(tmp_path):
    """A (5000, 512) float16 .npy (1 KiB rows, as CLIP's embeddings) and its mapping."""
    path = str(tmp_path / "rows.npy")
    np.save(path, np.random.default_rng(0).standard_normal((5000, 512)).astype(np.float16))
    return path, np.load(path, mmap_mode="r")


def test_batched_advice_asks_for_the_same_pages(npy, monkeypatch):
    """The ranges handed to process_madvise, read back from the iovec array, are page aligned,
    lie in the mapping and cover exactly the pages of the rows; where the kernel refuses it, the
    rest are asked one range at a time and it is not tried again."""
    _, array = npy
    rows = np.sort(np.random.default_rng(1).choice(len(array), 300, replace=False))
    calls, refuse = [], []

    def syscall(number, pidfd, iov, count, advice, flags):
        ranges = np.frombuffer(ctypes.string_at(iov.value, count.value * 16), np.uint64)
        calls.append((advice.value, ranges.reshape(-1, 2).astype(np.int64)))
        return -1 if refuse else int(ranges.reshape(-1, 2)[:, 1].sum())
    monkeypatch.setattr(pages, "IOV_MAX", 7)  # several calls
    monkeypatch.setattr(pages, "_batch", {os.getpid(): (syscall, 440, -1)})
    pages.will_need(array, rows)
    assert {advice for advice, _ in calls} == {mmap.MADV_WILLNEED} and len(calls) > 1
    ranges = np.concatenate([r for _, r in calls])
    assert all(len(r) <= 7 for _, r in calls) and (ranges[:, 0] % mmap.PAGESIZE == 0).all()
    start = array.ctypes.data - array.offset % mmap.ALLOCATIONGRANULARITY
    rows_pages = sorted({(array[r:r + 1].ctypes.data + b) // mmap.PAGESIZE
                         for r in rows.tolist() for b in (0, array.strides[0] - 1)})
    assert covered(ranges.tolist()) == rows_pages
    assert ranges[:, 0].min() >= start and ranges.sum(1).max() <= start + len(array._mmap)
    # refused: the rest asked one range at a time (the same pages), and never tried again
    calls.clear()
    refuse.append(True)
    loop = Mapping()
    fake = type("Fake", (), {})  # the real array's attributes, its mapping recorded
    for name in ("offset", "strides", "ctypes"):
        setattr(fake, name, getattr(array, name))
    fake._mmap = loop
    monkeypatch.setattr(pages, "mapped", lambda a: True)
    pages.will_need(fake, rows)
    assert len(calls) == 1 and pages._batch[os.getpid()] is None
    assert covered([(start + s, n) for _, s, n in loop.asked]) == rows_pages
    pages.will_need(fake, rows)
    assert len(calls) == 1  # not tried again


def test_batched_advice_is_accepted_where_the_kernel_has_it(npy):
    _, array = npy
    if pages._process_madvise() is None:
        pytest.skip("no process_madvise here")
    starts, lengths = pages.page_runs(array, np.array([0, 2000, 4999]))
    address = array.ctypes.data - array.offset % mmap.ALLOCATIONGRANULARITY
    assert pages._advise_batched(address, starts, lengths) in (len(starts), 0)  # 0: refused


def test_take_equals_indexing_the_mapping(npy, tmp_path, monkeypatch):
    path, array = npy
    reads = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: reads.append(1) or preadv(*a))
    rng = np.random.default_rng(2)
    for rows in (np.sort(rng.choice(5000, 700, replace=False)), np.array([0, 4999]),
                 np.array([7]), np.arange(100, 164), np.array([], np.int64)):
        reads.clear()
        got = pages.take(array, rows)
        assert got.dtype == array.dtype and np.array_equal(got, np.asarray(array)[rows])
        consecutive = len(rows) and rows[-1] - rows[0] + 1 == len(rows)
        assert len(reads) == (0 if consecutive else len(rows))  # a pread a scattered row
    box = tmp_path / "box.npy"  # a column: (N, 4) int32 rows
    np.save(box, np.arange(4000, dtype=np.int32).reshape(1000, 4))
    assert np.array_equal(pages.take(np.load(box, mmap_mode="r"), [3, 500, 999]),
                          np.arange(4000).reshape(1000, 4)[[3, 500, 999]])
    rows = np.array([1, 10, 4000])
    assert np.array_equal(pages.take(np.asarray(array), rows), np.asarray(array)[rows])  # memory
    # the file replaced by another of that name (a newer index run): the mapping's rows
    expected = np.asarray(array)[rows].copy()
    os.remove(path)
    np.save(path, np.zeros((6000, 512), np.float16))
    reads.clear()
    assert np.array_equal(pages.take(array, rows), expected) and not reads
    os.remove(path)  # and removed
    assert np.array_equal(pages.take(array, rows), expected)
