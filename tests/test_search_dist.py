"""search.py at archive scale (issue 23): `index` under torchrun (two gloo processes) equals one
process, goes on incrementally and refuses another model with one error; a failure on one
process stops both, and what both saved is reused; `merge` of two halves equals the whole and
refuses indexes that disagree. Tiny CLIPs and small generated images."""
import json
import os
import re
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrs_adapter.search import index as search
from mrs_adapter.search.shard import pixel_count, share_by_pixels

# two halves of one folder; north/c.png and south/e.png are cut into 6 and 4 tiles
SIZES = {"north/a.png": (40, 30), "north/b.jpg": (64, 64), "north/c.png": (150, 100),
         "south/d.tif": (90, 80), "south/e.png": (200, 60), "south/f.png": (50, 50)}


@pytest.fixture(scope="module")
def weights(tiny_clip_weights):
    return [tiny_clip_weights(0), tiny_clip_weights(1)]


def assert_same_index(index_rows, out, expected):
    """Same files and boxes in the same order; rows within float16 rounding (the batches differ,
    so never bit for bit)."""
    (got, rows), (want, want_rows) = index_rows(out), index_rows(expected)
    assert got == want
    np.testing.assert_allclose(rows, want_rows, atol=1e-3)


def shares(stdout):
    """{rank: images} of the line `index` prints under torchrun."""
    line = next(line for line in stdout.splitlines() if line.startswith("shares: "))
    return {int(r): int(n) for r, n in re.findall(r"rank (\d+) (\d+) images", line)}


def test_shares_balance_pixels_not_files(tmp_path, random_images):
    assert share_by_pixels([100, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4]]  # by count: 3 and 2
    pixels = [w * h for w, h in SIZES.values()]  # 15000 and 12000 go apart, then least loaded
    assert share_by_pixels(pixels, 2) == [[1, 2, 5], [0, 3, 4]]
    assert share_by_pixels(pixels, 1) == [list(range(6))] and share_by_pixels([], 3) == [[]] * 3
    images = random_images(tmp_path / "images", SIZES)
    assert pixel_count(os.path.join(images, "south/e.png")) == 200 * 60
    with open(tmp_path / "broken.png", "wb") as f:
        f.write(b"\x89PNG truncated")
    assert pixel_count(str(tmp_path / "broken.png")) == 0  # its reader will report it


def test_a_geotiff_is_counted_from_its_header(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    path = str(tmp_path / "scene.tif")  # 4 bands of 16 bits: Pillow cannot open it
    with warnings.catch_warnings():  # no georeferencing: not the point here
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=4,
                           dtype="uint16") as dst:
            dst.write(np.ones((4, 200, 300), np.uint16))
    assert pixel_count(path) == 300 * 200


