"""The tile store (issue 23, item 2): the tiles' records in memory-mapped columns answer the hits
that index.json's per-tile lists answered, on the demo (its images and its GeoTIFF mosaic); an
index of the earlier format is refused with the command that converts it, and `migrate`
converts it (an interrupted run's parts too) into what a fresh index holds."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

from mrs_adapter.search import index as search
from mrs_adapter.search import query as search_query
from mrs_adapter.search.grid import tile_boxes
from mrs_adapter.search.hits import within_mask

pytest.importorskip("rasterio")
from mrs_adapter.demo.geotiff import mosaic, write_mosaic  # noqa: E402

TILE = ["--tile", "64", "--stride", "48", "--workers", "0", "--batch-size", "16"]
TEXTS = ["a red building beside a road", "a green field", "a dark blue lake"]
COLUMNS = 2  # the mosaic: 2 x 2 demo scenes, 512 px


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory, search_cli):
    """(images, backbone, the index of 40 demo images and the demo GeoTIFF)."""
    root, backbone = demo
    images = tmp_path_factory.mktemp("columns") / "images"
    names = sorted(os.listdir(os.path.join(root, "demo_images")))[:40]
    for name in names:
        os.makedirs(images / "demo", exist_ok=True)
        shutil.copy(os.path.join(root, "demo_images", name), images / "demo" / name)
    write_mosaic(str(images / "mosaic.tif"), COLUMNS, COLUMNS, seed=3)
    out = images.parent / "index"
    assert search_cli.main(["index", str(images), "--out", str(out), "--clip", backbone,
                            *TILE]) == 0
    return str(images), backbone, str(out)


def entries_as_format_1(files, npy, columns):
    """Turn index or part entries (rel -> {first, tiles, ...}) of the embeddings file `npy` into
    what format 1 held: every tile's box, bounds and footprint as lists in its file's entry."""
    box = np.load(npy[:-4] + ".box.npy")
    if "footprint" in columns:
        bounds = np.load(npy[:-4] + ".bounds.npy")
        footprint = np.load(npy[:-4] + ".footprint.npy")
    else:
        bounds = footprint = np.full((len(box), 1), np.nan)
    for e in files.values():
        rows = range(e["first"], e["first"] + e.pop("tiles"))
        e["boxes"] = [None if box[r][0] == -1 else box[r].tolist() for r in rows]
        placed = [not np.isnan(bounds[r][0]) for r in rows]
        e["bounds"] = [bounds[r].tolist() if p else None for r, p in zip(rows, placed)] \
            if any(placed) else None
        e["footprints"] = [footprint[r].tolist() if p else None for r, p in zip(rows, placed)] \
            if any(placed) else None


def as_format_1(out, old):
    """Copy index `out` into `old` as the earlier search.py wrote it: every tile's box, bounds
    and footprint as lists in its file's index.json entry, and how a GeoTIFF was read there too;
    no columns."""
    os.makedirs(old)
    manifest = json.load(open(os.path.join(out, "index.json")))
    npy = os.path.join(out, manifest["embeddings"])
    shutil.copy(npy, os.path.join(old, manifest["embeddings"]))
    rasters = json.load(open(npy[:-4] + ".rasters.json")) if manifest.pop("rasters") else {}
    for rel, e in manifest["files"].items():
        if rel in rasters:  # how it was read: in the entry, as format 1 kept it
            e["raster"] = rasters[rel]
    entries_as_format_1(manifest["files"], npy, manifest["columns"])
    del manifest["format"], manifest["columns"]
    manifest["files"] = dict(reversed(manifest["files"].items()))  # rows are by "first" alone
    json.dump(manifest, open(os.path.join(old, "index.json"), "w"))
    return manifest


def hits_of_format_1(manifest, embeddings, query, k=None, within=None):
    """The hits as the earlier store answered them: a brute-force ranking, each row found in
    the index.json entries by its file's first row."""
    files = sorted(((e["first"], rel, e) for rel, e in manifest["files"].items() if e["boxes"]))
    firsts = [first for first, _, _ in files]
    scores = np.asarray(embeddings, np.float32) @ query
    records = []
    for row in range(len(scores)):
        first, rel, e = files[int(np.searchsorted(firsts, row, side="right")) - 1]
        t = row - first
        footprint = e["footprints"][t] if e["footprints"] else None
        records.append({"path": os.path.join(manifest["images"], rel), "box": e["boxes"][t],
                        "crs": e["crs"] if footprint else None,
                        "bounds": e["bounds"][t] if footprint else None, "footprint": footprint})
    order = np.lexsort((np.arange(len(scores)), -scores))
    if within is not None:
        placed = [row for row in order if records[row]["footprint"] is not None]
        meets = within_mask(np.array([records[row]["footprint"] for row in placed]), within)
        order = [row for row, keep in zip(placed, meets) if keep]
    return [dict(records[row], rank=r + 1, score=float(scores[row]))
            for r, row in enumerate(order[:k])]


