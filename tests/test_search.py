"""search.py: tiles, a query equal to a brute-force ranking, incremental and resumed indexes,
unreadable files, and the refusal to mix models; tiny CLIPs and small generated images."""
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

from mrs_adapter.checkpoint import save_trainable
from mrs_adapter.datasets import default_workers
from mrs_adapter.methods import apply_method, method_options
from mrs_adapter.search import index as search
from mrs_adapter.search import query as search_query
from mrs_adapter.tokenizer import tokenize

SLACK = 2e-3  # float16 storage: a cosine of unit vectors moves by at most ~5e-4


def scene(seed: int, width: int, height: int) -> Image.Image:
    """Coloured blocks on a gradient, so that different images and tiles embed differently."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * rng.uniform(0.5, 2) + y * rng.uniform(0, 1)) % 256,
                       (y * rng.uniform(0.5, 2)) % 256, np.full_like(x, rng.integers(0, 256))], -1)
    for _ in range(6):
        left, top = rng.integers(0, width), rng.integers(0, height)
        pixels[top:top + height // 4, left:left + width // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.astype(np.uint8))


def write_images(folder, names_sizes, seed: int = 0):
    for i, (name, size) in enumerate(names_sizes):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        scene(seed + i, *size).save(path)


IMAGES = [("a.png", (40, 30)), ("sub/big.TIF", (150, 100)), ("c.jpg", (64, 64)),
          ("d.tiff", (90, 80)), ("sub/deeper/e.jpeg", (200, 60))]


@pytest.fixture(scope="module")
def setup(tiny_clip_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    weights = [tiny_clip_weights(0), tiny_clip_weights(1)]
    images = str(root / "images")
    write_images(images, IMAGES)
    with open(os.path.join(images, "notes.txt"), "w") as f:
        f.write("not an image, not listed")
    return root, images, weights


def test_tile_boxes_cover_the_image():
    assert search.tile_boxes(96, 40, 64, 48) == [None]  # up to 1.5 tiles a side: whole
    assert search.tile_boxes(150, 100, 64, 48) == [
        (0, 0, 64, 64), (48, 0, 112, 64), (86, 0, 150, 64),  # the last column flush right
        (0, 36, 64, 100), (48, 36, 112, 100), (86, 36, 150, 100)]  # the last row flush bottom
    for width, height, tile, stride in ((97, 40, 64, 48), (1000, 700, 256, 192), (300, 300, 64, 64),
                                        (500, 30, 64, 40)):
        covered = np.zeros((height, width), int)
        for left, top, right, bottom in search.tile_boxes(width, height, tile, stride):
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            assert right - left == min(tile, width) and bottom - top == min(tile, height)
            covered[top:bottom, left:right] += 1
        assert covered.min() >= 1, (width, height)


def test_tiles_hold_the_pixels_of_their_boxes(tmp_path):
    image = scene(3, 150, 100)
    image.save(tmp_path / "x.png")
    tiles, boxes = search.read_tiles(str(tmp_path / "x.png"), lambda im: im, 64, 48)  # no resize
    pixels = np.asarray(image)
    assert len(tiles) == len(boxes) == 6
    for tile, (left, top, right, bottom) in zip(tiles, boxes):  # box = [left, top, right, bottom]
        assert np.array_equal(tile.permute(1, 2, 0).numpy(), pixels[top:bottom, left:right])


def test_lists_images_recursively_any_case(setup):
    _, images, _ = setup
    assert search.list_images(images) == ["a.png", "c.jpg", "d.tiff", "sub/big.TIF",
                                          "sub/deeper/e.jpeg"]


def test_top_k_equals_a_full_sort():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((5000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb.astype(np.float16)
    emb[4000:4010] = emb[7]  # exact ties, across blocks
    query = emb[7].astype(np.float32)
    exact = emb.astype(np.float32) @ query
    expected = np.lexsort((np.arange(len(exact)), -exact))[:25]  # best first, ties by row
    rows, scores = search_query.top_k(emb, query, 25, block=777)
    assert rows.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, exact[expected], atol=1e-6)


@pytest.fixture
def trained_checkpoint(make_tiny_clip):
    """trained_checkpoint(root, weights) -> (path, model): an MRS-Adapter checkpoint whose adapters
    are far from their identity start."""
    def write(root, weights):
        torch.manual_seed(5)
        model = apply_method(make_tiny_clip(0), "mrs_adapter", {}, verbose=False)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        path = str(root / "best.pt")
        config = {"clip": weights, "method": "mrs_adapter",
                  "method_options": method_options("mrs_adapter")}  # as train.py records them
        save_trainable(model, path, config=config)
        return path, model.eval()
    return write


@torch.no_grad()
def brute_force(model, preprocess, images, query):
    """[(score, path, box)] over every tile, with the package's encoders, sorted best first."""
    entries, embeddings = [], []
    for rel in search.list_images(images):
        image = Image.open(os.path.join(images, rel)).convert("RGB")
        for box in search.tile_boxes(*image.size, 64, 48):
            crop = image if box is None else image.crop(box)
            embeddings.append(F.normalize(model.encode_image(preprocess(crop)[None]), dim=-1)[0])
            entries.append((os.path.join(images, rel), None if box is None else list(box)))
    scores = (torch.stack(embeddings) @ query).tolist()
    return sorted(((s, *e) for s, e in zip(scores, entries)), key=lambda t: -t[0])