def test_torchrun_index_equals_one_process_goes_on_and_refuses_another_model(
        tmp_path, weights, random_images, search_index, index_rows, search_tile, torchrun,
        error_lines):
    images = random_images(tmp_path / "images", SIZES)
    one, two = tmp_path / "one", tmp_path / "two"
    assert search_index(images, one, weights[0]) == 0
    proc = torchrun("search.py", ["index", images, "--out", str(two), "--clip", weights[0],
                                  *search_tile], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "shared by pixels among 2 processes" in proc.stdout
    assert shares(proc.stdout) == {0: 3, 1: 3}  # by pixels: see test_shares_balance_pixels...
    assert proc.stdout.count(f"index {two}: 14 entries from 6 images") == 1  # rank 0 alone
    assert_same_index(index_rows, two, one)
    assert not os.listdir(two / "parts")  # every process's parts absorbed by the one commit
    # a second run embeds only the new file
    random_images(images, {"south/g.png": (70, 70)}, seed=7)
    proc = torchrun("search.py", ["index", images, "--out", str(two), "--clip", weights[0],
                                  *search_tile], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "indexing 1 new or changed of 7 images" in proc.stdout
    assert sum(shares(proc.stdout).values()) == 1
    assert search_index(images, one, weights[0]) == 0
    assert_same_index(index_rows, two, one)
    # another model: one error, from one process, and neither waits for the other
    before = sorted(os.listdir(two))
    proc = torchrun("search.py", ["index", images, "--out", str(two), "--clip", weights[1],
                                  *search_tile], tmp_path)
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: index {two} was built with another model")
    assert sorted(os.listdir(two)) == before
    assert_same_index(index_rows, two, one)


def failing_worker(rank: int, init: str, images: str, out: str, weights: str, results: str):
    """One of two processes indexing `images`; process 1 meets a full disk at its 2nd batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))  # a hang fails the test, not CI
    calls, original = [0], search.encode_images

    def encode(*args):
        calls[0] += 1
        if rank == 1 and calls[0] == 2:
            raise OSError(28, "No space left on device")
        return original(*args)

    search.encode_images = encode
    model, preprocess, identity = search.load_model(None, weights, log=lambda *a: None)
    try:
        search.build_index(images, out, model, preprocess, identity, 64, 48, batch_size=1,
                           save_every=1, log=lambda *a: None)
        outcome = ["finished", None]
    except OSError as e:
        outcome = [str(e), getattr(e, "reported_by", None)]
    with open(os.path.join(results, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


def test_a_failure_on_one_process_stops_both_and_their_parts_are_reused(
        tmp_path, weights, random_images, search_index, index_rows):
    images = random_images(tmp_path / "images", SIZES)
    out = tmp_path / "index"
    mp.spawn(failing_worker, args=(str(tmp_path / "init"), images, str(out), weights[0],
                                   str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):  # the same error everywhere, reported by the process that met it
        assert json.load(open(tmp_path / f"rank{rank}.json")) == [
            "[Errno 28] No space left on device", 1]
    assert json.load(open(out / "index.json"))["files"] == {}  # nothing committed
    saved = {int(name[5:11]): json.load(open(out / "parts" / name))["files"]
             for name in os.listdir(out / "parts") if name.endswith(".json")}
    assert {n % 2 for n in saved} == {0, 1}  # rank r's parts are r, r + 2, ...: no collision
    assert {rel for files in saved.values() for rel in files} == {
        "north/b.jpg", "north/c.png", "south/f.png",  # rank 0's share, all of it
        "north/a.png"}  # rank 1's first image, saved before its second failed
    model, preprocess, identity = search.load_model(None, weights[0])
    result = search.build_index(images, str(out), model, preprocess, identity, 64, 48)
    assert result["embedded"] == 2  # south/d.tif and south/e.png only
    assert search_index(images, tmp_path / "fresh", weights[0]) == 0
    assert_same_index(index_rows, out, tmp_path / "fresh")


def test_merge_of_two_halves_equals_the_whole(
        tmp_path, weights, capsys, random_images, search_index, index_rows, search_cli):
    images = random_images(tmp_path / "images", SIZES)
    halves = [tmp_path / "north", tmp_path / "south"]
    for half in halves:
        assert search_index(os.path.join(images, half.name), half, weights[0]) == 0
    merged = tmp_path / "merged"
    assert search_cli.main(["merge", *map(str, halves), "--out", str(merged)]) == 0
    assert search_index(images, tmp_path / "whole", weights[0]) == 0
    assert_same_index(index_rows, merged, tmp_path / "whole")
    assert json.load(open(merged / "index.json"))["images"] == os.path.abspath(images)
    capsys.readouterr()
    assert search_index(images, merged, weights[0]) == 0  # the merged index goes on like any other
    assert "indexing 0 new or changed of 6 images" in capsys.readouterr().out


def test_merge_refuses_indexes_that_disagree(
        tmp_path, weights, random_images, search_index, search_cli):
    images = random_images(tmp_path / "images", SIZES)
    north, south = os.path.join(images, "north"), os.path.join(images, "south")
    a, other_model, other_tile = tmp_path / "a", tmp_path / "b1", tmp_path / "b2"
    assert search_index(north, a, weights[0]) == 0
    assert search_index(south, other_model, weights[1]) == 0
    assert search_cli.main(["index", south, "--out", str(other_tile), "--clip", weights[0],
                            "--tile", "32", "--stride", "32", "--workers", "0"]) == 0
    out = tmp_path / "merged"

    def refused(*indexes, match):
        with pytest.raises(ValueError, match=match):
            search_cli.main(["merge", *map(str, indexes), "--out", str(out)])
        assert not os.path.exists(out) or not os.listdir(out) or os.listdir(out) == ["index.lock"]

    refused(a, other_model, match=re.escape(f"index {other_model} was built with another model"))
    refused(a, other_tile, match=re.escape(f"index {other_tile} was built with --tile 32, index "
                                           f"{a} with --tile 64"))
    changed = tmp_path / "changed"  # north/a.png rewritten, then the whole folder indexed
    random_images(images, {"north/a.png": (41, 30)}, seed=3)
    assert search_index(images, changed, weights[0]) == 0
    refused(a, changed, match=re.escape(f"{os.path.join(images, 'north/a.png')} is in index {a} "
                                        f"with size"))
    b = tmp_path / "b"
    assert search_index(south, b, weights[0]) == 0
    os.makedirs(out)
    open(out / "notes.txt", "w").close()  # the user's: never written over
    with pytest.raises(ValueError, match="not written by search.py"):
        search_cli.main(["merge", str(a), str(b), "--out", str(out)])
    with pytest.raises(ValueError, match=re.escape(f"--out {b} holds an index")):
        search_cli.main(["merge", str(a), str(b), "--out", str(b)])
