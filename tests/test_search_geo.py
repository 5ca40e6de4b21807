"""search.py over GeoTIFFs the tests write with rasterio (issue 22): a UTM scene (tiled, LZW, 4
bands of uint16, a nodata collar, internal overviews), a JPEG-tiled one, one without
georeferencing and one all nodata; the rows equal an independent read of the chosen bands with one
stretch per scene, collar tiles are left out and counted, footprints equal pyproj on the affine,
--gsd, GeoJSON, GeoParquet, refined queries, --within / --min-score / --map, and the errors
without rasterio."""
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

rasterio = pytest.importorskip("rasterio")
pyproj = pytest.importorskip("pyproj")
pq = pytest.importorskip("pyarrow.parquet")
from rasterio.enums import ColorInterp  # noqa: E402
from rasterio.transform import Affine  # noqa: E402

from mrs_adapter.clip import transform  # noqa: E402
from mrs_adapter.search import query as search_query  # noqa: E402
from mrs_adapter.search import readers  # noqa: E402
from mrs_adapter.search.grid import tile_boxes  # noqa: E402

TILE = ["--tile", "64", "--stride", "48", "--workers", "0", "--batch-size", "8"]
W, H = 300, 260
UTM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4500000.0)  # 10 m pixels, EPSG:32633 (UTM 33N)
NIR_FIRST = [ColorInterp.nir, ColorInterp.red, ColorInterp.green, ColorInterp.blue]


def write(path, data, crs="EPSG:32633", nodata=None, colorinterp=None, **profile):
    count, height, width = data.shape
    geo = dict(crs=crs, transform=UTM) if crs else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count,
                           dtype=data.dtype, nodata=nodata, **geo, **profile) as dst:
            dst.write(data)
            if colorinterp:
                dst.colorinterp = colorinterp
            if profile.get("tiled"):
                dst.build_overviews([2, 4])
    return str(path)


