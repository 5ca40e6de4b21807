"""`search.py ann` and the query's use of it (issue 23): the ANN's hits, re-scored, are the brute
force's; an `index` run that rewrites the embeddings makes it stale, which the query says and
searches exactly, and `ann` rebuilds; a killed build and a missing faiss leave queries working.
Tiny CLIPs and small generated images."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

from mrs_adapter.search import ann
from mrs_adapter.search import query as search_query

pytest.importorskip("faiss")
TILE = ["--tile", "32", "--stride", "24", "--workers", "0", "--batch-size", "16"]


@pytest.fixture
def built(tmp_path, tiny_clip_weights, search_cli):
    weights = tiny_clip_weights(0)
    images, rng = tmp_path / "images", np.random.default_rng(0)
    images.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)).save(
            images / f"{i}.png")
    out = tmp_path / "index"
    assert search_cli.main(["index", str(images), "--out", str(out), "--clip", weights,
                            *TILE]) == 0
    return images, str(out), weights


def queries(index, n=5, seed=1):
    q = np.random.default_rng(seed).standard_normal((n, index.embeddings.shape[1]))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def ranked(hits):
    return [(h["path"], h["box"]) for h in hits], np.array([h["score"] for h in hits])


def test_ann_hits_rescored_equal_brute_force(built, capsys, search_cli):
    _, out, _ = built
    assert search_cli.main(["ann", out]) == 0
    assert "ann.json" in os.listdir(out)
    index = search_query.SearchIndex(out)
    assert len(index.embeddings) > 4 * 10  # more rows than the 4 x k candidates proposed
    for q in queries(index):
        fast = index.search(q, 10)
        assert index.how.startswith("ANN (hnsw")
        exact = search_query.SearchIndex(out).search(q, 10, exact=True)
        (fast_keys, fast_scores), (keys, scores) = ranked(fast), ranked(exact)
        assert fast_keys == keys  # every true top-10 row was proposed (a few hundred rows)
        np.testing.assert_allclose(fast_scores, scores, atol=1e-6)


def test_an_index_run_that_adds_files_keeps_the_ann_and_ann_extends_it(built, capsys, search_cli):
    images, out, weights = built
    assert search_cli.main(["ann", out]) == 0
    before = search_query.SearchIndex(out)
    rows_before = len(before.embeddings)
    old_rows = np.array(before.embeddings)
    del before
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(
        images / "0a_new.png")  # sorts before every other file
    capsys.readouterr()
    assert search_cli.main(["index", str(images), "--out", out, "--clip", weights, *TILE]) == 0
    assert f"covers {rows_before:,} of" in capsys.readouterr().out
    index = search_query.SearchIndex(out)
    np.testing.assert_array_equal(index.embeddings[:rows_before], old_rows)  # kept their places
    assert index.entry(rows_before)[0].endswith("0a_new.png")  # the new file's rows after them
    q = np.asarray(index.embeddings[rows_before], np.float32)  # the new tile itself: its best hit
    hits = index.search(q, 10)
    assert "scored exactly" in index.how  # the ANN, and the new rows beside it
    assert ranked(hits)[0] == ranked(search_query.SearchIndex(out).search(q, 10, exact=True))[0]
    assert hits[0]["path"].endswith("0a_new.png")
    mtime = os.stat(os.path.join(out, "ann.json")).st_mtime_ns
    assert search_cli.main(["ann", out]) == 0
    assert "rebuilding" not in capsys.readouterr().out  # extended, not rebuilt
    assert os.stat(os.path.join(out, "ann.json")).st_mtime_ns != mtime
    index = search_query.SearchIndex(out)
    index.search(q, 10)
    assert index.how.startswith("ANN") and "newer" not in index.how


def test_an_index_run_that_removes_a_file_makes_it_stale_and_ann_rebuilds(
        built, capsys, search_cli):
    images, out, weights = built
    assert search_cli.main(["ann", out]) == 0
    os.remove(images / "0.png")  # the first file: every row after it moves
    assert search_cli.main(["index", str(images), "--out", out, "--clip", weights, *TILE]) == 0
    assert "rebuilds it" in capsys.readouterr().out  # the index run says it
    index = search_query.SearchIndex(out)
    q = queries(index, 1)[0]
    stale_hits = index.search(q, 10)
    assert "exact search" in index.how and "replaced by" in index.how
    assert ranked(stale_hits)[0] == ranked(search_query.SearchIndex(out).search(
        q, 10, exact=True))[0]
    assert search_cli.main(["ann", out]) == 0
    assert "rebuilding the ANN index" in capsys.readouterr().out
    index = search_query.SearchIndex(out)
    index.search(q, 10)
    assert index.how.startswith("ANN")


def test_killed_build_and_missing_faiss_leave_queries_working(
        built, monkeypatch, capsys, search_cli):
    _, out, _ = built

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ann, "_add", killed)
    with pytest.raises(KeyboardInterrupt):
        search_cli.main(["ann", out])
    monkeypatch.undo()
    assert not [n for n in os.listdir(out) if n.startswith("ann")]  # nothing half-written
    index = search_query.SearchIndex(out)
    q = queries(index, 1)[0]
    expected = ranked(index.search(q, 5, exact=True))[0]
    assert ranked(index.search(q, 5))[0] == expected and index.how == ""  # small: exact, quietly

    assert search_cli.main(["ann", out]) == 0
    monkeypatch.setitem(sys.modules, "faiss", None)  # faiss's import blocked
    index = search_query.SearchIndex(out)
    assert ranked(index.search(q, 5))[0] == expected
    assert "exact search" in index.how and 'pip install -e ".[ann]"' in index.how
    with pytest.raises(SystemExit) as exit_:  # `ann` itself: one line naming the install
        search_cli.cli(["ann", out])
    assert str(exit_.value).startswith("error: ") and str(exit_.value).endswith(
        'needs faiss: pip install -e ".[ann]"')