def test_query_equals_brute_force_ranking(
        setup, trained_checkpoint, tmp_path, search_cli, search_tile):
    root, images, weights = setup
    checkpoint, model = trained_checkpoint(root, weights[0])
    out = tmp_path / "index"
    assert search_cli.main(["index", images, "--out", str(out), "--checkpoint", checkpoint,
                            *search_tile]) == 0
    _, preprocess, identity = search.load_model(checkpoint)  # brute force: the model as trained
    assert identity["method"] == "mrs_adapter" and identity["checkpoint_sha256"]
    text = "a red field beside a road"
    query = F.normalize(model.encode_text(tokenize([text], model.context_length)), dim=-1)[0]
    expected = brute_force(model, preprocess, images, query)
    assert len(expected) == 1 + 6 + 1 + 1 + 4  # a, big (6 tiles), c, d, e (4 tiles)
    assert expected[0][0] - expected[9][0] > 10 * SLACK  # the ranking is not a near-tie
    hits = search_cli.main(["query", str(out), text, "--top", "10", "--json",
                            str(tmp_path / "hits.json"), "--sheet", str(tmp_path / "sheet.png")])
    written = json.load(open(tmp_path / "hits.json"))  # hits + where they are (none here)
    assert written["query"] == f'text "{text}"' and written["hits"] == [
        dict(h, crs=None, bounds=None, footprint=None) for h in hits]
    assert [h["rank"] for h in hits] == list(range(1, 11))
    by_entry = {(p, json.dumps(b)): s for s, p, b in expected}
    for hit, (score, _, _) in zip(hits, expected):
        assert abs(hit["score"] - score) < SLACK  # the k-th best score, whatever the tie order
        assert abs(by_entry[(hit["path"], json.dumps(hit["box"]))] - hit["score"]) < SLACK
    assert Image.open(tmp_path / "sheet.png").size[0] > 0
    # by image: an image stored whole finds itself first
    hits = search_cli.main(["query", str(out), "--image", os.path.join(images, "d.tiff"),
                            "--top", "3"])
    assert hits[0]["path"] == os.path.join(images, "d.tiff") and hits[0]["box"] is None
    assert hits[0]["score"] == pytest.approx(1.0, abs=SLACK)


def assert_equals_fresh_index(search_index, index_rows, out, images, weights, tmp_path):
    """`out` (decoded in the main process) equals a fresh index of `images` decoded in 2 loader
    processes (the default on CUDA): same entries per file, embeddings within float16 rounding."""
    assert search_index(images, tmp_path / "fresh", weights, "--workers", "2") == 0
    (entries, emb), (fresh_entries, fresh_emb) = index_rows(out), index_rows(tmp_path / "fresh")
    # files in another order (a rerun appends its new files' rows), each file's rows in box order
    mine = sorted(range(len(entries)), key=lambda r: (entries[r][0], r))
    fresh = sorted(range(len(fresh_entries)), key=lambda r: (fresh_entries[r][0], r))
    assert [entries[r] for r in mine] == [fresh_entries[r] for r in fresh]
    np.testing.assert_allclose(emb[mine], fresh_emb[fresh], atol=1e-3)
    return entries