def scene_data(seed=0):
    """(4, H, W) uint16 with texture per band, and a nodata (0) collar on the left whose width
    swings from 20 to 180 px: some tiles are more than half collar, some a little."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W]
    data = np.stack([400 * b + 40 * ((x // (8 + 4 * b) + y // 11) % 7)
                     + rng.integers(0, 30, (H, W)) for b in (1, 2, 3, 4)]).astype(np.uint16)
    valid = x >= 100 + (80 * np.sin(y / 30.0)).astype(int)
    data[:, ~valid] = 0
    return data, valid


@pytest.fixture(scope="module")
def geo(tmp_path_factory, make_tiny_clip, search_cli, tiny_clip_weights):
    root = tmp_path_factory.mktemp("geo")
    weights = tiny_clip_weights(0)
    images = root / "images"
    images.mkdir()
    data, valid = scene_data()
    write(images / "utm.tif", data, nodata=0, colorinterp=NIR_FIRST, tiled=True, blockxsize=128,
          blockysize=128, compress="lzw")
    smooth = (data[1:4] // 12).astype(np.uint8)
    smooth[:, ~valid] = 90
    write(images / "jpeg.tif", smooth, tiled=True, blockxsize=128, blockysize=128,
          compress="jpeg", photometric="YCBCR")
    write(images / "plain.tif", (data[1:4] // 12).astype(np.uint8), crs=None)
    write(images / "empty.tif", np.zeros((4, 200, 200), np.uint16), nodata=0)
    out = root / "index"
    assert search_cli.main(["index", str(images), "--out", str(out), "--clip", weights, *TILE]) == 0
    return {"root": root, "images": str(images), "weights": weights, "out": str(out),
            "data": data, "valid": valid, "model": make_tiny_clip(0)}


def manifest(out):
    with open(os.path.join(out, "index.json")) as f:
        return json.load(f)


def rows_of(out, rel):
    """The file's index.json entry with its tiles' boxes (from the columns) and its raster
    record, and its rows."""
    index = search_query.SearchIndex(str(out))
    e = dict(index.manifest["files"][rel], boxes=index.boxes(rel),
             raster=index.raster_record(rel))
    return e, np.asarray(index.embeddings[e["first"]:e["first"] + e["tiles"]], np.float32)


def expected_row(model, data, valid, box, bands, stretch, fill):
    """The embedding of one tile read independently: the chosen bands of the array the file was
    written from, one linear stretch (low -> 0, high -> 255), invalid pixels set to `fill`."""
    left, top, right, bottom = box
    values = data[[b - 1 for b in bands], top:bottom, left:right].astype(np.float64)
    low = np.array([s[0] for s in stretch])[:, None, None]
    high = np.array([s[1] for s in stretch])[:, None, None]
    rgb = np.clip(np.rint((values - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)
    rgb = rgb.transpose(1, 2, 0).copy()
    rgb[~valid[top:bottom, left:right]] = fill
    x = transform(32)(Image.fromarray(rgb))[None]
    with torch.no_grad():
        return F.normalize(model.encode_image(x), dim=-1)[0].numpy()


def kept_boxes(valid, max_nodata=0.5):
    return [b for b in tile_boxes(W, H, 64, 48)
            if 1 - valid[b[1]:b[3], b[0]:b[2]].mean() <= max_nodata]


def test_bands_stretch_and_collar_of_the_indexed_rows(geo, capsys):
    e, rows = rows_of(geo["out"], "utm.tif")
    record = e["raster"]
    assert record["bands"] == [2, 3, 4]  # red, green, blue by colour interpretation, not 1 2 3
    assert e["boxes"] == [list(b) for b in kept_boxes(geo["valid"])]  # collar tiles left out
    grid = len(tile_boxes(W, H, 64, 48))
    assert e["dropped"] == grid - len(e["boxes"]) > 0 and len(e["boxes"]) > 0
    data, valid = geo["data"], geo["valid"]
    for r, band in enumerate(record["bands"]):  # one stretch: this scene's valid 2-98th pct
        low, high = np.percentile(data[band - 1][valid], [2, 98])
        assert record["stretch"][r] == pytest.approx([low, high], abs=1.0)
    for box, row in zip(e["boxes"], rows):  # every tile through the same stretch and bands
        want = expected_row(geo["model"], data, valid, box, record["bands"], record["stretch"],
                            record["fill"])
        np.testing.assert_allclose(row, want, atol=3e-3)
    nir = expected_row(geo["model"], data, valid, e["boxes"][-1], [1, 2, 3], record["stretch"],
                       record["fill"])
    assert np.abs(rows[-1] - nir).max() > 1e-2  # the negative control: other bands differ


def test_chosen_bands_are_the_ones_read_and_the_setting_is_kept(geo, tmp_path, search_cli):
    out = tmp_path / "bands"
    argv = ["index", geo["images"], "--out", str(out), "--clip", geo["weights"], *TILE]
    assert search_cli.main(argv + ["--bands", "1", "2", "3", "--stretch", "0", "3000"]) == 0
    e, rows = rows_of(out, "utm.tif")
    assert e["raster"]["bands"] == [1, 2, 3] and e["raster"]["stretch"] == [[0, 3000]] * 3
    for box, row in zip(e["boxes"], rows):
        want = expected_row(geo["model"], geo["data"], geo["valid"], box, [1, 2, 3],
                            [(0, 3000)] * 3, e["raster"]["fill"])
        np.testing.assert_allclose(row, want, atol=3e-3)
    assert manifest(out)["raster"]["bands"] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"built with --bands 1 2 3, not \(not given\)"):
        search_cli.main(argv)  # the same index, other bands: refused, not mixed


def test_summary_counts_collar_tiles_and_files_without_coordinates(
        geo, tmp_path, capsys, search_cli):
    out = tmp_path / "again"
    search_cli.main(["index", geo["images"], "--out", str(out), "--clip", geo["weights"], *TILE])
    printed = capsys.readouterr().out
    files = manifest(out)["files"]
    dropped = sum(e["dropped"] for e in files.values())
    assert files["empty.tif"]["tiles"] == 0 and files["empty.tif"]["dropped"] == 16
    assert f"{dropped} tile(s) more than 0.5 nodata left out" in printed
    assert "1 of 4 file(s) without georeferencing (pixel boxes only)" in printed  # plain.tif


def pyproj_ring(box):
    """The box's corners through the affine, then UTM 33N -> WGS84 by pyproj (not rasterio)."""
    left, top, right, bottom = box
    to_wgs84 = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    corners = [(left, bottom), (right, bottom), (right, top), (left, top)]
    return [list(to_wgs84.transform(*(UTM @ c))) for c in corners]


