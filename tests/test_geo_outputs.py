"""Search outputs: the GeoJSON is RFC 7946, hits read back for --like / --unlike, --within keeps
exactly the footprints that meet a box, a refined query is the stated formula and ranks as a
brute-force ranking of it, the GeoParquet read back with pyarrow holds the "geo" metadata and the
given rows, the --map outlines land on the tiles' pixels, and only our own files are replaced."""
import json
import os
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from mrs_adapter.search import hits as H
from mrs_adapter.search.geoparquet import write_geoparquet
from mrs_adapter.search.hit_map import LABEL_BACK, OUTLINE, draw_map, render_map
from mrs_adapter.search.outputs import WRITTEN_BY, check_output, written_by_us
from mrs_adapter.search.query import top_k
from mrs_adapter.search.refine import combine_query, describe_query


def square(lon, lat, side=0.01, clockwise=False, closed=True):
    ring = [[lon, lat], [lon + side, lat], [lon + side, lat + side], [lon, lat + side]]
    ring = ring[::-1] if clockwise else ring
    return ring + [ring[0]] if closed else ring


def twice_area(ring) -> float:
    """The shoelace sum: > 0 for a counter-clockwise ring (x east, y north)."""
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def sample_hits():
    """Four hits: counter-clockwise, clockwise (near the antimeridian), without georeferencing,
    and unclosed (southern hemisphere); numpy scalars as query.py's scores and boxes are."""
    return [
        dict(rank=1, score=np.float32(0.61), path="/data/utm.tif", box=np.array([0, 0, 256, 256]),
             crs="EPSG:32633", bounds=[500000.0, 4980000.0, 500256.0, 4980256.0],
             footprint=square(12.0, 45.0)),
        dict(rank=2, score=np.float32(0.55), path="/data/east.tif", box=[0, 192, 256, 448],
             crs="EPSG:32660", bounds=[1.0, 2.0, 3.0, 4.0],
             footprint=square(179.98, -16.5, clockwise=True)),
        dict(rank=3, score=0.5, path="/data/plain.png", box=[256, 0, 512, 256], crs=None,
             bounds=None, footprint=None),
        dict(rank=4, score=0.25, path="/data/south.tif", box=None, crs="EPSG:32733",
             bounds=[0.0, 0.0, 1.0, 1.0], footprint=square(-70.5, -33.4, closed=False)),
    ]


def test_geojson_is_rfc7946_and_keeps_every_hit(tmp_path):
    path = str(tmp_path / "hits.geojson")
    assert H.write_geojson(path, sample_hits(), 'text "a harbour"') == 1  # one has no footprint
    with open(path) as f:
        collection = json.load(f)
    assert collection["type"] == "FeatureCollection" and "crs" not in collection
    assert collection["written_by"] == WRITTEN_BY and collection["query"] == 'text "a harbour"'
    features = collection["features"]
    assert [f["properties"]["rank"] for f in features] == [1, 2, 3, 4]
    assert features[2]["geometry"] is None  # the hit without georeferencing: a table row
    for feature, hit in zip(features, sample_hits()):
        assert feature["type"] == "Feature"
        props = feature["properties"]
        assert props["path"] == hit["path"] and props["crs"] == hit["crs"]
        assert props["score"] == pytest.approx(float(hit["score"]))
        assert props["box"] == (None if hit["box"] is None else [int(v) for v in hit["box"]])
        if hit["footprint"] is None:
            continue
        assert feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and len(ring) == 5
        assert all(-180 <= lon <= 180 and -90 <= lat <= 90 for lon, lat in ring)
        assert twice_area(ring) > 0  # exterior ring counter-clockwise
        assert set(map(tuple, ring)) == set(map(tuple, hit["footprint"]))  # the same corners
    lons = [p[0] for f in features if f["geometry"] for p in f["geometry"]["coordinates"][0]]
    assert collection["bbox"][0] == min(lons) and collection["bbox"][2] == max(lons)
    assert twice_area(sample_hits()[1]["footprint"]) < 0  # hit 2 was given clockwise: reversed


def test_a_footprint_outside_lonlat_is_refused(tmp_path):
    hit = dict(sample_hits()[0], footprint=square(500000.0, 4980000.0, 256.0))  # metres, not deg
    with pytest.raises(ValueError, match="hit 1: footprint point .* is not a WGS84 lon/lat"):
        H.write_geojson(str(tmp_path / "x.geojson"), [hit], "q")
    assert not os.path.exists(tmp_path / "x.geojson")


