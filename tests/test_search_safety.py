"""search.py, nothing lost and nothing silent: the user's files are never removed or replaced, a
vanished image folder never empties an index, bad flags and damaged files are one-line errors,
one run at a time, large scenes read (or skipped and listed) with bounded memory. Tiny CLIPs and
small generated images; the numbers are those of the issue's items."""
import errno
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mrs_adapter import datasets
from mrs_adapter.clip import transform
from mrs_adapter.prepare.cli import main as prepare_main
from mrs_adapter.search import index as search
from mrs_adapter.search import readers

ROOT = os.path.join(os.path.dirname(__file__), "..")
SIZES = {"a.png": (40, 30), "b.jpg": (64, 64), "sub/c.png": (150, 100), "d.tif": (90, 80),
         "e.png": (50, 50)}  # sub/c.png: 6 tiles; 10 entries in all


@pytest.fixture(scope="module")
def weights(tiny_clip_weights):
    return tiny_clip_weights(0)


def no_work(monkeypatch):
    """Make loading a model fail: an error raised anyway came before any work."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(search, "load_model", refuse)


# 1: the index never removes what it did not write; --out inside the images is refused
def test_out_inside_the_image_folder_is_refused(tmp_path, weights, random_images, search_index):
    images = random_images(tmp_path / "images", SIZES)
    os.makedirs(os.path.join(images, "parts"))
    Image.new("RGB", (40, 40)).save(os.path.join(images, "parts", "field.png"))
    np.save(os.path.join(images, "embeddings-2019.npy"), np.ones((2, 3)))  # the user's own
    before = sorted(search.list_images(images))
    for out in (images, os.path.join(images, "index")):
        with pytest.raises(ValueError, match="inside the image folder"):
            search_index(images, out, weights)
    assert sorted(search.list_images(images)) == before == sorted(list(SIZES) + ["parts/field.png"])
    assert os.path.exists(os.path.join(images, "embeddings-2019.npy"))
    assert not os.path.exists(os.path.join(images, "index.json"))


def test_commit_removes_only_the_files_the_index_wrote(
        tmp_path, weights, random_images, search_index):
    images = random_images(tmp_path / "images", SIZES)
    foreign = tmp_path / "mine"
    os.makedirs(foreign / "parts")
    (foreign / "parts" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by search.py.*new or empty folder"):
        search_index(images, foreign, weights)
    assert (foreign / "parts" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(foreign)) == ["parts"]  # nothing written there
    lookalike = tmp_path / "lookalike"  # named as the index names its files, but no index
    os.makedirs(lookalike)
    np.save(lookalike / "embeddings-000001.npy", np.ones(3))
    with pytest.raises(ValueError, match="e.g. embeddings-000001.npy"):
        search_index(images, lookalike, weights)
    assert np.load(lookalike / "embeddings-000001.npy").tolist() == [1, 1, 1]
    out = tmp_path / "index"
    assert search_index(images, out, weights) == 0
    np.save(out / "embeddings-mine.npy", np.ones(3))  # the user's files beside the index
    (out / "parts" / "notes.txt").write_text("mine")
    (out / "parts" / "part-000123.npy.notmine.tmp").write_text("mine")  # not atomic_write's
    os.remove(os.path.join(images, "a.png"))  # a change: the rerun commits generation 2
    assert search_index(images, out, weights) == 0
    assert sorted(os.listdir(out)) == ["embeddings-000002.box.npy", "embeddings-000002.npy",
                                       "embeddings-000002.rasters.json",  # d.tif's reading
                                       "embeddings-mine.npy", "index.json", "index.lock",
                                       "parts"]
    assert sorted(os.listdir(out / "parts")) == ["notes.txt", "part-000123.npy.notmine.tmp"]
    assert np.load(out / "embeddings-mine.npy").tolist() == [1, 1, 1]


# 2: an empty, unmounted or unreadable folder does not empty the index without --prune
def test_a_vanished_folder_does_not_empty_the_index(
        tmp_path, weights, random_images, search_index, index_rows):
    images = random_images(tmp_path / "images", SIZES)
    out = tmp_path / "index"
    assert search_index(images, out, weights) == 0
    before = index_rows(out)[0]
    os.rename(images, tmp_path / "away")
    os.makedirs(images)  # an empty mount point
    with pytest.raises(ValueError, match=r"5 of the 5 images .*unmounted.*unchanged.*--prune"):
        search_index(images, out, weights)
    assert index_rows(out)[0] == before
    os.rmdir(images)
    os.rename(tmp_path / "away", images)
    for name in ("a.png", "b.jpg", "d.tif"):  # rewritten unreadable: found only once read
        with open(os.path.join(images, name), "wb") as f:
            f.write(b"not an image")
    with pytest.raises(ValueError, match=r"3 of the 5 images .*saved in its parts/"):
        search_index(images, out, weights)
    assert index_rows(out)[0] == before
    assert search_index(images, out, weights, "--prune") == 0  # the user says they are gone
    assert [os.path.basename(p) for p, _ in index_rows(out)[0]] == ["e.png"] + ["c.png"] * 6
    os.remove(os.path.join(images, "e.png"))  # 1 of 2: not more than half, no flag needed
    assert search_index(images, out, weights) == 0
    assert len(index_rows(out)[0]) == 6


# 6: --json, --sheet, export --out and its manifest never replace a file the user wrote
def test_outputs_the_user_wrote_are_never_replaced(
        tmp_path, weights, monkeypatch, random_images, search_index, search_cli):
    images, out = random_images(tmp_path / "images", SIZES), tmp_path / "index"
    assert search_index(images, out, weights) == 0
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    np.save(tmp_path / "emb.npy", np.ones(3))
    np.save(tmp_path / "other.npy", np.ones(3))
    (tmp_path / "other.manifest.json").write_text('{"written_by": "me"}')
    no_work(monkeypatch)
    cases = [(["query", str(out), "a road", "--json", str(tmp_path / "notes.json")],
              "notes.json exists and was not written by search.py query; choose another --json"),
             (["query", str(out), "a road", "--sheet", str(tmp_path / "photo.png")],
              "photo.png exists.*--sheet"),
             (["export", str(out), "--out", str(tmp_path / "emb.npy")], "emb.npy exists.*--out"),
             (["export", str(out), "--out", str(tmp_path / "x" / "other.npy")], None)]
    os.makedirs(tmp_path / "x")
    os.rename(tmp_path / "other.manifest.json", tmp_path / "x" / "other.manifest.json")
    cases[-1] = (cases[-1][0], "other.manifest.json exists.*--out")  # the npy is new; not its json
    for argv, message in cases:
        with pytest.raises(FileExistsError, match=message):
            search_cli.main(argv)
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    assert Image.open(tmp_path / "photo.png").size == (4, 4)
    assert np.load(tmp_path / "emb.npy").tolist() == [1, 1, 1]
    assert json.load(open(tmp_path / "x" / "other.manifest.json")) == {"written_by": "me"}
    monkeypatch.undo()
    for _ in range(2):  # its own files are replaced by a rerun
        search_cli.main(["query", str(out), "a road", "--json", str(tmp_path / "hits.json"),
                         "--sheet", str(tmp_path / "hits.png")])
        assert search_cli.main(["export", str(out), "--out", str(tmp_path / "mine.npy")]) == 0


# 9: --clip-activation and --clip-sha256 as in train.py, printed, recorded and checked
def test_clip_activation_is_used_recorded_and_checked(
        tmp_path, weights, capsys, random_images, search_index, index_rows, search_cli):
    images = random_images(tmp_path / "images", SIZES)
    assert search_index(images, tmp_path / "gelu", weights, "--clip-activation", "gelu") == 0
    assert "MLP activation gelu (given)" in capsys.readouterr().out
    assert json.load(open(tmp_path / "gelu" / "index.json"))["model"]["activation"] == "gelu"
    d = os.path.join(images, "d.tif")
    hits = search_cli.main(["query", str(tmp_path / "gelu"), "--image", d, "--top", "1"])
    assert "MLP activation gelu (recorded in index" in capsys.readouterr().out
    assert hits[0]["path"] == d and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(ValueError, match="another model.*activation: gelu.*quickgelu"):
        search_cli.main(["query", str(tmp_path / "gelu"), "--image", d, "--clip-activation",
                         "quickgelu"])
    assert search_index(images, tmp_path / "quick", weights) == 0
    assert "MLP activation quickgelu" in capsys.readouterr().out
    assert search_index(images, tmp_path / "gelu2", weights, "--clip-activation", "gelu") == 0
    gelu = index_rows(tmp_path / "gelu")[1].astype(np.float32)
    assert np.abs(gelu - index_rows(tmp_path / "gelu2")[1]).max() < 3e-4  # float16 rounding at most
    assert np.abs(gelu - index_rows(tmp_path / "quick")[1]).max() > 1.5e-3  # QuickGELU: 2.6e-3 here
    with pytest.raises(ValueError, match="sha256"):
        search_index(images, tmp_path / "pinned", weights, "--clip-sha256", "0" * 64)


# 10, 15: unreadable folders, broken links and link loops are skipped and listed
def test_unreadable_folder_and_broken_links_are_listed(
        tmp_path, weights, capsys, monkeypatch, random_images, search_index, index_rows):
    images, out = random_images(tmp_path / "images", SIZES), tmp_path / "index"
    assert search_index(images, out, weights) == 0
    os.symlink("gone.png", os.path.join(images, "broken.png"))
    os.symlink("loop_b.png", os.path.join(images, "loop_a.png"))
    os.symlink("loop_a.png", os.path.join(images, "loop_b.png"))
    sub = os.path.realpath(os.path.join(images, "sub"))
    scandir = os.scandir

    def unreadable(path="."):  # as chmod 000, which does not stop root
        if os.path.realpath(path) == sub:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return scandir(path)
    monkeypatch.setattr(os, "scandir", unreadable)
    capsys.readouterr()
    assert search_index(images, out, weights) == 0
    printed = capsys.readouterr().out
    assert "3 unreadable file(s) skipped, 1 folder(s) not readable" in printed
    assert "sub/: folder not readable (Permission denied)" in printed
    assert "broken.png: broken symbolic link (its target gone.png does not exist)" in printed
    assert "loop_a.png: symbolic link loop" in printed
    assert "loop_b.png: symbolic link loop" in printed
    assert sum(p.endswith("sub/c.png") for p, _ in index_rows(out)[0]) == 6  # kept, not removed


# 10: a linked folder is followed (its images indexed), a link back up is a loop, listed
def test_linked_folders_are_followed_and_link_loops_listed(
        tmp_path, weights, capsys, random_images, search_index, index_rows):
    elsewhere = random_images(tmp_path / "elsewhere", {"far.png": (40, 30)})
    images = random_images(tmp_path / "images", {"a.png": (40, 30)})
    os.symlink(elsewhere, os.path.join(images, "linked"))
    os.symlink("..", os.path.join(images, "up"))
    capsys.readouterr()
    assert search_index(images, tmp_path / "index", weights) == 0
    printed = capsys.readouterr().out
    assert sorted(os.path.relpath(p, images) for p, _ in index_rows(tmp_path / "index")[0]) == \
        ["a.png", os.path.join("linked", "far.png")]
    assert "up/: symbolic link loop (a folder already listed)" in printed


# 11: an embeddings file that does not hold the rows index.json records is named
def test_embeddings_with_missing_rows_are_refused(
        tmp_path, weights, monkeypatch, random_images, search_index, search_cli):
    images, out = random_images(tmp_path / "images", SIZES), tmp_path / "index"
    assert search_index(images, out, weights) == 0
    emb = out / "embeddings-000001.npy"
    rows = np.load(emb)
    np.save(emb, rows[:4])
    with pytest.raises(ValueError, match=r"embeddings-000001.npy: it holds \(4, 32\) float16, "
                                         r"but .*index.json records 10 rows"):
        search_cli.main(["query", str(out), "a road"])
    with pytest.raises(ValueError, match="embeddings-000001.npy"):
        search_index(images, out, weights)
    np.save(emb, rows)
    with open(emb, "r+b") as f:  # cut mid-row
        f.truncate(os.path.getsize(emb) - 10)
    with pytest.raises(ValueError, match="embeddings-000001.npy: not a whole .npy file"):
        search_cli.main(["query", str(out), "a road"])
    np.save(emb, rows)
    boxes = out / "embeddings-000001.box.npy"  # the tiles' boxes (tile_store.py)
    whole = np.load(boxes)
    np.save(boxes, whole[:9])
    with pytest.raises(ValueError, match=r"embeddings-000001.box.npy: it holds \(9, 4\) int32, "
                                         r"but .*index.json records 10 rows"):
        search_cli.main(["query", str(out), "a road"])
    os.remove(boxes)
    with pytest.raises(FileNotFoundError, match=r"embeddings-000001.box.npy is missing"):
        search_index(images, out, weights)
    np.save(boxes, whole)

    def killed(*a, **k):
        raise KeyboardInterrupt  # the run stops after its parts are saved, before the commit
    monkeypatch.setattr(search, "commit", killed)
    random_images(images, {"new.png": (30, 30)}, seed=9)
    with pytest.raises(KeyboardInterrupt):
        search_index(images, out, weights, "--save-every", "1")
    monkeypatch.undo()
    part = glob.glob(str(out / "parts" / "part-??????.npy"))[0]
    np.save(part, np.load(part)[:0])
    with pytest.raises(ValueError, match=os.path.basename(part) + ".*records 1 rows"):
        search_index(images, out, weights)


# 13: a blank query is refused; a query longer than the context is said to be cut, once
def test_blank_query_refused_long_query_said(
        tmp_path, weights, capsys, random_images, search_index, search_cli):
    images, out = random_images(tmp_path / "images", SIZES), tmp_path / "index"
    assert search_index(images, out, weights) == 0
    for text in ("", "  \n "):
        with pytest.raises(ValueError, match="query text is empty"):
            search_cli.main(["query", str(out), text])
    capsys.readouterr()
    assert len(search_cli.main(["query", str(out), "road " * 100, "--top", "3"])) == 3
    printed = capsys.readouterr().out
    assert printed.count("warning") == 1 and "102 tokens, more than the model's 77-token" in printed
    search_cli.main(["query", str(out), "road " * 10])
    assert "warning" not in capsys.readouterr().out


def write_precomp(root, images):
    """A tiny rsitmd precomp set: train and test, 5 captions an image."""
    os.makedirs(os.path.join(root, "rsitmd_precomp"))
    os.rename(images, os.path.join(root, "rsitmd_images"))
    for split, names in (("train", ["a.png", "b.jpg", "e.png"]), ("test", ["c.png", "d.tif"])):
        caps = [f"caption {k} of {n}" for n in names for k in range(5)]
        listed = names if split == "train" else [n for n in names for _ in range(5)]
        for kind, lines in (("caps", caps), ("filename", listed)):
            with open(os.path.join(root, "rsitmd_precomp", f"{split}_{kind}.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")


# 14: scenes over Pillow's decompression-bomb limit are read; over ours, skipped and listed
def test_large_scenes_read_or_skipped_never_a_traceback(
        tmp_path, weights, capsys, monkeypatch, random_images, search_index, index_rows,
        search_cli):
    images = random_images(tmp_path / "images", SIZES)
    c = os.path.join(images, "sub", "c.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # sub/c.png's 15,000 px: a "bomb" to PIL
    assert search_index(images, tmp_path / "index", weights) == 0
    assert sum(p == c for p, _ in index_rows(tmp_path / "index")[0]) == 6
    assert search_cli.main(["query", str(tmp_path / "index"), "--image", c])[0]["path"] == c
    assert Image.MAX_IMAGE_PIXELS == 2000  # Pillow's own limit is back for everyone else
    # with rasterio (the [geo] extra) such a scene is read by window; without it Pillow reads it
    # whole, under datasets.MAX_PIXELS
    monkeypatch.setattr(readers, "has_rasterio", lambda: False)
    monkeypatch.setattr(datasets, "MAX_PIXELS", 10_000)  # now over ours: skipped, listed, not fatal
    capsys.readouterr()
    assert search_index(images, tmp_path / "capped", weights) == 0
    printed = capsys.readouterr().out
    assert "1 unreadable file(s) skipped" in printed
    assert "sub/c.png: cannot read image" in printed and "150 x 100 px is more than" in printed
    assert len(index_rows(tmp_path / "capped")[0]) == 4
    with pytest.raises(ValueError, match="c.png.*150 x 100 px is more than the 10,000 px"):
        search_cli.main(["query", str(tmp_path / "index"), "--image", c])
    os.rename(c, os.path.join(images, "c.png"))
    write_precomp(tmp_path / "data", images)
    check = ["check", "--dataset", "rsitmd", "--data-root", str(tmp_path / "data")]
    capsys.readouterr()
    assert prepare_main(check) == 1  # over ours: one line naming the image
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if "error" in line and "c.png" in line]
    monkeypatch.setattr(datasets, "MAX_PIXELS", 2 ** 30)
    assert prepare_main(check) == 0  # over Pillow's only: read, no error


# 15: bad flags and paths, each one line naming the flag or path, before any model is loaded
BAD = [(["query", "{out}", "road", "--top", "0"], "--top 0: expected a positive number"),
       (["query", "{out}", "road", "--top", "-3"], "--top -3"),
       (["index", "{images}", "--out", "{tmp}/i", "--clip", "w", "--batch-size", "0"],
        "--batch-size 0"),
       (["index", "{images}", "--out", "{tmp}/i", "--clip", "w", "--save-every", "-1"],
        "--save-every -1"),
       (["index", "{images}", "--out", "{tmp}/i", "--clip", "w", "--workers", "-1"],
        "--workers -1"),
       (["index", "{images}", "--out", "{tmp}/i", "--clip", "w", "--device", "cuda"],
        "--device cuda: torch sees 0 CUDA GPU"),
       (["index", "{images}", "--out", "{tmp}/file.txt/i", "--clip", "w"],
        "file.txt is a file, not a folder; choose another --out"),
       (["index", "{images}", "--out", "{tmp}/file.txt", "--clip", "w"], "file.txt is a file"),
       (["query", "{out}", "road", "--json", "{tmp}"], "is a folder, not a file; .*--json"),
       (["query", "{out}", "road", "--sheet", "{tmp}/file.txt/s.png"],
        "file.txt is a file.*--sheet"),
       (["export", "{out}", "--out", "{tmp}"], "is a folder, not a file; .*--out")]


def test_bad_flags_and_paths_are_refused_first(
        tmp_path, weights, monkeypatch, random_images, search_index, search_cli):
    images, out = random_images(tmp_path / "images", SIZES), tmp_path / "index"
    assert search_index(images, out, weights) == 0
    (tmp_path / "file.txt").write_text("a file")
    no_work(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in BAD:
        argv = [a.format(out=out, images=images, tmp=tmp_path) for a in argv]
        with pytest.raises(ValueError, match=message):
            search_cli.main(argv)


def test_a_hand_edited_index_json_is_named(
        tmp_path, weights, random_images, search_index, search_cli):
    images, out = random_images(tmp_path / "images", SIZES), tmp_path / "index"
    assert search_index(images, out, weights) == 0
    path = out / "index.json"
    good = json.load(open(path))
    first = sorted(good["files"])[0]
    edits = [("{", "index.json: not valid JSON"),
             ({k: v for k, v in good.items() if k != "files"}, "'files' is None, expected dict"),
             (dict(good, rows="10"), "'rows' is '10', expected int"),
             (dict(good, model={"backbone": "x"}), "its model lacks"),
             (dict(good, files=dict(good["files"], **{first: {"size": 1}})),
              f"the entry of '{first}' should be"),
             (dict(good, files=dict(good["files"], **{first: dict(good["files"][first],
                                                                  tiles=-1)})),
              f"the entry of '{first}' should be"),
             (dict(good, columns=["box", "bounds"]), "columns should be"),
             (dict(good, format=3), "is of format 3; this search.py reads format 2"),
             (dict(good, rows=12), "its files hold 10 rows, but it says rows: 12"),
             (dict(good, replaced=["../images/a.png"]), "other files than embeddings")]
    for edit, message in edits:
        path.write_text(edit if isinstance(edit, str) else json.dumps(edit))
        for run in (lambda: search_cli.main(["query", str(out), "road"]),
                    lambda: search_index(images, out, weights)):
            with pytest.raises(ValueError, match=message):
                run()
    assert os.path.exists(os.path.join(images, "a.png"))


# 15: a full disk: one line naming the file and saying what stays safe
def test_a_full_disk_says_what_is_safe(
        tmp_path, weights, monkeypatch, random_images, search_index, index_rows, search_cli,
        search_tile):
    images, out = random_images(tmp_path / "images", SIZES), tmp_path / "index"
    assert search_index(images, out, weights) == 0
    before = index_rows(out)
    random_images(images, {"new.png": (30, 30)}, seed=9)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    argv = ["index", images, "--out", str(out), "--clip", weights, *search_tile]
    with pytest.raises(OSError, match=r"no space left on the device to write .*parts/part-000001"
                                      r".npy: the index in .* is as last committed"):
        search_cli.main(argv)
    with pytest.raises(SystemExit) as stop:  # for the shell: one line
        search_cli.cli(argv)
    assert str(stop.value).startswith("error: [Errno 28] no space left on the device to write ")
    assert "\n" not in str(stop.value)
    with pytest.raises(SystemExit, match="hits.json: that file was not written"):
        search_cli.cli(["query", str(out), "road", "--json", str(tmp_path / "hits.json")])
    monkeypatch.undo()
    after = index_rows(out)
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert not glob.glob(str(out / "**" / "*.tmp"), recursive=True)
    assert not os.path.exists(tmp_path / "hits.json")


HOLD_AND_DIE = """
import os, signal, sys
from mrs_adapter.search.store import index_lock
held = index_lock(sys.argv[1])
held.__enter__()  # never left: as a run killed by kill -9 or a power cut
os.kill(os.getpid(), signal.SIGKILL)
"""


# 16: one index run at a time; a killed run's lock is recovered
def test_a_second_run_at_once_is_refused(
        tmp_path, weights, capsys, monkeypatch, random_images, search_index, index_rows):
    images, out = random_images(tmp_path / "images", SIZES), tmp_path / "index"
    assert search_index(images, out, weights) == 0
    random_images(images, {"new.png": (30, 30), "new2.png": (30, 30)}, seed=9)
    encode, tried = search.encode_images, []

    def second_run_meanwhile(model, x, device):  # while the first run is embedding
        if not tried:
            tried.append(True)
            with pytest.raises(FileExistsError, match=f"another run \\(process {os.getpid()}, "):
                search_index(images, out, weights)
        return encode(model, x, device)
    monkeypatch.setattr(search, "encode_images", second_run_meanwhile)
    assert search_index(images, out, weights, "--save-every", "1") == 0
    assert tried and len(index_rows(out)[0]) == 12
    monkeypatch.undo()
    random_images(images, {"new3.png": (30, 30)}, seed=11)
    run = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    capsys.readouterr()
    assert search_index(images, out, weights) == 0
    assert "ended without finishing (killed?); its lock is recovered" in capsys.readouterr().out
    assert len(index_rows(out)[0]) == 13


# 17: a large scene's tiles go to the encoder a batch at a time
def test_tiles_in_flight_stay_bounded(
        tmp_path, weights, monkeypatch, make_tiny_clip, random_images, search_index, index_rows):
    images = random_images(tmp_path / "images", {"scene.png": (320, 240)})  # 7 x 5 = 35 tiles
    decoded, encoded, in_flight = [0], [0], []
    split, encode = search.split_at_to_tensor, search.encode_images

    def counting_split(preprocess):
        decode, finish = split(preprocess)

        def counted(image):
            decoded[0] += 1
            return decode(image)
        return counted, finish

    def counting_encode(model, x, device):
        in_flight.append(decoded[0] - encoded[0])  # decoded, not yet encoded
        encoded[0] += len(x)
        assert len(x) <= 8
        return encode(model, x, device)
    monkeypatch.setattr(search, "split_at_to_tensor", counting_split)
    monkeypatch.setattr(search, "encode_images", counting_encode)
    assert search_index(images, tmp_path / "index", weights) == 0
    assert decoded[0] == encoded[0] == 35 and max(in_flight) <= 2 * 8
    monkeypatch.undo()
    model = make_tiny_clip(0)  # the rows belong to their tiles, in order
    tiles, boxes = search.read_tiles(os.path.join(images, "scene.png"), lambda im: im, 64, 48)
    preprocess = transform(32)
    x = torch.stack([preprocess(Image.fromarray(t.permute(1, 2, 0).numpy())) for t in tiles])
    with torch.no_grad():
        expected = F.normalize(model.encode_image(x), dim=-1)  # one batch, not the index's 8s
    rows, emb = index_rows(tmp_path / "index")
    assert [box for _, box in rows] == [list(b) for b in boxes]
    np.testing.assert_allclose(emb.astype(np.float32), expected.numpy(), atol=2e-3)
    assert np.abs(emb[0].astype(np.float32) - expected[1].numpy()).max() > 1e-2  # tiles differ