def test_footprints_equal_pyproj_and_the_geojson_is_rfc_7946(geo, tmp_path, search_cli):
    path = tmp_path / "hits.geojson"
    hits = search_cli.main(["query", geo["out"], "fields", "--top", "200", "--geojson", str(path),
                            "--json", str(tmp_path / "hits.json")])
    located = [h for h in hits if h["path"].endswith("utm.tif")]
    assert located
    for hit in located:
        ring = hit["footprint"]
        assert ring[0] == ring[-1] and len(ring) == 5
        np.testing.assert_allclose(ring[:4], pyproj_ring(hit["box"]), atol=1e-6)
        left, top, right, bottom = hit["box"]
        assert hit["crs"] == "EPSG:32633" and hit["bounds"] == pytest.approx(
            [500000 + 10 * left, 4500000 - 10 * bottom, 500000 + 10 * right, 4500000 - 10 * top])
    collection = json.load(open(path))
    assert collection["type"] == "FeatureCollection" and "crs" not in collection
    features = collection["features"]
    assert [f["properties"]["rank"] for f in features] == list(range(1, len(hits) + 1))
    for feature in features:
        if feature["geometry"] is None:  # plain.tif: no georeferencing
            assert feature["properties"]["path"].endswith("plain.tif")
            continue
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1]
        assert all(-180 <= lon <= 180 and -90 <= lat <= 90 for lon, lat in ring)
        area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
        assert area > 0  # counter-clockwise
        assert 14 < ring[0][0] < 16 and 40 < ring[0][1] < 41  # lon first: UTM 33N at 40.6 N


def test_gsd_twice_native_gives_about_a_quarter_of_the_tiles(geo, tmp_path, search_cli):
    images = tmp_path / "one"
    images.mkdir()
    data = np.tile(geo["data"][:, :, 150:], (1, 3, 4))[:, :600, :560]  # no collar, 560 x 600
    write(images / "big.tif", data, nodata=0, tiled=True, blockxsize=128, blockysize=128)
    counts = []
    for gsd in ([], ["--gsd", "20"]):
        out = tmp_path / f"gsd{len(gsd)}"
        search_cli.main(["index", str(images), "--out", str(out), "--clip", geo["weights"],
                         *TILE, *gsd])
        counts.append(manifest(out)["files"]["big.tif"]["tiles"])
    assert counts[0] == len(tile_boxes(560, 600, 64, 48))
    assert 0.15 < counts[1] / counts[0] < 0.35
    assert manifest(tmp_path / "gsd2")["raster"]["gsd"] == 20


def test_geoparquet_holds_the_geo_metadata_and_the_npy_embeddings(geo, tmp_path, search_cli):
    parquet, npy = tmp_path / "emb.parquet", tmp_path / "emb.npy"
    assert search_cli.main(["export", geo["out"], "--out", str(npy), "--geoparquet",
                            str(parquet)]) == 0
    table = pq.read_table(parquet)
    meta = json.loads(table.schema.metadata[b"geo"])
    assert meta["primary_column"] == "geometry" and meta["columns"]["geometry"]["encoding"] == \
        "WKB"
    exported = np.load(npy).astype(np.float32)
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), np.float32),
                                  exported)
    assert table.column("id").to_pylist() == list(range(len(exported)))
    entries = json.load(open(str(npy)[:-4] + ".manifest.json"))["entries"]
    assert table.column("path").to_pylist() == [e["path"] for e in entries]
    geometry = table.column("geometry").to_pylist()
    assert sum(g is None for g in geometry) == sum(e["path"].endswith("plain.tif")
                                                   for e in entries)