def key(hit):
    return hit["path"], None if hit["box"] is None else tuple(hit["box"])


def same_hits(got, want):
    """The same hits with the same records and scores, in the same order but where two scores
    are within float error (the two sides sum in other orders)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["rank"] == w["rank"] and g["score"] == pytest.approx(w["score"], abs=1e-5)
    wanted = {key(w): w for w in want}
    for g in got:
        w = wanted.pop(key(g))
        assert g["crs"] == w["crs"] and g["score"] == pytest.approx(w["score"], abs=1e-5)
        for name in ("bounds", "footprint"):
            assert (g[name] is None) == (w[name] is None)
            if w[name] is not None:
                np.testing.assert_allclose(g[name], w[name], rtol=0, atol=1e-9)
    assert not wanted


def west_half(manifest):
    """A lon/lat box over the western half of the mosaic's footprints."""
    rings = np.array([ring for e in manifest["files"].values() for ring in e["footprints"] or []
                      if ring is not None])
    west, east = rings[..., 0].min(), rings[..., 0].max()
    return west, rings[..., 1].min(), (west + east) / 2, rings[..., 1].max()


def test_the_columns_answer_the_hits_index_json_answered_on_the_demo(built, tmp_path):
    images, backbone, out = built
    old = as_format_1(out, tmp_path / "old")
    index = search_query.SearchIndex(out)
    model, _, _ = search.load_model(None, backbone)
    placed, box = 0, west_half(old)
    for text in TEXTS:
        query = search_query.embed_text(model, "cpu", text)
        want = hits_of_format_1(old, index.embeddings, query)
        same_hits(index.search(query, k=len(want), exact=True), want)  # every row, in order
        within = hits_of_format_1(old, index.embeddings, query, within=box)
        assert 0 < len(within) < sum(h["footprint"] is not None for h in want)  # a real cut
        same_hits(index.search(query, k=len(want), within=box), within)
        placed = sum(h["footprint"] is not None for h in want)
    # the records themselves, against the tiling and the affine (not the code under test):
    # 40 whole demo images (32 px: one tile each, no box), the mosaic's kept tiles on its grid
    data, _ = mosaic(COLUMNS, COLUMNS, seed=3)
    valid = (data > 0).any(0)
    grid = tile_boxes(512, 512, 64, 48)
    kept = [list(b) for b in grid if valid[b[1]:b[3], b[0]:b[2]].mean() >= 0.5]
    assert index.boxes("mosaic.tif") == kept and placed == len(kept) < len(grid)
    assert all(index.boxes(rel) == [None] for rel in index.manifest["files"] if "demo/" in rel)
    for row in range(len(index.embeddings)):
        hit = index.hit(row, 1, 0.0)
        if hit["bounds"] is not None:
            left, top, right, bottom = hit["box"]
            assert hit["bounds"] == [447000 + 0.5 * left, 4520000 - 0.5 * bottom,
                                     447000 + 0.5 * right, 4520000 - 0.5 * top]
            assert hit["crs"] == "EPSG:32633"
        assert index.row_of(hit["path"], hit["box"]) == row
    # many hits at once (each column read once, its pages asked for together): in their order,
    # the last row of the mapping among them
    rows = np.random.default_rng(0).permutation(len(index.embeddings))[:50].tolist() + [
        len(index.embeddings) - 1]
    assert index.hits(rows, np.arange(len(rows)), 3) == [
        index.hit(row, 3 + i, i) for i, row in enumerate(rows)]


