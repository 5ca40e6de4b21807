"""search/raster.py, raster_info.py and readers.py on GeoTIFFs the tests write with rasterio: the
bands read, one stretch per scene, nodata / alpha / mask tiles, footprints against pyproj on the
files' own GeoTIFF tags, --gsd, reads by window, and the errors without rasterio."""
import importlib
import json
import pickle
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

rasterio = pytest.importorskip("rasterio")
pyproj = pytest.importorskip("pyproj")
from rasterio.enums import ColorInterp  # noqa: E402
from rasterio.transform import Affine  # noqa: E402

from mrs_adapter.datasets import read_image  # noqa: E402
from mrs_adapter.search import raster, readers  # noqa: E402
from mrs_adapter.search.index import tile_boxes  # noqa: E402
from mrs_adapter.search.raster import open_scene, stretch_to_uint8  # noqa: E402
from mrs_adapter.search.raster_info import metres_per_degree  # noqa: E402

W, H = 600, 500
UTM = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4500000.0)  # 10 m pixels, EPSG:32633 (UTM 33N)
FIXED = (0.0, 5100.0)  # band b holds 1000 b + (0..199): 50 b + (0..10) after this stretch


def write(path, data, transform=UTM, crs="EPSG:32633", colorinterp=None, overviews=(),
          mask=None, tags=None, colormap=None, **profile):
    """A GeoTIFF of `data` (B, H, W); crs=None writes one without georeferencing."""
    count, height, width = data.shape
    geo = dict(crs=crs, transform=transform) if crs else {}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count,
                           dtype=data.dtype, **geo, **profile) as dst:
            dst.write(data)
            if colorinterp:
                dst.colorinterp = colorinterp
            if mask is not None:
                dst.write_mask(mask)
            if colormap:
                dst.write_colormap(1, colormap)
            if tags:
                dst.update_tags(**tags)
            if overviews:
                dst.build_overviews(list(overviews))
    return str(path)