def test_incremental_index_equals_a_fresh_one(
        setup, tmp_path, capsys, search_index, index_rows, search_cli):
    _, _, weights = setup
    images = str(tmp_path / "images")
    write_images(images, IMAGES)
    out = tmp_path / "incremental"
    assert search_index(images, out, weights[0]) == 0
    os.remove(os.path.join(images, "c.jpg"))  # deleted
    write_images(images, [("d.tiff", (90, 80))], seed=50)  # changed (content, size)
    os.utime(os.path.join(images, "d.tiff"), ns=(1, 1))
    write_images(images, [("new/f.png", (130, 70))], seed=60)  # added
    capsys.readouterr()
    assert search_index(images, out, weights[0]) == 0
    assert "indexing 2 new or changed of 5 images" in capsys.readouterr().out
    entries = assert_equals_fresh_index(search_index, index_rows, out, images, weights[0], tmp_path)
    assert not any(p.endswith("c.jpg") for p, _ in entries)
    exported = tmp_path / "emb.npy"
    assert search_cli.main(["export", str(out), "--out", str(exported)]) == 0
    np.testing.assert_array_equal(np.load(exported), index_rows(out)[1].astype(np.float16))
    manifest = json.load(open(tmp_path / "emb.manifest.json"))
    assert [(e["path"], e["box"]) for e in manifest["entries"]] == entries


KILLED = """
import os, signal, sys
from mrs_adapter.search import index as search
calls, original = [0], search.encode_images
def killed_on_third_batch(*args):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as kill -9 or a power cut
    return original(*args)
search.encode_images = killed_on_third_batch
model, preprocess, identity = search.load_model(None, sys.argv[3])
search.build_index(sys.argv[1], sys.argv[2], model, preprocess, identity, 64, 48, batch_size=1,
                   save_every=1)
"""


def test_killed_run_resumes(setup, tmp_path, search_index, index_rows):
    _, images, weights = setup
    out = str(tmp_path / "killed")
    root = os.path.join(os.path.dirname(__file__), "..")
    run = subprocess.run([sys.executable, "-c", KILLED, images, out, weights[0]], cwd=root,
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert len([n for n in os.listdir(os.path.join(out, "parts")) if n.endswith(".json")]) == 2
    model, preprocess, identity = search.load_model(None, weights[0])
    result = search.build_index(images, out, model, preprocess, identity, 64, 48, batch_size=4)
    assert result["embedded"] == len(IMAGES) - 2  # continued after the two saved images
    assert not os.listdir(os.path.join(out, "parts"))
    assert_equals_fresh_index(search_index, index_rows, out, images, weights[0], tmp_path)


def test_unreadable_file_skipped_and_reported(setup, tmp_path, capsys, search_index, index_rows):
    _, _, weights = setup
    images = str(tmp_path / "images")
    write_images(images, IMAGES[:2])
    with open(os.path.join(images, "broken.TIF"), "wb") as f:
        f.write(b"II*\x00 truncated tiff")
    assert search_index(images, tmp_path / "index", weights[0]) == 0
    out = capsys.readouterr().out
    assert "1 unreadable file(s) skipped" in out and "broken.TIF" in out
    entries, _ = index_rows(tmp_path / "index")
    assert {os.path.basename(p) for p, _ in entries} == {"a.png", "big.TIF"}
    only_broken = tmp_path / "only_broken"
    os.makedirs(only_broken)
    os.rename(os.path.join(images, "broken.TIF"), only_broken / "broken.TIF")
    assert search_index(str(only_broken), tmp_path / "empty", weights[0]) == 1  # nothing: exit 1


def test_index_of_another_model_is_refused(setup, tmp_path, search_index, search_cli):
    _, images, weights = setup
    out = tmp_path / "index"
    assert search_index(images, out, weights[0]) == 0
    with pytest.raises(ValueError, match="another model"):
        search_index(images, out, weights[1])
    with pytest.raises(ValueError, match="another model"):
        search_cli.main(["query", str(out), "a road", "--clip", weights[1]])
    assert search_cli.main(["query", str(out), "a road", "--clip", weights[0]])  # same model: ok


def test_default_workers_decode_in_processes_only_beside_a_gpu(
        setup, tmp_path, monkeypatch, search_cli):
    _, images, weights = setup
    assert default_workers("cpu") == 0 and 1 <= default_workers("cuda:1") <= 8
    seen, build = [], search.build_index

    def spy(*args, **kwargs):
        seen.append(args[8])  # workers
        return build(*args, **kwargs)

    monkeypatch.setattr(search, "build_index", spy)
    assert search_cli.main(["index", images, "--out", str(tmp_path / "i"), "--clip", weights[0],
                            "--device", "cpu", "--tile", "64", "--stride", "48"]) == 0
    assert seen == [0]