def test_refined_query_equals_a_brute_force_ranking_of_the_formula(geo, tmp_path, search_cli):
    first, features = tmp_path / "first.json", tmp_path / "first.geojson"
    search_cli.main(["query", geo["out"], "a field", "--top", "10", "--json", str(first),
                     "--geojson", str(features)])
    jpeg = os.path.join(geo["images"], "jpeg.tif")
    hits = search_cli.main(["query", geo["out"], "a field", "--like", f"{first}:2,3",
                            "--unlike", f"{features}:5", "--not", jpeg, "--top", "8"])
    index = search_query.SearchIndex(geo["out"])
    emb = np.asarray(index.embeddings, np.float32)
    old = json.load(open(first))["hits"]

    def row(hit):
        return emb[index.row_of(hit["path"], hit["box"])]
    model = geo["model"]
    text = search_query.embed_text(model, "cpu", "a field")
    image = search_query.embed_image(model, transform(32), "cpu", jpeg)
    positives = np.stack([text, row(old[1]), row(old[2])])
    negatives = np.stack([row(old[4]), image])
    unit = lambda m: m / np.linalg.norm(m, axis=-1, keepdims=True)  # noqa: E731
    q = unit(2 * unit(positives).mean(0) - unit(negatives).mean(0))
    scores = emb @ q
    order = np.argsort(-scores, kind="stable")[:8]
    assert [h["score"] for h in hits] == pytest.approx(scores[order].tolist(), abs=2e-3)
    assert [index.row_of(h["path"], h["box"]) for h in hits][:3] == order[:3].tolist()


def test_within_min_score_and_map(geo, tmp_path, search_cli):
    everything = search_cli.main(["query", geo["out"], "a field", "--top", "500"])
    placed = [h for h in everything if h["footprint"]]
    lon = sorted(p[0] for h in placed for p in h["footprint"])
    west, east = lon[0], lon[len(lon) // 3]  # the western third of the scene
    box = [west, 40.0, east, 41.0]
    inside = search_cli.main(["query", geo["out"], "a field", "--top", "500", "--within",
                              *map(str, box)])
    assert inside and all(min(p[0] for p in h["footprint"]) <= east for h in inside)
    assert len(inside) == sum(min(p[0] for p in h["footprint"]) <= east for h in placed)
    threshold = everything[6]["score"]
    above = search_cli.main(["query", geo["out"], "a field", "--min-score", str(threshold)])
    assert [h["score"] for h in above] == [h["score"] for h in everything
                                           if h["score"] >= threshold]
    picture, sheet = tmp_path / "hits.png", tmp_path / "sheet.png"
    search_cli.main(["query", geo["out"], "a field", "--top", "5", "--map", str(picture),
                     "--sheet", str(sheet)])
    with Image.open(picture) as image:
        assert image.text["written_by"] == "mrs-adapter search.py output"
        assert image.width > 64
    with Image.open(sheet) as image:  # the GeoTIFF hits' windows, read through rasterio
        assert image.width > 5 * 128


def test_without_rasterio_a_four_band_file_is_the_error_and_plain_images_index(
        geo, tmp_path, monkeypatch, capsys, search_cli):
    images = tmp_path / "mixed"
    images.mkdir()
    write(images / "four.tif", geo["data"][:, :100, :100], nodata=0)
    Image.fromarray((geo["data"][1:4, :100, :100] // 12).astype(np.uint8).transpose(1, 2, 0)
                    ).save(images / "photo.png")
    monkeypatch.setitem(sys.modules, "rasterio", None)  # `import rasterio` raises ImportError
    assert not readers.has_rasterio()
    capsys.readouterr()
    assert search_cli.main(["index", str(images), "--out", str(tmp_path / "i"), "--clip",
                            geo["weights"], *TILE]) == 0
    printed = capsys.readouterr().out
    files = manifest(tmp_path / "i")["files"]
    assert list(files) == ["photo.png"]  # the plain image is indexed
    line = next(x for x in printed.splitlines() if "four.tif:" in x and "skipped" not in x)
    assert "a 4-band 16-bit TIFF" in line
    assert line.endswith('needs rasterio: pip install -e ".[geo]"')
    with pytest.raises(SystemExit, match=r"four.tif: reading .* needs rasterio"):
        search_cli.cli(["query", str(tmp_path / "i"), "--image", str(images / "four.tif")])