def bands_and_collar():
    """(data (4, H, W) uint16, valid (H, W)): band b = 1000 b + a ramp of 0..199, and a nodata
    (0) collar on the left of irregular width (30 to 330 px): some tiles more than half collar."""
    y, x = np.mgrid[0:H, 0:W]
    ramp = (x + 2 * y) % 200
    data = np.stack([1000 * b + ramp for b in (1, 2, 3, 4)]).astype(np.uint16)
    collar = 180 + (150 * np.sin(y / 40.0)).astype(int)
    valid = x >= collar
    data[:, ~valid] = 0
    return data, valid


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("raster")
    data, valid = bands_and_collar()
    nir_first = [ColorInterp.nir, ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    rng = np.random.default_rng(0)
    smooth = np.stack([np.add.outer(np.arange(H) // 4, np.arange(W) // 3 * k) % 256
                       for k in (1, 2, 3)]).astype(np.uint8)
    return {
        "data": data, "valid": valid, "root": root,
        "utm": write(root / "utm.tif", data, colorinterp=nir_first, overviews=(2, 4, 8),
                     nodata=0, tiled=True, blockxsize=256, blockysize=256, compress="lzw"),
        "jpeg": write(root / "jpeg.tif", smooth, tiled=True, blockxsize=256, blockysize=256,
                      compress="jpeg", photometric="YCBCR"),
        "plain": write(root / "plain.tif", data[:3] // 20, crs=None),
        "u8_nir": write(root / "u8_nir.tif", (data // 20).astype(np.uint8),
                        colorinterp=nir_first, photometric="MINISBLACK"),
        "u8_undefined": write(root / "u8_undefined.tif", (data // 20).astype(np.uint8),
                              colorinterp=[ColorInterp.gray] + [ColorInterp.undefined] * 3,
                              photometric="MINISBLACK"),
        "gray16": write(root / "gray16.tif", rng.integers(300, 4000, (1, 300, 200), np.uint16)),
        "point": write(root / "point.tif", data, tags={"AREA_OR_POINT": "Point"}),
    }


def tiles(scene, tile=256, stride=192):
    return list(scene.tiles(tile, stride))


# ---- bands ---------------------------------------------------------------------------------

def channel_means(scene, tile_list):
    """Per channel mean of the valid pixels of the kept tiles, with the stretch FIXED."""
    kept = [rgb for _, rgb, _ in tile_list if rgb is not None]
    return np.mean([rgb.reshape(-1, 3)[(rgb != scene.fill).any(-1).ravel()].mean(0)
                    for rgb in kept], axis=0)


def test_default_bands_follow_colour_interpretation_and_are_the_ones_read(files):
    scene = open_scene(files["utm"], stretch=FIXED)
    assert scene.bands == (2, 3, 4) and scene.band_names == ("red", "green", "blue")
    assert scene.notes == []
    # band b reads 50 b + 0..10 after the fixed stretch: the channels say which band was read
    assert np.allclose(channel_means(scene, tiles(scene)), [105, 155, 205], atol=3)


@pytest.mark.parametrize("bands, expected", [((3, 2, 1), [155, 105, 55]), ((4,), [205] * 3),
                                             ((1, 1, 4), [55, 55, 205])])
def test_chosen_bands_are_the_ones_read(files, bands, expected):
    scene = open_scene(files["utm"], bands=bands, stretch=FIXED)
    assert np.allclose(channel_means(scene, tiles(scene)), expected, atol=3)


def test_eight_bit_nir_first_reads_red_green_blue_by_interpretation(files):
    scene = open_scene(files["u8_nir"])
    assert scene.bands == (2, 3, 4) and scene.stretch is None
    rgb = tiles(scene)[-1][1]  # bottom-right: no collar
    assert np.allclose(rgb.reshape(-1, 3).mean(0), (np.array([2, 3, 4]) * 1000 + 100) / 20,
                       atol=1.5)


def test_uninterpreted_bands_default_to_1_2_3_with_a_note(files):
    scene = open_scene(files["u8_undefined"])
    assert scene.bands == (1, 2, 3)
    assert len(scene.notes) == 1 and "--bands" in scene.notes[0] and "undefined" in scene.notes[0]


def test_bad_bands_name_the_file_and_flag(files):
    for bands in ((5,), (1, 2), (0, 1, 2)):
        with pytest.raises(ValueError, match=r"utm\.tif: --bands .*1 to 4"):
            open_scene(files["utm"], bands=bands)


# ---- stretch -------------------------------------------------------------------------------

def test_one_stretch_per_scene_from_valid_pixels(files):
    data, valid = files["data"], files["valid"]
    scene = open_scene(files["utm"])
    expected = [np.percentile(data[b - 1][valid], (2, 98)) for b in scene.bands]
    assert np.allclose(scene.stretch, expected)  # 600 px: the sample is the whole scene
    per_tile_would_differ = False
    for box, rgb, _ in tiles(scene):
        if rgb is None:
            continue
        left, top, right, bottom = box
        raw = data[[b - 1 for b in scene.bands], top:bottom, left:right]
        ok = valid[top:bottom, left:right]
        by_hand = stretch_to_uint8(raw, expected)
        assert np.abs(rgb[ok].astype(int) - by_hand[ok]).max() <= 1
        own = [np.percentile(raw[i][ok], (2, 98)) for i in range(3)]  # negative control
        per_tile_would_differ |= np.abs(stretch_to_uint8(raw, own)[ok] - by_hand[ok]).max() > 5
    assert per_tile_would_differ


def test_fixed_stretch_and_eight_bit(files):
    assert open_scene(files["utm"], stretch=(0, 3000)).stretch == [(0.0, 3000.0)] * 3
    with pytest.raises(ValueError, match="--stretch 3000 0"):
        open_scene(files["utm"], stretch=(3000, 0))
    jpeg = open_scene(files["jpeg"], stretch=(0, 3000))
    assert jpeg.stretch is None and jpeg.stretch_from == "8-bit values as they are"


def test_single_band_16_bit_matches_the_pillow_reader(files):
    """Gray, stretched as datasets.to_rgb8 stretches a 16-bit image read by Pillow."""
    scene = open_scene(files["gray16"])
    assert scene.bands == (1, 1, 1) and scene.notes == []
    [(box, rgb, invalid)] = tiles(scene)  # 300 x 200: whole
    pillow = read_image(files["gray16"], np.asarray)
    assert box == (0, 0, 200, 300) and invalid == 0.0 and rgb.shape == pillow.shape
    assert np.abs(rgb.astype(int) - pillow).max() <= 1 and (rgb != pillow).mean() < 0.01


def test_jpeg_ycbcr_tiles_match_the_pillow_reader(files):
    scene = open_scene(files["jpeg"])
    assert scene.bands == (1, 2, 3) and scene.nodata == "none"
    pillow = read_image(files["jpeg"], np.asarray)
    for (left, top, right, bottom), rgb, _ in tiles(scene):
        assert np.abs(rgb.astype(int) - pillow[top:bottom, left:right]).mean() < 2


# ---- nodata, alpha, mask -------------------------------------------------------------------

def test_collar_tiles_are_left_out_and_kept_tiles_filled_with_the_median(files):
    valid = files["valid"]
    scene = open_scene(files["utm"], max_nodata=0.5)
    assert scene.nodata == "nodata value 0"
    result = tiles(scene, 128, 96)
    truth = [1 - valid[top:bottom, left:right].mean()
             for (left, top, right, bottom), _, _ in result]
    assert [inv for _, _, inv in result] == pytest.approx(truth)
    skipped = [rgb is None for _, rgb, _ in result]
    assert skipped == [f > 0.5 for f in truth] and 0 < sum(skipped) < len(result)
    median = np.median(files["data"][[b - 1 for b in scene.bands]][:, valid], axis=1)
    assert np.abs(np.array(scene.fill) - stretch_to_uint8(median[:, None, None],
                                                          scene.stretch)[0, 0]).max() <= 1
    for (left, top, right, bottom), rgb, _ in result:
        if rgb is not None:
            assert (rgb[~valid[top:bottom, left:right]] == scene.fill).all()


def test_all_nodata_scene_yields_no_pixels(files):
    path = write(files["root"] / "empty.tif", np.zeros((4, 300, 400), np.uint16), nodata=0)
    scene = open_scene(path)
    assert scene.valid_fraction == 0.0
    assert all(rgb is None and inv == 1.0 for _, rgb, inv in tiles(scene))


def test_alpha_band_and_internal_mask_mark_invalid_pixels(files):
    rgb = np.full((3, 400, 400), 120, np.uint8)
    alpha = np.full((400, 400), 255, np.uint8)
    alpha[:, :200] = 0  # the left half transparent: one column of tiles is mostly so
    with_alpha = write(files["root"] / "alpha.tif", np.concatenate([rgb, alpha[None]]),
                       photometric="RGB", alpha="YES")
    masked = write(files["root"] / "mask.tif", rgb, mask=alpha)
    for path, kind in ((with_alpha, "alpha band 4"), (masked, "internal mask")):
        scene = open_scene(path)
        assert scene.nodata == kind and scene.bands == (1, 2, 3)
        for (left, top, right, bottom), pixels, invalid in tiles(scene):
            assert invalid == pytest.approx((alpha[top:bottom, left:right] == 0).mean())
            assert (pixels is None) == (invalid > 0.5)


def test_palette_band_shows_its_colour_table(files):
    index = (np.arange(200 * 300).reshape(1, 200, 300) % 3).astype(np.uint8)
    table = {0: (255, 0, 0, 255), 1: (0, 255, 0, 255), 2: (10, 20, 30, 255)}
    path = write(files["root"] / "palette.tif", index, photometric="PALETTE", colormap=table)
    [(_, rgb, _)] = tiles(open_scene(path))
    assert (rgb == np.array([table[i][:3] for i in range(3)])[index[0]]).all()


# ---- coordinates ---------------------------------------------------------------------------

def geotiff_tags(path):
    """The first directory's tags, by Pillow's TIFF tag reader (not GDAL)."""
    with open(path, "rb") as f:
        tags = TiffImagePlugin.ImageFileDirectory_v2(f.read(8))
        f.seek(tags.next)
        tags.load(f)
    return tags


def raw_affine(path):
    """(a, b, c, d, e, f), pixel corners, from the file's own GeoTIFF tags read by Pillow's TIFF
    directory reader (not GDAL): ModelTransformation (34264) or ModelPixelScale (33550) +
    ModelTiepoint (33922); shifted by half a pixel where GTRasterTypeGeoKey (1025) is
    PixelIsPoint (2), whose tie point is the centre of pixel (0, 0)."""
    tags = geotiff_tags(path)
    keys = tags[34735]  # GeoKeyDirectory: a header of 4 shorts, then 4 shorts per key
    point = any(keys[i] == 1025 and keys[i + 3] == 2 for i in range(4, len(keys), 4))
    if 34264 in tags:
        m = tags[34264]
        a, b, c, d, e, f = m[0], m[1], m[3], m[4], m[5], m[7]
    else:
        sx, sy = tags[33550][:2]
        i, j, _, x, y, _ = tags[33922][:6]
        a, b, c, d, e, f = sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy
    if point:
        c, f = c - (a + b) / 2, f - (d + e) / 2
    return a, b, c, d, e, f


def pyproj_corners(path, box, epsg=32633):
    a, b, c, d, e, f = raw_affine(path)
    to_lonlat = pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)
    left, top, right, bottom = box
    return [to_lonlat.transform(a * col + b * row + c, d * col + e * row + f)
            for col, row in ((left, bottom), (right, bottom), (right, top), (left, top))]


def shoelace(ring):
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


@pytest.mark.parametrize("name", ["utm", "point"])
def test_footprints_equal_pyproj_on_the_raw_geotiff_tags(files, name):
    scene = open_scene(files[name])
    assert scene.crs == "EPSG:32633"
    boxes = [box for box, _, _ in tiles(scene, 128, 96)] + [None]
    whole = scene.footprint()
    assert whole["bounds"] == pytest.approx([500000, 4500000 - 10 * H, 500000 + 10 * W, 4500000])
    for box, fp in zip(boxes, scene.footprints(boxes)):
        ring = fp["lonlat"]
        assert len(ring) == 5 and ring[0] == ring[-1] and shoelace(ring) > 0
        expected = pyproj_corners(files[name], box or (0, 0, W, H))
        assert np.abs(np.array(ring[:4]) - expected).max() < 1e-6


def test_point_file_stores_pixel_centres(files):
    """The control of the test above: point.tif stores the centre of pixel (0, 0), half a pixel
    (5 m, ~6e-5 degrees) from its corner, so a reader that ignored PixelIsPoint would fail it."""
    assert geotiff_tags(files["point"])[33922][3:5] == (500005.0, 4499995.0)
    assert raw_affine(files["point"]) == raw_affine(files["utm"])


@pytest.mark.parametrize("transform", [
    Affine.rotation(20) @ Affine.scale(10, -10),  # north-up turned by 20 degrees
    Affine(10, 0, 0, 0, 10, 0),  # south-up: rows run north
])
def test_rotated_and_flipped_transforms_place_closed_counter_clockwise_rings(files, transform):
    path = write(files["root"] / "turned.tif", files["data"][:3],
                 transform=Affine.translation(500000, 4500000) @ transform)
    scene = open_scene(path)
    assert scene.native_gsd == pytest.approx((10, 10))
    boxes = [(0, 0, 100, 50), (300, 200, 600, 500)]
    for box, fp in zip(boxes, scene.footprints(boxes)):
        ring = fp["lonlat"]
        assert ring[0] == ring[-1] and shoelace(ring) > 0
        expected = pyproj_corners(path, box)
        assert any(np.abs(np.roll(np.array(order), k, 0) - expected).max() < 1e-6
                   for order in (ring[:4], ring[:4][::-1]) for k in range(4))


def test_no_georeferencing_keeps_pixel_boxes(files):
    scene = open_scene(files["plain"])
    assert scene.crs is None and scene.transform is None and scene.native_gsd is None
    assert scene.footprints([(0, 0, 10, 10), None]) == [None, None]
    assert any(note.startswith("not georeferenced") for note in scene.notes)
    assert len(tiles(scene)) == len(tile_boxes(W, H))
    with pytest.raises(ValueError, match=r"plain\.tif: --gsd 1 needs a georeferenced file"):
        open_scene(files["plain"], gsd=1)


# ---- --gsd and windows ---------------------------------------------------------------------

def test_grid_is_the_index_grid_at_full_resolution_and_reads_in_parts(files):
    scene = open_scene(files["utm"])
    whole = tiles(scene, 128, 96)
    assert [box for box, _, _ in whole] == tile_boxes(W, H, 128, 96)
    parts = [t for start in range(0, len(whole), 7) for t in scene.tiles(128, 96, start, start + 7)]
    assert [b for b, _, _ in parts] == [b for b, _, _ in whole]
    assert all(p is None and w is None or (p == w).all()
               for (_, p, _), (_, w, _) in zip(parts, whole))


def test_tiles_of_a_wide_scene_go_band_by_band_each_read_as_in_grid_order(files, monkeypatch):
    scene = open_scene(files["utm"])
    grid = {box: (rgb, invalid) for box, rgb, invalid in tiles(scene, 128, 96)}
    monkeypatch.setattr(raster, "BAND_PX", 200)  # 600 px wide: three bands
    banded = tiles(scene, 128, 96)
    lefts = [box[0] // 200 for box, _, _ in banded]
    assert lefts == sorted(lefts) and len(set(lefts)) == 3  # band after band, left to right
    for b in set(lefts):  # each band top to bottom
        tops = [box[1] for (box, _, _), band in zip(banded, lefts) if band == b]
        assert tops == sorted(tops)
    assert [box for box, _, _ in banded] != list(grid)  # not the row-by-row order
    assert sorted(box for box, _, _ in banded) == sorted(grid)  # every tile once
    for box, rgb, invalid in banded:
        assert invalid == grid[box][1]
        assert rgb is None and grid[box][0] is None or (rgb == grid[box][0]).all()


def test_block_cache_of_a_tiled_scene_is_flat_in_its_width(tmp_path):
    def cache(width, **profile):
        path = write(tmp_path / f"w{width}.tif", np.ones((4, 300, width), np.uint16), **profile)
        with raster._opened(path) as src:
            return raster._block_cache(src, raster.BAND_PX, 256)
    tiled = dict(tiled=True, blockxsize=256, blockysize=256, compress="lzw")
    assert cache(3000, **tiled) == cache(9000, **tiled)  # one band's blocks, any width
    assert cache(9000) > cache(3000)  # full-width strips: a row of them, as wide as the file


def test_gsd_twice_native_gives_about_a_quarter_of_the_tiles(files):
    native = open_scene(files["utm"], max_nodata=1.0)
    coarse = open_scene(files["utm"], gsd=20.0, max_nodata=1.0)
    assert native.native_gsd == (10.0, 10.0) and coarse.scale == (0.5, 0.5)
    assert coarse.output_size == (300, 250)
    fine, half = tiles(native, 32, 32), tiles(coarse, 32, 32)
    assert 0.2 < len(half) / len(fine) < 0.3
    for box, rgb, _ in half:
        assert rgb.shape == (32, 32, 3)
        assert box[2] - box[0] == 64 and box[3] - box[1] == 64  # full-resolution px
    assert max(b[2] for b, _, _ in half) == W and max(b[3] for b, _, _ in half) == H
    with pytest.raises(ValueError, match="--gsd 0"):
        open_scene(files["utm"], gsd=0)
    finer = open_scene(files["utm"], gsd=5.0)
    assert finer.output_size == (2 * W, 2 * H) and "upsampled 2x" in finer.notes[0]


def test_gsd_of_a_crs_in_feet_is_in_metres(files):
    path = write(files["root"] / "feet.tif", files["data"][:3], crs="EPSG:2263",  # US survey ft
                 transform=Affine(2.0, 0.0, 980000.0, 0.0, -2.0, 200000.0))
    assert open_scene(path).native_gsd == pytest.approx((2 * 1200 / 3937,) * 2)


def test_gsd_of_a_geographic_crs_uses_metres_on_the_ground(files):
    step = 1e-4  # degrees, at 45 N
    path = write(files["root"] / "lonlat.tif", files["data"][:3], crs="EPSG:4326",
                 transform=Affine(step, 0.0, 10.0, 0.0, -step, 45.0 + step * H / 2))
    scene = open_scene(path)
    geod = pyproj.Geod(ellps="WGS84")
    east = geod.inv(10.0, 45.0, 10.0 + step, 45.0)[2]
    north = geod.inv(10.0, 45.0, 10.0, 45.0 + step)[2]
    assert scene.native_gsd == pytest.approx((east, north), rel=1e-3)
    assert metres_per_degree(0.0)[0] == pytest.approx(111319.49, abs=0.01)
    assert open_scene(path, gsd=2 * north).scale == pytest.approx((east / north / 2, 0.5))


@pytest.fixture
def reads(monkeypatch):
    """Every rasterio read and read_masks call's output (rows, cols)."""
    seen = []
    reader = rasterio.io.DatasetReader
    for name in ("read", "read_masks"):
        original = getattr(reader, name)

        def logged(self, *args, _original=original, **kw):
            out = _original(self, *args, **kw)
            seen.append(out.shape[-2:])
            return out
        monkeypatch.setattr(reader, name, logged)
    return seen


@pytest.mark.parametrize("overviews", [True, False])
def test_no_read_is_larger_than_a_tile_or_the_sample(files, reads, monkeypatch, overviews):
    """The scene is never read whole: stretch from an overview / decimated read or windows."""
    monkeypatch.setattr(raster, "SAMPLE_SIDE", 64)  # the scene is 9x larger than that
    monkeypatch.setattr(raster, "SAMPLE_WINDOW", 32)
    path = files["utm"] if overviews else write(files["root"] / "flat.tif", files["data"],
                                               nodata=0, tiled=True, compress="lzw")
    scene = open_scene(path)
    assert ("read of the whole scene" in scene.stretch_from) == overviews
    sample = len(reads)
    assert sample > 0 and max(max(s) for s in reads) <= 64
    result = tiles(scene, 100, 100)
    assert len(result) == len(tile_boxes(W, H, 100, 100))
    assert len(reads) > sample and max(max(s) for s in reads[sample:]) <= 100
    scene.overview(50)
    assert max(reads[-1]) == 50


def test_overview_picture_and_scale(files):
    scene = open_scene(files["utm"])
    picture, scale = scene.overview(120)
    assert picture.shape == (100, 120, 3) and picture.dtype == np.uint8
    assert scale == pytest.approx(0.2)


def test_scene_pickles_and_records_json(files):
    scene = open_scene(files["utm"], gsd=20.0)
    again = pickle.loads(pickle.dumps(scene))
    assert [b for b, _, _ in tiles(again)] == [b for b, _, _ in tiles(scene)]
    record = json.loads(json.dumps(scene.record()))
    assert record["bands"] == [2, 3, 4] and record["crs"] == "EPSG:32633"
    assert record["gsd"] == 20.0 and record["nodata"] == "nodata value 0"
    assert len(record["stretch"]) == 3 and record["fill"] == list(scene.fill)


# ---- which reader, and without rasterio ----------------------------------------------------

@pytest.fixture(scope="module")
def plain_images(files):
    root, data = files["root"], files["data"]
    rgb = Image.fromarray((data[:3] // 20).astype(np.uint8).transpose(1, 2, 0))
    paths = {}
    for name in ("rgb.png", "rgb.jpg", "rgb8.tif"):
        rgb.save(root / name)
        paths[name] = str(root / name)
    Image.fromarray(np.full((40, 30), 3000, np.uint16)).save(root / "gray16.png")
    paths["gray16.png"] = str(root / "gray16.png")
    paths["band16"] = write(root / "band16.tif", data, interleave="band")  # Pillow: I;16
    paths["rgb16"] = write(root / "rgb16.tif", data[:3], photometric="RGB")
    return paths


def test_pillow_would_misread(files, plain_images, monkeypatch):
    for name in ("rgb.png", "rgb.jpg", "rgb8.tif", "gray16.png"):
        assert readers.pillow_would_misread(plain_images[name]) is None, name
    assert readers.pillow_would_misread(files["gray16"]) is None
    assert readers.pillow_would_misread(files["jpeg"]) is None
    assert readers.pillow_would_misread(plain_images["band16"]) == \
        "a 4-band 16-bit TIFF (Pillow reads 1 band)"
    assert readers.pillow_would_misread(plain_images["rgb16"]) == \
        "a 3-band 16-bit TIFF (Pillow keeps the top 8 bits of each value)"
    assert readers.pillow_would_misread(files["utm"]) == \
        "a 4-band 16-bit TIFF that Pillow cannot open"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above, refuses 2x above
    assert readers.pillow_would_misread(plain_images["gray16.png"]).startswith("a 30 x 40 px")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    assert readers.pillow_would_misread(plain_images["gray16.png"]) == \
        "a scene above 1000 px, which Pillow refuses to decode"


def test_choose_reader(files, plain_images):
    assert readers.choose_reader(plain_images["rgb.png"]) == "pillow"
    assert readers.choose_reader(plain_images["rgb.jpg"]) == "pillow"
    assert readers.choose_reader(plain_images["rgb8.tif"]) == "rasterio"
    assert readers.choose_reader(files["utm"]) == "rasterio"


def test_without_rasterio_a_four_band_file_is_a_one_line_error(files, plain_images,
                                                                monkeypatch):
    scene = open_scene(files["plain"])  # made with rasterio; read after it is gone
    monkeypatch.setitem(sys.modules, "rasterio", None)  # `import rasterio` raises ImportError
    fresh = importlib.reload(raster)  # the module imports without rasterio
    assert not readers.has_rasterio()
    for path in (files["utm"], plain_images["band16"], files["u8_nir"]):
        for call in (readers.choose_reader, fresh.open_scene):
            with pytest.raises(readers.RasterioMissing) as caught:
                call(path)
            message = str(caught.value)
            assert message.startswith(f"{path}: reading ") and "\n" not in message
            assert message.endswith('needs rasterio: pip install -e ".[geo]"')
    for name in ("rgb.png", "rgb.jpg", "rgb8.tif", "gray16.png"):
        assert readers.choose_reader(plain_images[name]) == "pillow"
    assert readers.choose_reader(files["gray16"]) == "pillow"
    with pytest.raises(readers.RasterioMissing, match=r"plain\.tif: reading .* needs rasterio"):
        next(scene.tiles(256, 192))