def test_read_hits_round_trips_json_and_geojson(tmp_path):
    hits = sample_hits()
    H.write_hits_json(str(tmp_path / "h.json"), hits, "q")
    H.write_geojson(str(tmp_path / "h.geojson"), hits, "q")
    expected = [H.hit_record(h) for h in hits]
    assert H.read_hits(str(tmp_path / "h.json")) == expected
    assert H.read_hits(str(tmp_path / "h.geojson")) == expected
    assert expected[3]["footprint"][0] == expected[3]["footprint"][-1]  # closed when read back
    for name in ("h.json", "h.geojson"):
        chosen = H.hits_by_rank(f"{tmp_path / name}:4,1,4", "--like")
        assert [h["rank"] for h in chosen] == [4, 1] and chosen[1]["path"] == "/data/utm.tif"


def test_hit_references_are_checked(tmp_path):
    assert H.parse_ref("C:\\runs\\hits.json:2,7", "--like") == ("C:\\runs\\hits.json", [2, 7])
    for bad in ("hits.json", "hits.json:", "hits.json:0", "hits.json:a", "hits.json:1,,2", ":1"):
        with pytest.raises(ValueError, match=r"--unlike .*expected FILE:RANK\[,RANK...\]"):
            H.parse_ref(bad, "--unlike")
    path = str(tmp_path / "h.json")
    H.write_hits_json(path, sample_hits(), "q")
    with pytest.raises(ValueError, match=r"has no hit of rank 9 \(it holds ranks 1-4\)"):
        H.hits_by_rank(f"{path}:1,9", "--like")
    foreign = {"index.json": {"written_by": "mrs-adapter search", "files": {}},
               "plain.json": [{"rank": 1, "score": 0.5, "path": "a.png", "box": None}]}
    for name, payload in foreign.items():
        (tmp_path / name).write_text(json.dumps(payload))
        with pytest.raises(ValueError, match="was not written by search.py query"):
            H.read_hits(str(tmp_path / name))
    (tmp_path / "notes.txt").write_text("rank 1")
    with pytest.raises(ValueError, match="not JSON"):
        H.read_hits(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        H.hits_by_rank(f"{tmp_path / 'missing.json'}:1", "--like")


def test_within_keeps_exactly_the_footprints_that_meet_the_box():
    box = (10.0, 40.0, 11.0, 41.0)
    diamond = [[12.4, 41.6], [11.6, 42.4], [10.8, 41.6], [11.6, 40.8], [12.4, 41.6]]
    strip = [[9.0, 40.5], [12.0, 40.52], [12.0, 40.53], [9.0, 40.51], [9.0, 40.5]]  # crosses it
    footprints = {1: square(10.4, 40.4, 0.1), 2: square(9.95, 40.5, 0.1),  # inside; overlaps
                  3: square(11.0, 40.5, 0.1),  # touches the east edge: meets
                  4: square(11.01, 40.5, 0.1),  # just east of it
                  5: square(9.0, 39.0, 3.0),  # holds the whole box, no corner inside it
                  6: diamond,  # its bounding box overlaps the box, the diamond does not
                  7: None, 8: strip}
    hits = [dict(rank=r, score=0.0, path="p", footprint=f) for r, f in footprints.items()]
    kept = [h["rank"] for h in H.within(hits, *box)]
    assert kept == [1, 2, 3, 5, 8]
    lons, lats = zip(*diamond)  # negative control: a bounding-box test would keep the diamond
    assert min(lons) <= box[2] and min(lats) <= box[3]
    assert [h["rank"] for h in H.within(hits, -180, -90, 180, 90)] == [1, 2, 3, 4, 5, 6, 8]


@pytest.mark.parametrize("box, message", [
    ((11, 40, 10, 41), "WEST > EAST; a box across the antimeridian is not supported"),
    ((-181, 40, 10, 41), "WEST -181 is outside -180..180"),
    ((10, 41, 11, 40), "SOUTH > NORTH"),
    ((10, 40, 11, float("nan")), "NORTH nan is outside -90..90")])
def test_within_refuses_a_bad_box(box, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        H.within([], *box)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_combine_query_is_the_formula_and_ranks_as_brute_force():
    rng = np.random.default_rng(0)
    positives, negatives = rng.normal(size=(3, 16)), rng.normal(size=(2, 16))
    q = combine_query(list(positives * 3.0), list(negatives))  # inputs normalised first
    p, n = unit(positives).mean(0), unit(negatives).mean(0)
    expected = unit(2 * p - n)  # the formula, in float64
    assert q.dtype == np.float32 and np.allclose(q, expected, atol=1e-6)
    assert np.allclose(combine_query(positives), unit(p), atol=1e-6)  # without negatives
    embeddings = unit(rng.normal(size=(400, 16))).astype(np.float16)  # the index's storage
    exact = embeddings.astype(np.float64) @ expected
    brute = np.argsort(-exact)[:10]
    assert np.diff(-exact[np.argsort(-exact)[:11]]).min() > 1e-4  # no near-tie to blur the order
    rows, _ = top_k(embeddings, q, 10)
    assert rows.tolist() == brute.tolist()
    equal_weights = np.argsort(-(embeddings.astype(np.float64) @ unit(p - n)))[:10]
    assert equal_weights.tolist() != brute.tolist()  # negative control: the weight 2 matters


def test_combine_query_refuses_what_has_no_answer():
    v = np.ones(8) / np.sqrt(8)
    with pytest.raises(ValueError, match="at least one positive"):
        combine_query([], [v])
    with pytest.raises(ValueError, match="cancel out"):
        combine_query([v, -v])
    with pytest.raises(ValueError, match="negative 2 has no direction"):
        combine_query([v], [v, np.zeros(8)])
    with pytest.raises(ValueError, match="different models"):
        combine_query([v, np.ones(4)])
    with pytest.raises(ValueError, match="different models"):
        combine_query([v], [np.ones(4)])


def test_describe_query_names_every_input():
    assert describe_query(['text "a port"'], []) == 'query: text "a port"'
    lines = describe_query(['text "a port"', "hits.json:1"], ["hits.json:7"]).splitlines()
    assert lines[0] == "query = normalise(2 x mean of 2 positives - mean of 1 negatives)"
    assert lines[1:] == ['  + text "a port"', "  + hits.json:1", "  - hits.json:7"]


def decode_wkb_polygon(blob: bytes):
    """A tiny WKB reader for one-ring polygons, independent of the writer."""
    order, kind, n_rings, n_points = struct.unpack("<BIII", blob[:13])
    assert (order, kind, n_rings) == (1, 3, 1) and len(blob) == 13 + 16 * n_points
    values = struct.unpack(f"<{2 * n_points}d", blob[13:])
    return [[values[2 * i], values[2 * i + 1]] for i in range(n_points)]


def parquet_batches(rng, dim=8):
    footprints = [square(12.0, 45.0), None, square(12.01, 45.0, clockwise=True),
                  square(-70.5, -33.4), square(12.0, 45.01, closed=False)]
    embeddings = unit(rng.normal(size=(5, dim))).astype(np.float16)
    paths = ["a.tif", "plain.png", "a.tif", "b.tif", "a.tif"]
    boxes = [[0, 0, 256, 256], None, [192, 0, 448, 256], [0, 0, 256, 256], [0, 192, 256, 448]]
    cuts = [(0, 3), (3, 3), (3, 5)]  # the middle batch is empty
    batches = [{"path": paths[a:b], "box": boxes[a:b], "footprint": footprints[a:b],
                "embedding": embeddings[a:b]} for a, b in cuts]
    return batches, footprints, embeddings, paths, boxes


MODEL = {"backbone_sha256": "ab" * 32, "method": "mrs_adapter", "checkpoint_sha256": None}


def test_geoparquet_carries_geo_metadata_and_the_rows(tmp_path):
    import pyarrow.parquet as pq
    batches, footprints, embeddings, paths, boxes = parquet_batches(np.random.default_rng(1))
    path = str(tmp_path / "emb.parquet")
    assert write_geoparquet(path, iter(batches), MODEL, 8, 256, 192) == 5
    table = pq.read_table(path)
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("path").to_pylist() == paths
    assert table.column("box").to_pylist() == boxes
    stored = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert np.array_equal(stored, embeddings.astype(np.float32))  # float16 values, exactly
    rings = [None if g is None else decode_wkb_polygon(g)
             for g in table.column("geometry").to_pylist()]
    assert rings[1] is None
    for ring, given in zip(rings, footprints):
        if given is not None:
            assert ring == H.lonlat_ring(given, "test") and twice_area(ring) > 0
    assert rings[2] == footprints[2][::-1]  # given clockwise, stored counter-clockwise
    metadata = pq.read_metadata(path).metadata
    assert table.schema.metadata[b"geo"] == metadata[b"geo"]  # where GeoPandas looks for it
    geo = json.loads(metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert "crs" not in column  # absent = OGC:CRS84
    corners = np.array([p for r in rings if r for p in r])
    assert column["bbox"] == [*corners.min(0).tolist(), *corners.max(0).tolist()]
    assert json.loads(metadata[b"mrs_adapter:model"]) == MODEL
    assert metadata[b"emb:type"] == b"chip" and metadata[b"emb:dimensions"] == b"8"
    assert json.loads(metadata[b"emb:chip_layout"]) == {
        "layout_type": "regular_grid", "chip_size": [256, 256], "stride": [192, 192]}
    assert json.loads(metadata[b"emb:quantization"])["quantized_dtype"] == "float16"
    assert pq.ParquetFile(path).metadata.num_row_groups == 2  # one per non-empty batch
    assert written_by_us(path)


def test_geoparquet_failure_leaves_the_old_file(tmp_path):
    batches, *_ = parquet_batches(np.random.default_rng(2))
    path = str(tmp_path / "emb.parquet")
    write_geoparquet(path, iter(batches), MODEL, 8, 256, 192)
    before = open(path, "rb").read()

    def failing():
        yield batches[0]
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        write_geoparquet(path, failing(), MODEL, 8, 256, 192)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["emb.parquet"]
    with pytest.raises(ValueError, match=r"a batch of 3 paths .* not \(3, 4\)"):
        write_geoparquet(path, iter(batches), MODEL, 4, 256, 192)  # embeddings have 8 values
    assert open(path, "rb").read() == before


def test_geoparquet_without_pyarrow_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if the [geo] extra were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = str(tmp_path / "emb.parquet")
    with pytest.raises(ValueError) as error:
        write_geoparquet(path, iter([]), MODEL, 8, 256, 192)
    message = str(error.value)
    assert message == f'{path}: writing GeoParquet needs pyarrow: pip install -e ".[geo]"'
    assert not os.path.exists(path)


def gray(width, height, value):
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_map_outlines_land_on_the_tiles_pixels(tmp_path):
    box = [200, 100, 600, 500]  # full-resolution pixels [left, top, right, bottom)
    scenes = [{"path": "/data/scene_a.tif", "overview": gray(400, 300, 120), "scale": 0.5,
               "hits": [{"rank": 1, "box": box}]},
              # 2048 px wide at scale 1: fitted to 1024 px (scale 0.5), the box lands as above
              {"path": "/data/scene_b.tif", "overview": Image.fromarray(gray(2048, 1536, 60)),
               "scale": 1.0, "hits": [{"rank": 2, "box": box}]}]
    canvas, placements = render_map(scenes)
    assert canvas.height < 1024 and canvas.width < 2 * 1024 + 3 * 16  # thumbnails <= 1024 px
    for (x, y, sx, sy), background in zip(placements, (120, 60)):
        def at(px, py):
            return canvas.getpixel((x + px, y + py))
        assert at(100, 150) == at(299, 150) == at(250, 50) == at(250, 249) == OUTLINE
        for outside in ((99, 150), (300, 150), (250, 49), (250, 250), (200, 150)):
            assert at(*outside) == (background,) * 3, outside  # just beyond the edges; inside
        assert at(103, 53) == LABEL_BACK  # the rank label's margin, inside the top-left corner
    assert placements[1][2] == pytest.approx(0.5)
    whole, [(x, y, _, _)] = render_map([{"path": "p.png", "overview": gray(64, 48, 90),
                                         "scale": 1.0, "hits": [{"rank": 1, "box": None}]}])
    assert whole.getpixel((x + 63, y + 30)) == whole.getpixel((x + 30, y + 47)) == OUTLINE
    path = str(tmp_path / "map.png")
    draw_map(path, scenes)
    assert written_by_us(path) and Image.open(path).size == canvas.size


def test_only_our_own_files_are_replaced(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    ours = {"h.json": lambda p: H.write_hits_json(p, sample_hits(), "q"),
            "h.geojson": lambda p: H.write_geojson(p, sample_hits(), "q"),
            "map.png": lambda p: draw_map(p, [{"path": "a", "overview": gray(8, 8, 0),
                                               "scale": 1, "hits": []}]),
            "emb.parquet": lambda p: write_geoparquet(p, iter([]), MODEL, 8, 256, 192)}
    for name, write in ours.items():
        write(str(tmp_path / name))
        assert written_by_us(str(tmp_path / name)), name
        check_output(str(tmp_path / name), "--out")  # may be replaced
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    (tmp_path / "index.json").write_text(json.dumps({"written_by": "mrs-adapter search"}))
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    for name in ("photo.png", "index.json", "list.json", "notes.txt", "broken.parquet",
                 "other.parquet", "missing.json"):
        assert not written_by_us(str(tmp_path / name)), name
    with pytest.raises(FileExistsError, match="index.json exists and was not written by search"):
        check_output(str(tmp_path / "index.json"), "--geojson")
    check_output(str(tmp_path / "new.geojson"), "--geojson")