def test_an_index_of_the_earlier_format_is_refused_then_migrated(
        built, tmp_path, capsys, search_cli):
    images, backbone, out = built
    old = str(tmp_path / "old")
    as_format_1(out, old)
    for argv in (["query", old, "a green field"], ["ann", old], ["export", old, "--out",
                 str(tmp_path / "e.npy")],
                 ["index", images, "--out", old, "--clip", backbone, *TILE]):
        with pytest.raises(SystemExit, match=rf"error: index {old} was written by an earlier "
                                             rf"search.py.*run `python search.py migrate {old}`"):
            search_cli.cli(argv)
    before = os.path.getsize(os.path.join(old, "index.json"))
    capsys.readouterr()
    assert search_cli.main(["migrate", old]) == 0
    printed = capsys.readouterr().out
    assert "moved from index.json into columns (box, bounds, footprint)" in printed
    text = open(os.path.join(old, "index.json")).read()
    assert '"boxes"' not in text and '"footprints"' not in text
    assert f"index.json {before:,} -> {len(text):,} bytes" in printed
    for name in ("box", "bounds", "footprint"):  # what a fresh index holds, value for value
        fresh, = glob.glob(os.path.join(out, f"embeddings-*.{name}.npy"))
        migrated, = glob.glob(os.path.join(old, f"embeddings-*.{name}.npy"))
        np.testing.assert_array_equal(np.load(migrated), np.load(fresh))
    fresh, = glob.glob(os.path.join(out, "embeddings-*.rasters.json"))  # how each was read
    migrated, = glob.glob(os.path.join(old, "embeddings-*.rasters.json"))
    assert json.load(open(migrated)) == json.load(open(fresh))
    assert len(json.load(open(fresh))) == 41  # the demo's .tif images and the mosaic
    assert json.load(open(os.path.join(old, "index.json")))["files"] == \
        json.load(open(os.path.join(out, "index.json")))["files"]  # as dicts: in any order
    assert search_cli.main(["migrate", old]) == 0  # again: nothing to do
    assert "of format 2 already: nothing to do" in capsys.readouterr().out


def test_migrate_converts_an_interrupted_runs_parts(built, tmp_path, monkeypatch, search_cli):
    """A format-1 index with the saved parts of a killed run: migrate converts the parts too,
    and the next run commits them without embedding them again."""
    images, backbone, out = built
    mine = tmp_path / "images"
    shutil.copytree(os.path.join(images, "demo"), mine / "demo")
    index = tmp_path / "index"
    argv = ["index", str(mine), "--out", str(index), "--clip", backbone, *TILE]
    assert search_cli.main(argv) == 0
    shutil.copy(os.path.join(images, "mosaic.tif"), mine / "later.tif")  # new since

    def killed(*a, **k):
        raise KeyboardInterrupt  # after the parts are saved, before the commit
    monkeypatch.setattr(search, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        search_cli.main(argv + ["--save-every", "1"])
    monkeypatch.undo()
    old = tmp_path / "old"
    as_format_1(index, old)
    shutil.copytree(index / "parts", old / "parts")
    for path in glob.glob(str(old / "parts" / "part-??????.json")):  # the parts as 1 wrote them
        part = json.load(open(path))
        npy = path[:-5]
        entries_as_format_1(part["files"], npy + ".npy", part.pop("columns"))
        json.dump(part, open(path, "w"))
        for name in glob.glob(npy + ".*.npy"):
            os.remove(name)
    assert search_cli.main(["migrate", str(old)]) == 0
    calls, encode = [], search.encode_images
    monkeypatch.setattr(search, "encode_images", lambda *a: calls.append(1) or encode(*a))
    result = search.build_index(str(mine), str(old), *search.load_model(None, backbone),
                                64, 48, batch_size=16)
    assert result["embedded"] == 0 and not calls  # the parts were used, nothing embedded
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    assert search_cli.main(["index", str(mine), "--out", str(fresh), "--clip", backbone,
                            *TILE]) == 0
    a, b = search_query.SearchIndex(str(old)), search_query.SearchIndex(str(fresh))
    for rel in b.manifest["files"]:
        assert a.boxes(rel) == b.boxes(rel)
        ea, eb = a.manifest["files"][rel], b.manifest["files"][rel]
        np.testing.assert_allclose(
            np.asarray(a.embeddings[ea["first"]:ea["first"] + ea["tiles"]], np.float32),
            np.asarray(b.embeddings[eb["first"]:eb["first"] + eb["tiles"]], np.float32),
            atol=2e-3)
        for row_a, row_b in zip(range(ea["first"], ea["first"] + ea["tiles"]),
                                range(eb["first"], eb["first"] + eb["tiles"])):
            assert a.hit(row_a, 1, 0)["footprint"] == b.hit(row_b, 1, 0)["footprint"]


def test_raster_records_are_read_only_to_draw_hits(built, tmp_path, search_cli):
    """How each GeoTIFF was read is kept apart from index.json: a plain query never reads it,
    --map does (and names the file when it is gone)."""
    _, _, out = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    records, = glob.glob(str(copy / "embeddings-*.rasters.json"))
    assert '"valid_fraction"' not in (copy / "index.json").read_text()  # a record's key
    os.remove(records)
    assert len(search_cli.main(["query", str(copy), "a green field", "--top", "3"])) == 3
    with pytest.raises(SystemExit, match=rf"{records} is missing, though .*index.json lists it"):
        search_cli.cli(["query", str(copy), "a green field", "--map", str(tmp_path / "map.png")])
    assert not os.path.exists(tmp_path / "map.png")

