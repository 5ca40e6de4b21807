"""mrs_adapter/search/ann.py: ANN hits re-scored equal brute force, a stale ANN index is detected,
rows added later are added without a rebuild, a killed build leaves the old pair or none, and
without faiss the brute-force path is all that is needed. Small generated clustered embeddings
(demo/embeddings.py): 3,000 + 1,000 rows of 32 dimensions."""
import importlib
import os
import shutil
import sys

import numpy as np
import pytest

from mrs_adapter.demo.embeddings import queries, write_embeddings
from mrs_adapter.search import ann
from mrs_adapter.search.query import top_k

pytest.importorskip("faiss")

DIM, CLUSTERS = 32, 20
# small enough for a few thousand rows: 16 lists, 8 codes of 6 bits
IVFPQ = dict(nlist=16, nprobe=4, m=8, nbits=6, factor=10, train_rows=3000)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Two parts, in row order: a.npy (3,000 rows) then b.npy (1,000 rows), from one
    distribution (seeds differ only in the rows' streams)."""
    root = tmp_path_factory.mktemp("embeddings")
    write_embeddings(root / "a.npy", 3000, DIM, CLUSTERS, seed=1)
    write_embeddings(root / "b.npy", 1000, DIM, CLUSTERS, seed=1, block=333)
    return root


@pytest.fixture
def folder(tmp_path, generated):
    """An index folder holding copies of the two parts."""
    for name in ("a.npy", "b.npy"):
        shutil.copy(generated / name, tmp_path / name)
    return tmp_path


def parts(folder, names=("a.npy", "b.npy")):
    return [(str(folder / n), len(np.load(folder / n, mmap_mode="r"))) for n in names]


def quiet(*_):
    pass


def brute_force(folder, names=("a.npy", "b.npy")):
    return np.concatenate([np.load(folder / n) for n in names])


def test_choose_by_size():
    assert ann.choose(50_000, 512)[0] == "hnsw"
    kind, p, why = ann.choose(1_000_000, 512)
    assert (kind, p["nlist"], p["m"], p["nprobe"], p["factor"]) == ("ivfpq", 4000, 128, 40, 200)
    assert "IVF-PQ" in why and "4,000 lists" in why
    kind, p, _ = ann.choose(10_000_000, 512)
    assert (kind, p["nlist"], p["nprobe"], p["train_rows"]) == ("ivfpq", 12649, 126, 505960)
    assert ann.choose(200_000, 768)[1]["m"] == 192  # 4 dimensions a code, dividing 768


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_hits_rescored_equal_brute_force(folder, kind):
    p = parts(folder)
    info = ann.build(str(folder), p, log=quiet, kind=kind,
                     params=IVFPQ if kind == "ivfpq" else None)
    assert info["kind"] == kind and info["rows"] == 4000
    index, note = ann.open_ann(str(folder), p)
    assert index is not None and note == "" and index.rows == index.total == 4000
    emb, get = brute_force(folder), ann.rows_getter(p)
    recalls = []
    for q in queries(40, DIM, CLUSTERS, seed=1):
        rows, scores = ann.search(index, get, q, 20)
        exact_rows, exact_scores = top_k(emb, q, 20)
        assert rows.dtype == np.int64 and scores.dtype == np.float32 and len(rows) == 20
        assert list(np.lexsort((rows, -scores))) == list(range(20))  # best first, ties by row
        both, i, j = np.intersect1d(rows, exact_rows, return_indices=True)
        np.testing.assert_allclose(scores[i], exact_scores[j], atol=1e-5, rtol=0)
        np.testing.assert_allclose(scores, emb[rows].astype(np.float32) @ q, atol=1e-5, rtol=0)
        recalls.append(len(both) / 20)
    assert np.mean(recalls) >= 0.9, recalls


def test_rows_added_after_the_covered_parts_are_scored_exactly(folder):
    ann.build(str(folder), parts(folder, ("a.npy",)), log=quiet)
    p = parts(folder)
    index, note = ann.open_ann(str(folder), p)
    assert index is not None and "covers 3,000 of 4,000 rows" in note
    assert index.index.ntotal == 3000
    emb, get = brute_force(folder), ann.rows_getter(p)
    for row in (0, 3000, 3500, 3999):  # the last three: rows the ANN does not hold
        rows, scores = ann.search(index, get, emb[row].astype(np.float32), 5)
        assert rows[0] == row


@pytest.mark.parametrize("change, expected", [
    ("touch", "a.npy changed"),
    ("rewrite", "a.npy changed"),
    ("rename", "a.npy was replaced by c.npy"),
    ("fewer rows", "holds 2,999 rows"),
    ("part gone", "b.npy is no longer in the index"),
])
def test_stale_index_is_detected(folder, change, expected):
    ann.build(str(folder), parts(folder), log=quiet, kind="hnsw")
    p = parts(folder)
    a = folder / "a.npy"
    if change == "touch":
        st = os.stat(a)
        os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "rewrite":  # same name and size, other rows, a new file
        write_embeddings(folder / "a.npy", 3000, DIM, CLUSTERS, seed=7)
    elif change == "rename":
        os.rename(a, folder / "c.npy")
        p[0] = (str(folder / "c.npy"), 3000)
    elif change == "fewer rows":
        p[0] = (str(a), 2999)
    else:
        p = p[:1]
    index, why = ann.open_ann(str(folder), p)
    assert index is None and why.startswith("the ANN index is stale") and expected in why, why
    with pytest.raises(ValueError, match="stale"):
        ann.extend(str(folder), p, log=quiet)


def test_missing_or_damaged_ann_is_reported(folder):
    index, why = ann.open_ann(str(folder), parts(folder))
    assert index is None and "no ANN index" in why
    ann.build(str(folder), parts(folder), log=quiet, kind="hnsw")
    (folder / "ann.json").write_text("{not json")
    index, why = ann.open_ann(str(folder), parts(folder))
    assert index is None and "unreadable" in why


def centroids(folder):
    import faiss
    index = faiss.read_index(str(folder / ann.read_info(str(folder))[0]["file"]))
    return index.quantizer.reconstruct_n(0, index.nlist), faiss.vector_to_array(index.pq.centroids)


def test_extend_adds_rows_without_a_rebuild(folder):
    before = ann.build(str(folder), parts(folder, ("a.npy",)), log=quiet, kind="ivfpq",
                       params=IVFPQ)
    coarse, codebooks = centroids(folder)
    after = ann.extend(str(folder), parts(folder), log=quiet)
    assert after["rows"] == 4000 and after["trained_at_rows"] == 3000
    assert after["build_s"] == before["build_s"] and after["file"] != before["file"]
    assert [c["name"] for c in after["parts"]] == ["a.npy", "b.npy"]
    assert not os.path.exists(folder / before["file"])  # the old pair's index, removed
    new_coarse, new_codebooks = centroids(folder)  # the trained quantizers, reused as they were
    np.testing.assert_array_equal(new_coarse, coarse)
    np.testing.assert_array_equal(new_codebooks, codebooks)
    index, note = ann.open_ann(str(folder), parts(folder))
    assert note == "" and index.rows == index.total == index.index.ntotal == 4000
    emb, get = brute_force(folder), ann.rows_getter(parts(folder))
    found = [ann.search(index, get, emb[row].astype(np.float32), 1)[0][0]
             for row in range(3000, 4000, 50)]  # each added row finds itself, through the ANN
    assert found == list(range(3000, 4000, 50))
    assert ann.extend(str(folder), parts(folder), log=quiet) == ann.read_info(str(folder))[0]


def interrupt(*_):
    raise KeyboardInterrupt


def test_killed_build_leaves_the_old_pair_or_none(folder, monkeypatch):
    def killed(faiss, index, f):
        f.write(b"half an index")
        raise KeyboardInterrupt

    real = ann._write_index
    monkeypatch.setattr(ann, "_write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        ann.build(str(folder), parts(folder), log=quiet, kind="hnsw")
    assert sorted(os.listdir(folder)) == ["a.npy", "b.npy"]  # no ann.json, no temporary file
    monkeypatch.setattr(ann, "_write_index", real)
    old = ann.build(str(folder), parts(folder, ("a.npy",)), log=quiet, kind="hnsw")
    for fail in ("_write_index", "write_json"):  # killed while writing the index, or ann.json
        monkeypatch.setattr(ann, fail, interrupt)
        with pytest.raises(KeyboardInterrupt):
            ann.build(str(folder), parts(folder), log=quiet, kind="ivfpq", params=IVFPQ)
        monkeypatch.undo()
        assert ann.read_info(str(folder))[0] == old
        index, note = ann.open_ann(str(folder), parts(folder))
        assert index is not None and index.info["kind"] == "hnsw" and index.rows == 3000
    ann.build(str(folder), parts(folder), log=quiet, kind="hnsw")
    assert len([n for n in os.listdir(folder) if n.startswith("ann")]) == 2  # orphans removed


def test_without_faiss_brute_force_still_answers(folder, monkeypatch):
    ann.build(str(folder), parts(folder), log=quiet, kind="hnsw")
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    module = importlib.reload(ann)  # importing the module does not need faiss
    try:
        index, why = module.open_ann(str(folder), parts(folder))
        assert index is None and "faiss" in why and 'pip install -e ".[ann]"' in why
        with pytest.raises(ValueError, match=r'needs faiss: pip install -e "\.\[ann\]"') as e:
            module.build(str(folder), parts(folder), log=quiet)
        assert isinstance(e.value, ImportError) and "\n" not in str(e.value)
        q = queries(1, DIM, CLUSTERS, seed=1)[0]
        rows, _ = top_k(brute_force(folder), q, 20)  # the fallback: brute force
        assert len(rows) == 20
    finally:
        monkeypatch.undo()
        importlib.reload(ann)
