"""Bad data, bad flags and faults: nothing a user wrote is lost, nothing wrong passes
silently, and each mistake gets one line naming the file or flag, before anything is computed."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import petl_benchmark as benchmark
import train
from mrs_adapter import atomic
from mrs_adapter.clip import transform
from mrs_adapter.data import Split, load_splits
from mrs_adapter.datasets import CaptionDataset, read_image
from mrs_adapter.demo.scenes import make_demo
from mrs_adapter.demo.scenes import prepare as prepare_demo
from mrs_adapter.prepare.check import check_dataset
from mrs_adapter.prepare.cli import main as _main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(demo, output, *extra):
    root, backbone = demo
    return [
        "--dataset",
        "demo",
        "--data-root",
        root,
        "--clip",
        backbone,
        "--output",
        str(output),
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--print-freq",
        "100",
        *extra,
    ]


def old_run(folder):
    """A run folder as train.py leaves it, plus a file of the user's."""
    (folder / "seed2").mkdir(parents=True)
    for name in ("seed2/last.pt", "seed2/config.json", "results.json", "notes.txt"):
        (folder / name).write_text(name)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# 1 + 13: every argument is checked before --overwrite removes anything
@pytest.mark.parametrize(
    "bad, message",
    [
        (["--clip", "nope.pt"], "unknown CLIP model 'nope.pt'"),
        (["--method", "zero_shot"], "trains nothing"),
        (["--epochs", "0"], "--epochs 0: expected a positive number"),
    ],
)
def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(demo, tmp_path, bad, message):
    before = old_run(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        train.main(train_args(demo, tmp_path / "run", "--overwrite") + bad)
    assert (
        sorted(str(p.relative_to(tmp_path / "run")) for p in (tmp_path / "run").rglob("*"))
        == before
    )
    assert (tmp_path / "run" / "seed2" / "last.pt").read_text() == "seed2/last.pt"


# 2 + 13: the demo is generated only where nothing is; a user's folder is never deleted
def test_demo_generation_never_deletes_a_folder_it_did_not_write(make_json_dataset, tmp_path,
                                                                  capsys):
    root = tmp_path / "data"
    root.mkdir()
    make_json_dataset(str(root), name="demo")  # the user's own demo_images/ and dataset_demo.json
    mine = root / "demo_images" / "0.tif"
    stamp = mine.read_bytes()
    splits = load_splits("demo", str(root), layout="json")
    assert len(splits["test"].image_paths) == 3 and mine.read_bytes() == stamp
    with pytest.raises(FileExistsError, match="demo_images was not written by the demo generator"):
        prepare_demo(str(root))  # precomp: would have to generate, but demo_images is not ours
    assert mine.read_bytes() == stamp and not (root / "demo_precomp").exists()
    # a generated demo is replaced (other parameters) only while it holds nothing but its own files
    fresh = tmp_path / "fresh"
    prepare_demo(str(fresh))  # negative control: nothing there, so it is generated, and said
    assert (
        "no demo dataset in" in capsys.readouterr().out
        and (fresh / "demo_images" / "train_0000.tif").exists()
    )
    (fresh / "demo_images" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        make_demo(str(fresh), seed=5, n_train=4, n_test=2, size=16)
    assert (fresh / "demo_images" / "notes.txt").read_text() == "mine"


# 3: --visualize and --json refuse a file eval.py did not write, before the evaluation runs
@pytest.fixture
def eval_setup(make_tiny_clip, tmp_path):
    root = tmp_path / "data"
    make_demo(str(root), n_train=10, n_test=6, size=32)
    weights = tmp_path / "tiny.pt"
    torch.save(make_tiny_clip().state_dict(), weights)
    return [
        "--dataset",
        "demo",
        "--data-root",
        str(root),
        "--zero-shot",
        "--clip",
        str(weights),
        "--device",
        "cpu",
        "--json",
        str(tmp_path / "eval.json"),
    ]


def test_visualize_and_json_refuse_foreign_files_before_evaluating(
    eval_setup, eval_script, tmp_path, monkeypatch
):
    eval_script.main(
        eval_setup + ["--visualize", str(tmp_path / "queries.png")]
    )  # its own files...
    eval_script.main(eval_setup + ["--visualize", str(tmp_path / "queries.png")])  # ...are replaced
    assert Image.open(tmp_path / "queries.png").size[0] > 0

    def no_evaluation(*a, **k):
        raise AssertionError("the evaluation ran before the output was checked")

    monkeypatch.setattr(eval_script, "encode_dataset", no_evaluation)
    foreign = tmp_path / "results.json"
    foreign.write_text('{"mine": 1}')
    with pytest.raises(
        FileExistsError, match="results.json exists and was not written by eval.py.*--visualize"
    ):
        eval_script.main(eval_setup + ["--visualize", str(foreign)])
    photo = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(photo)  # a PNG, but not ours
    with pytest.raises(FileExistsError, match="photo.png"):
        eval_script.main(eval_setup + ["--visualize", str(photo)])
    with pytest.raises(FileExistsError, match="results.json.*--json"):
        eval_script.main(eval_setup + ["--json", str(foreign)])
    assert foreign.read_text() == '{"mine": 1}' and Image.open(photo).size == (4, 4)


# 4: --resume refuses changed settings, except those that cannot change the result
def test_resume_refuses_changed_settings_but_extends_epochs(demo, tmp_path):
    train.main(train_args(demo, tmp_path / "run"))
    config = tmp_path / "run" / "seed2" / "config.json"
    before = config.read_text()
    with pytest.raises(
        ValueError, match=r"differ from .*seed2/last.pt: batch-size 16 -> 8; lr 0.001 -> 0.002\."
    ):
        train.main(
            train_args(demo, tmp_path / "run", "--resume", "--lr", "2e-3", "--batch-size", "8")
        )
    assert config.read_text() == before
    summary = train.main(
        train_args(demo, tmp_path / "run", "--resume", "--epochs", "2", "--print-freq", "7")
    )
    assert json.loads(config.read_text())["epochs"] == 2  # config.json agrees with the checkpoints
    assert torch.load(tmp_path / "run" / "seed2" / "last.pt", weights_only=True)["epoch"] == 1
    assert summary["per_seed"][0]["test"]["mR"] >= 0


def test_check_resume_config_lists_every_difference():
    old = {
        "lr": 1e-3,
        "loss_weights": [1.0, 1.0, 1.0],
        "epochs": 3,
        "workers": 0,
        "environment": {"a": 1},
    }
    same = {
        "lr": 1e-3,
        "loss_weights": (1.0, 1.0, 1.0),
        "epochs": 9,
        "workers": 4,
        "environment": {"a": 2},
    }
    train.check_resume_config(old, same, "c.json")  # only resumable settings differ: fine
    with pytest.raises(
        ValueError,
        match=r"loss-weights \[1.0, 1.0, 1.0\] -> \[1.0, 2.0, 1.0\]; "
        r"new-flag '\(not set\)' -> 1",
    ):
        train.check_resume_config(
            old, {**same, "loss_weights": (1.0, 2.0, 1.0), "new_flag": 1}, "c.json"
        )


def test_a_run_recorded_with_a_retired_setting_resumes_at_the_behaviour_that_stayed():
    """--separate-views is gone; a config.json that recorded it false (the one pass that stayed)
    still resumes, one that recorded it true does not."""
    new = {"lr": 1e-3, "epochs": 3}
    train.check_resume_config({**new, "separate_views": False}, new, "c.json")
    with pytest.raises(ValueError, match=r"differ from c.json: separate-views True -> False\."):
        train.check_resume_config({**new, "separate_views": True}, new, "c.json")


# 5: 16-bit and float images are read with the documented stretch, and check reports them
def stretched(values):
    low, high = np.percentile(values.astype(np.float64), (2, 98))
    return np.round(np.clip((values - low) * 255.0 / (high - low), 0, 255)).astype(np.uint8)


@pytest.mark.parametrize("dtype, mode", [(np.uint16, "I;16"), (np.float32, "F")])
def test_high_bit_depth_images_are_stretched_not_clipped(tmp_path, dtype, mode):
    values = (np.arange(48 * 40).reshape(48, 40) * 2 % 4096).astype(
        dtype
    )  # 12-bit data, as many sensors
    path = tmp_path / "scene.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == mode
    rgb = read_image(str(path), np.asarray)
    assert rgb.dtype == np.uint8 and rgb.shape == (48, 40, 3)
    np.testing.assert_array_equal(rgb[:, :, 0], stretched(values))
    assert (rgb == 255).mean() < 0.05  # the 2% above the 98th percentile, not all white
    assert (rgb[:, :, 0] != rgb[0, 0, 0]).mean() > 0.9  # the content survives
    tensor = read_image(str(path), transform(32))
    assert tensor.std() > 0.3  # PIL's convert("RGB") would give one value everywhere


def write_rgb16_tiff(path, values):
    """An uncompressed 16-bit-per-sample RGB TIFF (PIL cannot write one): header, IFD, samples."""
    h, w, _ = values.shape
    data = values.astype("<u2").tobytes()
    short, long = 3, 4
    tags = [
        (256, short, 1, w),
        (257, short, 1, h),
        (258, short, 3, 8 + 2 + 12 * 10 + 4),
        (259, short, 1, 1),
        (262, short, 1, 2),
        (273, long, 1, 8 + 2 + 12 * 10 + 4 + 6),
        (277, short, 1, 3),
        (278, short, 1, h),
        (279, long, 1, len(data)),
        (284, short, 1, 1),
    ]
    out = b"II*\x00" + struct.pack("<IH", 8, len(tags))
    for tag, kind, n, value in tags:
        out += struct.pack(
            "<HHIHH" if kind == short and n == 1 else "<HHII",
            tag,
            kind,
            n,
            value,
            *([0] if kind == short and n == 1 else []),
        )
    path.write_bytes(out + struct.pack("<I3H", 0, 16, 16, 16) + data)


def test_multi_band_16_bit_tiff_is_refused_not_darkened(tmp_path):
    path = tmp_path / "rgb16.tif"
    write_rgb16_tiff(path, (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 20 % 4096).astype(np.uint16))
    with Image.open(path) as image:  # what PIL alone gives: the top byte, 12-bit data nearly black
        assert image.mode == "RGB" and np.asarray(image).max() == 3820 >> 8
    with pytest.raises(
        ValueError, match="rgb16.tif: 16 bits per sample in 3 bands: PIL keeps only the top 8"
    ):
        read_image(str(path), np.asarray)


def test_check_reports_every_image_that_is_not_8_bit(make_precomp, tmp_path):
    make_precomp(tmp_path, n_train=5, n_test=2)
    assert check_dataset("rsitmd", str(tmp_path)) == []  # negative control: 8-bit RGB only
    Image.fromarray(np.full((8, 8), 3000, np.uint16)).save(
        tmp_path / "rsitmd_images" / "trainscene_3.tif"
    )
    problems = [str(p) for p in check_dataset("rsitmd", str(tmp_path))]
    assert len(problems) == 1 and problems[0].startswith("warning: ")
    assert "train_filename.txt:4: trainscene_3.tif: not 8-bit (PIL mode I;16)" in problems[0]
    assert "stretch" in problems[0]
    write_rgb16_tiff(
        tmp_path / "rsitmd_images" / "trainscene_4.tif", np.full((8, 8, 3), 900, np.uint16)
    )
    problems = [str(p) for p in check_dataset("rsitmd", str(tmp_path))]
    assert any(
        p.startswith("error: ") and "trainscene_4.tif" in p and "16 bits per sample" in p
        for p in problems
    )


# 6: a file-name list with another captions-per-image ratio than stated is an error
def test_names_that_do_not_give_five_captions_per_image_are_an_error(make_precomp, write_lines,
                                                                    tmp_path):
    text = make_precomp(tmp_path, n_train=10, n_test=3)
    for split in ("train", "test"):  # 6 captions per image; test_filename.txt one name per caption
        listed = open(os.path.join(text, f"{split}_filename.txt")).read().split()
        names = list(dict.fromkeys(listed))
        caps = [f"caption {k} of {x}" for x in names for k in range(6)]
        write_lines(os.path.join(text, f"{split}_caps.txt"), caps)
        if split == "test":
            per_caption = [x for x in names for _ in range(6)]
            write_lines(os.path.join(text, "test_filename.txt"), per_caption)
    message = (r"train_filename.txt: 10 file names for the 60 captions .* "
               r"6 captions per image; expected 5")
    with pytest.raises(ValueError, match=message):
        load_splits("rsitmd", str(tmp_path))
    fatal = [str(p) for p in check_dataset("rsitmd", str(tmp_path)) if p.fatal]
    assert len(fatal) == 4 and "6 captions per image" in fatal[0]
    assert all("test_filename.txt" in p and "has 6 captions, expected 5" in p for p in fatal[1:])
    argv = ["check", "--dataset", "rsitmd", "--data-root", str(tmp_path)]
    assert _main(argv) == 1
    splits = load_splits("rsitmd", str(tmp_path), captions_per_image=6)  # stated: 6 per image
    assert len(splits["train"].captions) + len(splits["val"].captions) == 60
    assert all(c.endswith(os.path.basename(splits["train"].image_paths[i]))
               for c, i in zip(splits["train"].captions, splits["train"].txt2img))
    assert _main(argv + ["--captions-per-image", "6"]) == 0
    # one name per caption: a shifted line gives one image 6 captions and the next 4
    names = open(os.path.join(text, "test_filename.txt")).read().split()
    names[6] = names[5]
    write_lines(os.path.join(text, "test_filename.txt"), names)
    problems = check_dataset("rsitmd", str(tmp_path), captions_per_image=6)
    fatal = [str(p) for p in problems if p.fatal]
    assert fatal == [f"error: {text}/test_filename.txt:1: testscene_0.tif has 7 captions, "
                     f"expected 6 (--captions-per-image)",
                     f"error: {text}/test_filename.txt:8: testscene_1.tif has 5 "
                     f"captions, expected 6 (--captions-per-image)"]


# 7: empty caption or file-name files: one error naming each
@pytest.mark.parametrize(
    "emptied", [["train_caps.txt"], ["test_caps.txt"], ["train_caps.txt", "train_filename.txt"]]
)
def test_empty_files_are_one_error_each(make_precomp, tmp_path, emptied):
    text = make_precomp(tmp_path, n_train=10, n_test=3)
    for name in emptied:
        open(os.path.join(text, name), "w").close()
    fatal = [str(p) for p in check_dataset("rsitmd", str(tmp_path)) if p.fatal]
    assert fatal == [
        f"error: {os.path.join(text, name)}: is empty: expected one "
        f"{'caption' if 'caps' in name else 'image file name'} a line"
        for name in emptied
    ]
    with pytest.raises(
        ValueError, match=f"(?s){len(emptied)} problem\\(s\\).*{emptied[0]}: is empty"
    ):
        load_splits("rsitmd", str(tmp_path))


# 8: captions longer than the context are counted, said once per split, and listed by check
def test_captions_longer_than_the_context_are_reported(make_precomp, write_lines, tmp_path,
                                                       capsys):
    text = make_precomp(tmp_path, n_train=5, n_test=2)
    caps = open(os.path.join(text, "train_caps.txt")).read().splitlines()
    caps[7] = caps[7] + " with" + " many small houses" * 30
    write_lines(os.path.join(text, "train_caps.txt"), caps)
    problems = [str(p) for p in check_dataset("rsitmd", str(tmp_path))]
    assert len(problems) == 1 and problems[0].startswith(
        f"warning: {os.path.join(text, 'train_caps.txt')}:8: "
    )
    assert "trainscene_1.tif has 102 tokens, more than the 77-token context" in problems[0]
    assert check_dataset("rsitmd", str(tmp_path), context_length=102) == []  # fits a longer context
    split = Split("train", ["a.tif"] * 3, [caps[7], caps[7], "short"], [0, 1, 2])
    capsys.readouterr()
    CaptionDataset(split, 77)
    out = capsys.readouterr().out
    assert (
        out.count("warning") == 1
        and "2 of 3 train captions are longer than the 77-token context" in out
    )
    CaptionDataset(split, 102)
    assert capsys.readouterr().out == ""


# 9: an unreadable image stops train.py before the run folder exists, with or without the cache
def test_broken_image_stops_before_the_run_folder_is_made(demo, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(demo[0], root, ignore=shutil.ignore_patterns("*.pt"))
    broken = root / "demo_images" / "train_0007.tif"
    broken.write_bytes(broken.read_bytes()[:100])
    args = train_args((str(root), demo[1]), tmp_path / "run", "--no-cache-images")
    with pytest.raises(ValueError, match=r"(?s)1 of 210 image\(s\) cannot be read.*train_0007.tif"):
        train.main(args)
    assert not (tmp_path / "run").exists()


# 10: output paths that cannot be written: one line naming the path, before anything runs
def test_unwritable_outputs_are_one_line_errors(demo, eval_script, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for output, message in (
        (afile, "afile is a file, not a folder; choose another --output"),
        (afile / "run", "cannot make .*afile/run: .*afile is a file, not a folder"),
    ):
        with pytest.raises(ValueError, match=message):
            train.main(train_args(demo, output))
    real_access = os.access
    monkeypatch.setattr(
        atomic.os, "access", lambda p, m: False if "locked" in str(p) else real_access(p, m)
    )
    (tmp_path / "locked").mkdir()
    with pytest.raises(ValueError, match="cannot write in .*locked \\(read-only"):
        train.main(train_args(demo, tmp_path / "locked" / "run"))
    assert not (tmp_path / "locked" / "run").exists() and afile.read_text() == "mine"
    with pytest.raises(ValueError, match="cannot write in .*locked.*--json"):
        eval_script.main(
            [
                "--dataset",
                "demo",
                "--data-root",
                demo[0],
                "--zero-shot",
                "--clip",
                demo[1],
                "--json",
                str(tmp_path / "locked" / "m.json"),
            ]
        )


def test_second_benchmark_into_the_same_output_is_refused(demo, tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "benchmark.md").write_text("my table")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "petl_benchmark.py"),
            "--dataset",
            "demo",
            "--data-root",
            demo[0],
            "--clip",
            demo[1],
            "--output",
            str(out),
            "--methods",
            "zero_shot",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().count("\n") == 0
        and f"error: {out} already holds a benchmark" in proc.stderr
    )
    assert os.listdir(out) == ["benchmark.md"] and (out / "benchmark.md").read_text() == "my table"
    with pytest.raises(FileExistsError):  # and the same in-process, before any method runs
        benchmark.main(["--dataset", "demo", "--output", str(out), "--methods", "zero_shot"])


# 11: the hint printed with data errors reads the data the way the failing run did
def test_data_error_hint_repeats_layout_and_image_dir(make_json_dataset, tmp_path, capsys):
    make_json_dataset(str(tmp_path), name="rsitmd")
    os.rename(tmp_path / "rsitmd_images", tmp_path / "pics")
    path = tmp_path / "dataset_rsitmd.json"
    data = json.load(open(path))
    data["images"][1]["split"] = "holdout"
    json.dump(data, open(path, "w"))
    with pytest.raises(ValueError) as error:
        load_splits("rsitmd", str(tmp_path), layout="json", image_dir=str(tmp_path / "pics"))
    command = str(error.value).split("`")[1]
    assert f"--layout json --image-dir {tmp_path / 'pics'}" in command
    argv = command.split()[3:]  # after `python -m mrs_adapter.prepare`
    assert _main(argv) == 1 and "holdout" in capsys.readouterr().out  # it finds the problem again


# 13: the smaller ones
def test_non_utf8_json_is_named(make_json_dataset, tmp_path):
    make_json_dataset(str(tmp_path))
    path = tmp_path / "dataset_sydney.json"
    path.write_bytes(path.read_bytes().replace(b"caption 0", b"caption \xff"))
    with pytest.raises(ValueError, match="dataset_sydney.json: not UTF-8"):
        load_splits("sydney", str(tmp_path))


def test_non_finite_loss_message_names_last_pt_only_when_it_exists():
    window = [(3, torch.tensor(float("nan")), {"info_nce": torch.tensor(float("nan"))})]
    with pytest.raises(FloatingPointError) as first:
        train.check_finite(list(window), epoch=0)
    assert "last.pt" not in str(first.value) and "No checkpoint was written" in str(first.value)
    with pytest.raises(FloatingPointError, match=r"last.pt, end of epoch 1\) is kept"):
        train.check_finite(list(window), epoch=2)


def test_bad_flags_fail_before_anything_is_written(tmp_path):
    for flag in ("--epochs", "--batch-size", "--print-freq", "--captions-per-image"):
        with pytest.raises(ValueError, match=f"{flag} 0: expected a positive number"):
            train.main(
                [
                    "--dataset",
                    "demo",
                    "--data-root",
                    str(tmp_path / "nodata"),
                    "--output",
                    str(tmp_path / "run"),
                    flag,
                    "0",
                ]
            )
    assert os.listdir(tmp_path) == []  # no demo generated, no run folder
