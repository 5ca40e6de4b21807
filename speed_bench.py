"""Speed and memory of mrs-adapter, and the near-copy detector's thresholds and speed -> figures.

- mrs-adapter: ViT-B/32 shapes with random weights, on CPU or CUDA.
- The near-copy detector: mrs_adapter/prepare/overlap.py.

    python speed_bench.py --json bench_cpu.json                # CPU, fp32
    python speed_bench.py --device cuda --json bench_gpu.json  # CUDA, bf16 autocast, the recipe
    python speed_bench.py --only overlap-measure               # near-copy distances, 300 scenes
    python speed_bench.py --only overlap-time                  # `overlap` on 10,921 JPEGs
    python speed_bench.py --only scale [--scale-rows 10000000] # the ANN index at 1M (10M) rows
    python speed_bench.py --only tiles [--scale-rows 10000000] # the tile store at 1M (10M) rows
    python speed_bench.py --only dist                          # index under torchrun, 2 gloo

Measures (medians of interleaved repeats):
  encode_{image,text}_ratio_vs_open_clip  our encoder's throughput / open_clip's, same weights
                                          and batch
  train_step_time_ratio_vs_full           one HMMC step (both views, both towers, backward, Adam),
  train_peak_mem_ratio_vs_full            MRS-Adapter vs full fine-tuning (peak RSS on CPU, peak
                                          allocated on CUDA)
  eval_overhead_ratio                     `python eval.py` end to end on a synthetic RSITMD-sized
                                          test set (452 images, 2,260 captions, 256x256 TIFF) /
                                          encoding its tensors alone
  search_index_ratio_vs_encode            `search.py index` tiles/s / encoding the same tiles alone
                                          (48 256 px TIFFs + 2 1024 px scenes of 25 tiles; median
                                          of 9 interleaved pairs)
  search_query_ms_1m, _peak_mb_1m         one top-20 query over 1,000,000 x 512 float16 embeddings
                                          memory-mapped (2 threads; peak memory beyond the mapped
                                          file's pages)
  search_scene_peak_mb_<side>px           peak memory `index` adds for one generated PNG scene of
                                          side x side px (--search-scene-sides), beside its tile
                                          count: bounded by the image and a batch, not the tiles
  search_geo_index_ratio_vs_encode        `search.py index` of a generated 4-band uint16 GeoTIFF
                                          (tiled, LZW, UTM, nodata collar; --geo-sides, the
                                          largest) tiles/s / encoding its kept tiles alone (wall;
                                          _cpu: CPU seconds); encoder_share_<side>px: the time
                                          inside the encoder / the index run's, measured in it
  search_geo_peak_mb_<side>px             peak memory `index` adds for that scene at each side:
                                          windows, so flat in the scene's size ([geo] extra)
  search_ann_recall_at_20_<rows>,         the ANN index (search/ann.py) over --scale-rows generated
  search_ann_query_ms_<rows>,             clustered embeddings (demo/embeddings.py; rows 1m or
  search_ann_build_s_<rows>,              10m): recall@20 against brute force over 50 queries,
  search_bytes_per_tile,                  median ms of a query once embedded (speed_bench.ann_query:
  search_query_end_to_end_ms_<rows>       ann.json, stat, open, search, exact re-score; end to end:
                                          SearchIndex opened over index.json and tile columns of
                                          10,000 px sheets, search, the hits' records), build
                                          seconds, embeddings + ANN bytes on disk per tile (_index_:
                                          all the folder's)
  search_store_query_ms_<rows>,           an index of --scale-rows tiles of 10,000 px GeoTIFF
  search_store_within_s_<rows>,           sheets (index.json's per-file records, the columns;
  search_columns_bytes_per_tile,          embeddings a sparse file): a query's cost beside scoring,
  search_index_json_bytes_per_file        the index opened and 20 hits' records read (median of
                                          20; _cold_: the files out of the page cache); --within
                                          over every footprint; bytes a tile, a file
  search_dist_tiles_per_s_{1,2}proc,      `search.py index` wall tiles/s (build_index on rank 0:
  search_dist_ratio,                      plan, header reads, embedding, commit) under torchrun
  search_dist_scaling_vs_1thread          with --dist-procs gloo processes of 1 thread vs one
                                          process of as many threads (_1proc) and of 1 thread
                                          (_1proc_1thread), same --dist-images files; ratio:
                                          2proc / 1proc, scaling: 2proc / 1proc_1thread, medians
                                          of --dist-repeats interleaved rounds (on as many cores
                                          as processes the ratio shows what sharing and
                                          committing cost)
  recipe_minutes_projected (CUDA)         the published RSITMD recipe (30 epochs x 17,160 pairs,
                                          validation every epoch, test) from a measured 1-epoch
                                          `train.py` run on synthetic data

Reports, run only when named in --only (they print lines, not figures):
  overlap-measure   distances, and how many the thresholds call copies, of:
                    - every demo scene (256 and 64 px) against its JPEG (quality 75),
                      256 -> 224 -> 256 and 224 + JPEG copies;
                    - all pairs of distinct scenes
                      (same-class pairs: same ground, water, roads);
                    - all pairs of flat noise textures.
                    --overlap-images, default 300.
  overlap-time      - writes a generated "rsicd" in a temporary folder: train + test,
                      1% of the training images planted copies of test images
                      (JPEG quality 75 at 224 px from 256 px originals);
                    - runs `python -m mrs_adapter.prepare overlap` twice:
                      cold, then with the hash cache;
                    - deletes it.
                    --overlap-images, default 10,921: RSICD's.
"""
import argparse
import glob
import importlib.util
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from mrs_adapter.atomic import write_json
from mrs_adapter.clip import transform
from mrs_adapter.datasets import default_workers, to_rgb8
from mrs_adapter.demo.scenes import captions as demo_captions
from mrs_adapter.demo.scenes import render, sample_scene, write_precomp
from mrs_adapter.model import CLIP, build_model
from mrs_adapter.prepare.overlap import HAMMING_THRESHOLD, THUMB_THRESHOLD, Hashes, hash_pixels
from mrs_adapter.search.readers import has_rasterio
from mrs_adapter.tokenizer import tokenize

HERE = os.path.dirname(os.path.abspath(__file__))
VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                vision_patch_size=32, context_length=77, vocab_size=49408, transformer_width=512,
                transformer_heads=8, transformer_layers=12)


def rs_captions(n: int, seed: int = 0) -> list:
    """Demo captions: 17.5 tokens on average, at most 27 (RSITMD's: 13.7 on average, 95% within 21),
    so the text tower sees about the lengths of real remote sensing captions (a little longer)."""
    rng = random.Random(seed)
    return [demo_captions(sample_scene(rng), rng)[0] for _ in range(n)]


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def last_json_line(cmd: list) -> dict:
    """Run a child process of this script and read the figures it prints on its last line."""
    stdout = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE).stdout
    return json.loads(stdout.strip().splitlines()[-1])


# ---- encoders, training step, evaluation, recipe ----

def encode_ratios(args) -> dict:
    """Throughput ratios ours / open_clip on the same weights, interleaving the two each repeat."""
    import open_clip
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    reference = reference.eval().to(args.device)
    ours = build_model(reference.state_dict()).to(args.device)
    images = torch.randn(args.image_batch, 3, 224, 224, device=args.device)
    tokens = tokenize(rs_captions(args.text_batch)).to(args.device)
    amp = args.device.startswith("cuda")
    out = {"trimmed_text_length": int(tokens.argmax(-1).max()) + 1}
    for name, x, fns in (("image", images, (ours.encode_image, reference.encode_image)),
                         ("text", tokens, (ours.encode_text, reference.encode_text))):
        times = ([], [])
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            for fn in fns:  # warm-up (cuDNN / SDPA kernel choice, allocator)
                fn(x)
            for r in range(args.repeats):
                for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                    times[k].append(timed(lambda: fns[k](x), args.device))
        ours_t, ref_t = statistics.median(times[0]), statistics.median(times[1])
        out[f"encode_{name}_ours_per_s"] = len(x) / ours_t
        out[f"encode_{name}_open_clip_per_s"] = len(x) / ref_t
        out[f"encode_{name}_ratio_vs_open_clip"] = ref_t / ours_t
    return out


def train_step_child(method: str, device: str, steps: int) -> dict:
    """(in a fresh process) median step time and peak memory of the training step of `method`."""
    sys.argv = [sys.argv[0]]
    import train
    from mrs_adapter.methods import apply_method
    torch.manual_seed(0)
    model = apply_method(CLIP(**VIT_B_32), method, verbose=False).to(device)
    loss = dict(objective="hmmc", margin=0.2, loss_weights=(1.0, 1.0, 1.0),
                amp_dtype=torch.bfloat16 if device.startswith("cuda") else None)
    views = train.Views(model, 0.2, both_views=True).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    images = torch.randn(16, 3, 224, 224, device=device)  # the recipe's batch of 16 pairs
    batch = [(images[0].cpu(), t, 0) for t in tokenize(rs_captions(16))]
    tokens = train.collate_trimmed(batch)[1].to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        train.forward_backward(views, model, images, tokens, scaler, **loss)
        optimizer.step()

    # two warm-up steps (Adam state, allocator)
    times = [timed(step, device) for _ in range(steps + 2)][2:]
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"step_s": statistics.median(times), "peak_bytes": peak}


def train_ratios(args) -> dict:
    """MRS-Adapter vs full fine-tuning, each in its own process (peak memory is per process),
    A B A B."""
    runs = {"mrs_adapter": [], "full": []}
    for _ in range(args.rounds):
        for method in runs:
            runs[method].append(last_json_line([sys.executable, __file__, "--_child", method,
                                                "--device", args.device,
                                                "--steps", str(args.steps)]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_bytes")}
           for m, rs in runs.items()}
    ours, full = med["mrs_adapter"], med["full"]
    return {"train_step_s_mrs_adapter": ours["step_s"], "train_step_s_full": full["step_s"],
            "train_peak_bytes_mrs_adapter": ours["peak_bytes"],
            "train_peak_bytes_full": full["peak_bytes"],
            "train_step_time_ratio_vs_full": ours["step_s"] / full["step_s"],
            "train_peak_mem_ratio_vs_full": ours["peak_bytes"] / full["peak_bytes"]}


def write_tiff(path: str, rng: np.random.Generator, size: int = 256):
    """A 256x256 RGB TIFF with smooth structure (as uncompressed as RSITMD's files)."""
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(low).resize((size, size), Image.BICUBIC).save(path, format="TIFF")


def synthetic_rsitmd(root: str, n_train: int, n_test: int = 452, threads: int = 8) -> str:
    """RSITMD's precomp layout with generated images: n_train pool images, n_test test images,
    5 captions each."""
    text, images = os.path.join(root, "rsitmd_precomp"), os.path.join(root, "rsitmd_images")
    os.makedirs(text, exist_ok=True)
    os.makedirs(images, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        names = [f"{split}_{i:05d}.tif" for i in range(n)]
        write_precomp(text, split, names, rs_captions(5 * n, seed=len(split)))
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: write_tiff(os.path.join(images, names[i]),
                                               np.random.default_rng(i)), range(n)))
    return root


def random_weights(tmp: str):
    """(path, model): ViT-B/32 shapes, random weights, saved as a plain state dict in `tmp`."""
    torch.manual_seed(0)
    model = CLIP(**VIT_B_32).eval()
    path = os.path.join(tmp, "vit_b_32.pt")
    torch.save(model.state_dict(), path)
    return path, model


def loader_pairs_per_s(split) -> dict:
    """Pairs/s that one loader process serves, decoding each image or from the uint8 cache."""
    from mrs_adapter.datasets import TrainDataset
    loading = {}
    for cache in (False, True):
        dataset = TrainDataset(split, transform(224), cache=cache)
        data = torch.utils.data.DataLoader(dataset, batch_size=16)
        loading[cache] = len(split.captions) / timed(lambda: [b for b in data], "cpu")
    return {"loader_pairs_per_s_decoding": loading[False],
            "loader_pairs_per_s_cached": loading[True]}


def eval_overhead(args, tmp: str) -> dict:
    """`python eval.py` wall time on a synthetic RSITMD test set / encoding the same tensors
    alone."""
    from mrs_adapter.data import load_splits
    from mrs_adapter.datasets import eval_loaders
    from mrs_adapter.metrics import encode_dataset
    root = synthetic_rsitmd(os.path.join(tmp, "eval"), n_train=5)
    weights, model = random_weights(tmp)
    cmd = [sys.executable, os.path.join(HERE, "eval.py"), "--dataset", "rsitmd",
           "--data-root", root, "--zero-shot", "--clip", weights, "--device", args.device,
           "--json", os.path.join(tmp, "eval.json")]
    split = load_splits("rsitmd", root, verbose=False)["test"]
    images, captions = eval_loaders(split, transform(224), 77, 64)
    images = [b.to(args.device) for b in images]  # the same tensors, decoded and moved beforehand
    captions = [b.to(args.device) for b in captions]
    model = model.to(args.device)
    encode_dataset(model, images[:1], captions[:1], args.device)  # warm-up
    runs = {"end_to_end": [], "encode_only": []}
    # interleaved, medians: one run of each is at the mercy of the machine
    for _ in range(args.eval_repeats):
        runs["end_to_end"].append(
            timed(lambda: subprocess.run(cmd, check=True, capture_output=True), args.device))
        runs["encode_only"].append(
            timed(lambda: encode_dataset(model, images, captions, args.device), args.device))
    end_to_end = statistics.median(runs["end_to_end"])
    encode_only = statistics.median(runs["encode_only"])
    return {"eval_end_to_end_s": end_to_end, "eval_encode_only_s": encode_only,
            "eval_overhead_ratio": end_to_end / encode_only, **loader_pairs_per_s(split)}


def recipe_projection(args, tmp: str) -> dict:
    """Minutes of the full RSITMD recipe: one measured epoch of `python train.py` on synthetic
    data."""
    root = synthetic_rsitmd(os.path.join(tmp, "recipe"), n_train=4291, threads=16)
    weights, _ = random_weights(tmp)
    run = os.path.join(tmp, "run")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--dataset", "rsitmd",
           "--data-root", root, "--clip", weights, "--epochs", "1", "--output", run,
           "--device", args.device, "--print-freq", "200"]
    wall = timed(lambda: subprocess.run(cmd, check=True), args.device)
    with open(os.path.join(run, "seed2", "log.jsonl")) as f:
        epoch = [json.loads(line) for line in f if '"val"' in line][-1]
    per_epoch = epoch["train_seconds"] + epoch["val_seconds"]
    return {"recipe_one_epoch_run_s": wall, "recipe_epoch_train_s": epoch["train_seconds"],
            "recipe_epoch_val_s": epoch["val_seconds"], "recipe_pairs_per_s": epoch["pairs_per_s"],
            "recipe_minutes_projected": (wall + 29 * per_epoch) / 60}


# ---- search.py: indexing and querying ----

def search_query_child(path: str, repeats: int = 5) -> dict:
    """(in a fresh process, 2 threads) ms of one top-20 query over the memory-mapped float16 file
    `path`, and the peak memory it adds beyond the mapped file's pages (page cache, shared)."""
    from mrs_adapter.search.query import top_k

    torch.set_num_threads(2)
    embeddings = np.load(path, mmap_mode="r")
    query = np.random.default_rng(1).standard_normal(embeddings.shape[1]).astype(np.float32)
    query /= np.linalg.norm(query)
    rss, file_pages = status("VmRSS"), status("RssFile")
    cold = timed(lambda: top_k(embeddings, query, 20), "cpu")  # pages may still be in the cache
    warm, cpu = [], []
    for _ in range(repeats):  # wall time, and CPU time of both threads (what a busy machine hides)
        start = time.process_time()
        warm.append(timed(lambda: top_k(embeddings, query, 20), "cpu"))
        cpu.append(time.process_time() - start)
    extra = status("VmHWM") - rss - (status("RssFile") - file_pages)
    return {"first_s": cold, "median_s": statistics.median(warm), "cpu_s": statistics.median(cpu),
            "peak_extra_bytes": extra}


def search_index_figures(args, tmp: str, rng: np.random.Generator):
    """(figures, model): `index` tiles/s / the encoder's tiles/s on the same tiles (RSITMD-like
    256 px TIFFs and two 1024 px scenes of 25 tiles)."""
    from mrs_adapter.datasets import split_at_to_tensor
    from mrs_adapter.search import index as search
    images = os.path.join(tmp, "search_images")
    os.makedirs(images)
    for i in range(args.search_images):
        write_tiff(os.path.join(images, f"{i:04d}.tif"), rng)
    for i in range(2):
        write_tiff(os.path.join(images, f"scene_{i}.tif"), rng, size=1024)
    weights, model = random_weights(tmp)
    model, preprocess = model.to(args.device), transform(224)
    identity = {"backbone": weights, "backbone_sha256": "bench", "activation": "quickgelu",
                "method": "zero_shot", "checkpoint": None, "checkpoint_sha256": None}
    decode, finish = split_at_to_tensor(preprocess)
    start = time.perf_counter()
    tiles = torch.cat([search.read_tiles(os.path.join(images, rel), decode, 256, 192)[0]
                       for rel in search.list_images(images)])
    decode_s = time.perf_counter() - start  # every image read, tiled, resized and cropped
    x = finish(tiles)  # the tensors `index` encodes, decoded beforehand
    workers = default_workers(args.device) if args.search_workers is None \
        else args.search_workers

    def encode_only():
        for i in range(0, len(x), 64):
            search.encode_images(model, x[i:i + 64], args.device)

    encode_only()  # warm-up
    runs = {"index": [], "encode": []}
    for r in range(args.search_repeats):  # interleaved pairs: a slow spell hits both of a pair
        out = os.path.join(tmp, f"search_index_{r}")
        runs["index"].append(search.build_index(images, out, model, preprocess, identity,
                                                workers=workers, device=args.device,
                                                log=lambda *a: None)["seconds"])
        runs["encode"].append(timed(encode_only, args.device))
    index_s, encode_s = statistics.median(runs["index"]), statistics.median(runs["encode"])
    ratios = [e / i for e, i in zip(runs["encode"], runs["index"])]
    return {"search_decode_s": decode_s, "search_index_s": index_s,
            "search_index_tiles_per_s": len(x) / index_s,
            "search_encode_tiles_per_s": len(x) / encode_s,
            "search_index_ratio_pairs": [round(r, 3) for r in ratios],
            "search_index_ratio_vs_encode": statistics.median(ratios)}, model


def search_query_figures(tmp: str, model: torch.nn.Module, rng: np.random.Generator) -> dict:
    """One query over 1,000,000 stored embeddings (in a fresh process), and encoding its text."""
    path = os.path.join(tmp, "search_1m.npy")  # 1,000,000 x 512 float16: 1 GB
    emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1_000_000, 512))
    for start in range(0, len(emb), 65536):
        block = rng.standard_normal((min(65536, len(emb) - start), 512), dtype=np.float32)
        emb[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    emb.flush()
    del emb
    child = last_json_line([sys.executable, __file__, "--_search_query", path])
    os.remove(path)
    tokens = tokenize(["a baseball field beside a highway"])
    with torch.no_grad():
        model.cpu().encode_text(tokens)  # warm-up
        text_s = statistics.median(timed(lambda: model.encode_text(tokens), "cpu")
                                   for _ in range(5))
    return dict(search_query_ms_1m=1000 * child["median_s"],
                search_query_first_ms_1m=1000 * child["first_s"],
                search_query_cpu_ms_1m=1000 * child["cpu_s"],
                search_query_peak_mb_1m=child["peak_extra_bytes"] / 2 ** 20,
                search_text_encode_ms=1000 * text_s)


def status(key: str) -> int:
    """kB -> bytes of `key` (VmRSS, VmHWM, ...) from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def search_scene_child(folder: str, device: str) -> dict:
    """(in a fresh process) `index` of the one scene in `folder`: its tiles, and the peak memory
    (VmHWM) beyond what the process held with the model loaded."""
    from mrs_adapter.search import index as search

    torch.manual_seed(0)
    model = CLIP(**VIT_B_32).eval().to(device)
    identity = {"backbone": "random", "backbone_sha256": "bench", "activation": "quickgelu",
                "method": "zero_shot", "checkpoint": None, "checkpoint_sha256": None}
    with torch.no_grad():  # the encoder's own working memory, before the baseline
        search.encode_images(model, torch.zeros(64, 3, 224, 224), device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux 4.0+): the warm-up's transient peak is not counted
    before = status("VmRSS")
    result = search.build_index(folder, folder + "_index", model, transform(224), identity,
                                device=device, log=lambda *a: None)
    return {"tiles": result["tiles"], "peak_extra_bytes": status("VmHWM") - before}


def search_scene_figures(args, tmp: str, rng: np.random.Generator) -> dict:
    """Peak memory of indexing one large scene, for each of --search-scene-sides."""
    out = {}
    for side in args.search_scene_sides:
        folder = os.path.join(tmp, f"scene_{side}")
        os.makedirs(folder)
        low = rng.integers(0, 256, (side // 64, side // 64, 3), dtype=np.uint8)
        Image.fromarray(low).resize((side, side), Image.BICUBIC).save(
            os.path.join(folder, "scene.png"))
        child = last_json_line([sys.executable, __file__, "--_search_scene", folder,
                                "--device", args.device])
        out[f"search_scene_tiles_{side}px"] = child["tiles"]
        out[f"search_scene_peak_mb_{side}px"] = child["peak_extra_bytes"] / 2 ** 20
    return out


def search_figures(args, tmp: str) -> dict:
    """search.py: `index` against encoding alone, one query over 1,000,000 embeddings, and the
    memory of indexing one large scene."""
    rng = np.random.default_rng(0)  # one stream: the images first, then the stored embeddings
    out, model = search_index_figures(args, tmp, rng)
    return dict(out, **search_query_figures(tmp, model, rng),
                **search_scene_figures(args, tmp, rng))


# ---- search over a GeoTIFF scene (mrs_adapter/search/raster.py, tiling.py) ----

def write_geotiff_scene(path: str, side: int, rng: np.random.Generator):
    """A side x side px GeoTIFF as products come: 4 bands of uint16, tiled 512 px, LZW, UTM 33N
    at 1 m, a nodata (0) collar on its left 5%; blocky land cover (64 px cells) plus noise,
    written a strip of 512 rows at a time (never the whole scene in memory)."""
    import rasterio
    from rasterio.transform import Affine
    cells = rng.integers(300, 3000, (4, side // 64 + 1, side // 64 + 1)).astype(np.uint16)
    profile = dict(driver="GTiff", width=side, height=side, count=4, dtype="uint16", nodata=0,
                   crs="EPSG:32633", transform=Affine(1.0, 0, 500000.0, 0, -1.0, 4500000.0),
                   tiled=True, blockxsize=512, blockysize=512, compress="lzw", BIGTIFF="YES")
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, side, 512):
            rows = min(512, side - top)
            y = (np.arange(top, top + rows) // 64)[:, None]
            x = (np.arange(side) // 64)[None, :]
            strip = cells[:, y, x] + rng.integers(0, 200, (4, rows, side), dtype=np.uint16)
            strip[:, :, :side // 20] = 0
            dst.write(strip, window=rasterio.windows.Window(0, top, side, rows))


def search_geo_child(folder: str, device: str, encode_alone: bool) -> dict:
    """(in a fresh process) `index` of the one GeoTIFF in `folder` with ViT-B/32 shapes: tiles,
    seconds and the peak memory (VmHWM) beyond the process with the model loaded; then, if
    `encode_alone`, the same kept tiles read beforehand and encoded alone (normalise + encoder, a
    batch of 64 at a time, as `index` does)."""
    from mrs_adapter.datasets import split_at_to_tensor
    from mrs_adapter.search import index as search
    from mrs_adapter.search.tiling import read_tiles

    torch.manual_seed(0)
    model = CLIP(**VIT_B_32).eval().to(device)
    identity = {"backbone": "random", "backbone_sha256": "bench", "activation": "quickgelu",
                "method": "zero_shot", "checkpoint": None, "checkpoint_sha256": None}
    with torch.no_grad():
        search.encode_images(model, torch.zeros(64, 3, 224, 224), device)
    in_encoder = [0.0, 0.0]  # wall s, CPU s spent inside the encoder while indexing
    encode_images = search.encode_images

    def counted(*args):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return encode_images(*args)
        finally:
            in_encoder[0] += time.perf_counter() - wall
            in_encoder[1] += time.process_time() - cpu
    search.encode_images = counted
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the warm-up's transient peak is not counted
    before, cpu = status("VmRSS"), time.process_time()
    result = search.build_index(folder, folder + "_index", model, transform(224), identity,
                                device=device, log=lambda *a: None)
    out = {"tiles": result["tiles"], "index_s": result["seconds"],
           "index_cpu_s": time.process_time() - cpu, "in_encoder_s": in_encoder[0],
           "in_encoder_cpu_s": in_encoder[1], "peak_extra_bytes": status("VmHWM") - before}
    search.encode_images = encode_images
    if encode_alone:
        decode, finish = split_at_to_tensor(transform(224))
        scene = os.path.join(folder, os.listdir(folder)[0])
        tiles, _ = read_tiles(scene, decode, 256, 192)  # uint8, (T, 3, 224, 224)

        def encode():
            for i in range(0, len(tiles), 64):
                search.encode_images(model, finish(tiles[i:i + 64]), device)
        cpu = time.process_time()
        out["encode_s"] = timed(encode, device)
        out["encode_cpu_s"] = time.process_time() - cpu
        out["encoded_tiles"] = len(tiles)
    return out


def search_geo_figures(args, tmp: str) -> dict:
    """`index` over generated GeoTIFF scenes (--geo-sides): tiles/s against encoding the same
    tiles alone on the largest, and peak memory growth at every side."""
    rng, out = np.random.default_rng(0), {}
    for side in args.geo_sides:
        folder = os.path.join(tmp, f"geo_{side}")
        os.makedirs(folder)
        start = time.time()
        write_geotiff_scene(os.path.join(folder, "scene.tif"), side, rng)
        print(f"  wrote a {side} px GeoTIFF in {time.time() - start:.0f}s", file=sys.stderr)
        largest = side == max(args.geo_sides)
        child = last_json_line([sys.executable, __file__, "--_search_geo", folder,
                                "--device", args.device] + (["--_encode_alone"] * largest))
        out[f"search_geo_tiles_{side}px"] = child["tiles"]
        out[f"search_geo_peak_mb_{side}px"] = child["peak_extra_bytes"] / 2 ** 20
        out[f"search_geo_index_tiles_per_s_{side}px"] = child["tiles"] / child["index_s"]
        # the encoder's share of the index run, measured inside it (the same load throughout)
        out[f"search_geo_encoder_share_{side}px"] = child["in_encoder_s"] / child["index_s"]
        if largest:
            assert child["encoded_tiles"] == child["tiles"]
            out["search_geo_encode_tiles_per_s"] = child["tiles"] / child["encode_s"]
            out["search_geo_index_ratio_vs_encode"] = child["encode_s"] / child["index_s"]
            # CPU seconds: less moved by other processes on a shared machine than wall time
            out["search_geo_index_ratio_vs_encode_cpu"] = (child["encode_cpu_s"]
                                                           / child["index_cpu_s"])
        os.remove(os.path.join(folder, "scene.tif"))
    return out


# ---- search at archive scale: the ANN index (mrs_adapter/search/ann.py) ----

def rows_suffix(n: int) -> str:
    """1000000 -> "1m", 10000000 -> "10m", 250000 -> "250k"."""
    return f"{n // 10 ** 6}m" if n % 10 ** 6 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def ann_query(folder: str, parts: list, query: np.ndarray, k: int = 20):
    """What `search.py query` does once the model has embedded the query: read ann.json, check
    the parts it covers (stat), open the ANN (IVF lists memory-mapped), map the embeddings,
    search, re-score the candidates exactly. Hits' paths and printing are not included."""
    from mrs_adapter.search import ann
    index, why = ann.open_ann(folder, parts)
    if index is None:
        raise RuntimeError(why)
    return ann.search(index, ann.rows_getter(parts), query, k)


def scale_figures(args, tmp: str) -> dict:
    """--scale-rows clustered float16 embeddings (demo/embeddings.py: 1,000 weighted centres +
    noise of norm 0.5, 512 dims): the ANN's build time, its recall@20 against query.top_k over
    50 queries drawn as the rows are, the median ms of `ann_query` and of a query end to end
    once embedded (the index opened, index.json and the tile columns of 10,000 px sheets as
    write_archive_index lays them, the ANN, the 20 hits' records), and the bytes a tile takes
    on disk (embeddings + ANN). 1M rows: 1 GB in `tmp`; 10M: 10 GB."""
    from mrs_adapter.demo.embeddings import queries, write_embeddings
    from mrs_adapter.search import ann
    from mrs_adapter.search.query import SearchIndex, top_k
    n, dim, s = args.scale_rows, 512, rows_suffix(args.scale_rows)
    folder = os.path.join(tmp, "scale_index")
    os.makedirs(folder)
    start = time.time()
    npy = write_embeddings(os.path.join(folder, "embeddings-000001.npy"), n, dim)
    print(f"[scale: {n:,} rows generated in {time.time() - start:.0f}s]", file=sys.stderr)
    write_archive_index(folder, n, None)  # index.json and the tile columns around the rows
    parts = SearchIndex(folder).parts()
    assert parts == [(npy, n)]
    info = ann.build(folder, parts, log=lambda line: print(line, file=sys.stderr, flush=True))
    emb, qs = np.load(npy, mmap_mode="r"), queries(50, dim)
    exact, brute_ms = [], []
    for q in qs:  # brute force first: it reads every row, the ANN queries then run warm
        start = time.perf_counter()
        exact.append(top_k(emb, q, 20)[0])
        brute_ms.append(1000 * (time.perf_counter() - start))
    recall, ms, end_to_end = [], [], []
    for q, truth in zip(qs, exact):
        start = time.perf_counter()
        rows = ann_query(folder, parts, q)[0]
        ms.append(1000 * (time.perf_counter() - start))
        recall.append(len(np.intersect1d(rows, truth)) / 20)
        start = time.perf_counter()  # as `search.py query` once the query is embedded
        index = SearchIndex(folder)
        hits = index.search(q, 20)
        end_to_end.append(1000 * (time.perf_counter() - start))
        assert index.how.startswith("ANN") and [index.row_of(h["path"], h["box"])
                                                for h in hits] == rows.tolist()
    on_disk = os.path.getsize(npy) + info["bytes"] + os.path.getsize(
        os.path.join(folder, ann.ANN_JSON))
    return {f"search_ann_kind_{s}": f"{info['kind']} {info['params']}",
            f"search_ann_recall_at_20_{s}": float(np.mean(recall)),
            f"search_ann_recall_at_20_min_{s}": float(np.min(recall)),
            f"search_ann_query_ms_{s}": statistics.median(ms),
            f"search_query_end_to_end_ms_{s}": statistics.median(end_to_end),
            f"search_brute_query_ms_{s}": statistics.median(brute_ms),
            f"search_ann_build_s_{s}": info["build_s"],
            "search_bytes_per_tile": on_disk / n,
            "search_index_bytes_per_tile": sum(  # + the tile columns and index.json
                os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)) / n}


# ---- search at archive scale: the tile store (mrs_adapter/search/tile_store.py) ----

SCENE_SIDE = 10_000  # px: the archive's GeoTIFF scenes (at 1 m, 10 km sheets)


def write_archive_index(folder: str, n: int, record: Optional[dict]) -> int:
    """An index folder of `n` tiles laid out as `index` writes one over GeoTIFF scenes of
    SCENE_SIDE px (256 px tiles every 192: 2,704 a scene; per-file entries, and `record`, a real
    scene's raster record, as each file's in the raster records file; None: none), the columns
    written; the embeddings are folder/embeddings-000001.npy where it exists (the scale
    section's), else a sparse file (its pages never written, so never read). Returns the number
    of files."""
    from mrs_adapter.search import store, tile_store
    from mrs_adapter.search.grid import tile_boxes
    grid = np.array(tile_boxes(SCENE_SIDE, SCENE_SIDE, 256, 192), np.int32)
    per_scene, files = len(grid), {}
    npy = os.path.join(folder, "embeddings-000001.npy")
    if not os.path.exists(npy):
        np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(n, 512)).flush()

    def scene_columns(k: int, count: int) -> dict:  # scene k: a 10 km square on a 1 m grid
        x0, y0 = 400_000 + 10_000 * (k % 50), 4_500_000 - 10_000 * (k // 50)
        box = grid[:count].astype(np.float64)
        bounds = np.stack([x0 + box[:, 0], y0 - box[:, 3], x0 + box[:, 2], y0 - box[:, 1]], 1)
        lon, lat = 9 + (bounds[:, [0, 2]] - 400_000) / 84_000, 40.6 + (bounds[:, [1, 3]]
                                                                        - 4_500_000) / 111_000
        ring = np.stack([lon[:, [0, 1, 1, 0, 0]], lat[:, [0, 0, 1, 1, 0]]], -1)
        return {"box": grid[:count], "bounds": bounds, "footprint": ring}
    counts = [min(per_scene, n - first) for first in range(0, n, per_scene)]
    for name in tile_store.names(True):
        tile_store.write_column(tile_store.column_path(npy, name), name,
                                (scene_columns(k, c)[name] for k, c in enumerate(counts)), n)
    for k, count in enumerate(counts):
        files[f"sheets/{k // 1000:03d}/sheet_{k:06d}.tif"] = {
            "size": 1_200_000_000, "mtime_ns": 1_700_000_000_000_000_000 + k,
            "first": k * per_scene, "tiles": count, "reader": "rasterio",
            "crs": "EPSG:32632", "dropped": per_scene - count}
    if record is not None:  # as commit writes them
        write_json(tile_store.records_path(npy), {rel: record for rel in files})
    manifest = dict(store.new_manifest({"backbone": "ViT-B/32", "backbone_sha256": "0" * 64,
                                        "activation": "quickgelu", "method": "zero_shot",
                                        "checkpoint": None, "checkpoint_sha256": None},
                                       folder, 256, 192, store.DEFAULT_RASTER),
                    dim=512, rows=n, embeddings=os.path.basename(npy), generation=1,
                    columns=tile_store.names(True), rasters=record is not None, files=files)
    write_json(os.path.join(folder, "index.json"), manifest)
    return len(files)


def evict(paths):
    """Drop the files' pages from the page cache (Linux; a no-op elsewhere)."""
    for path in paths:
        if hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tiles_figures(args, tmp: str) -> dict:
    """--scale-rows tiles of 10,000 px GeoTIFF sheets (write_archive_index; the per-file record
    is the demo GeoTIFF's, as `index` records it): what a query costs beside scoring rows, the
    index opened (index.json read and checked, embeddings and columns mapped) and its 20 hits'
    records read (median of 20 queries, each opening the index anew, as `search.py query`
    does; then 20 with the folder's files evicted from the page cache first, _cold_); --within
    over every row's footprint; bytes a tile of the columns, of index.json."""
    from mrs_adapter.demo.geotiff import write_mosaic
    from mrs_adapter.search.query import SearchIndex
    from mrs_adapter.search.raster import open_scene
    n, s = args.scale_rows, rows_suffix(args.scale_rows)
    write_mosaic(os.path.join(tmp, "sheet.tif"), 2, 2)
    record = open_scene(os.path.join(tmp, "sheet.tif"), None, None, None, 0.5).record()
    folder = os.path.join(tmp, "tiles_index")
    os.makedirs(folder)
    start = time.time()
    n_files = write_archive_index(folder, n, record)
    print(f"[tiles: {n:,} tiles of {n_files:,} sheets written in {time.time() - start:.0f}s]",
          file=sys.stderr)
    rng, ms = np.random.default_rng(0), {"warm": [], "cold": []}
    for cache in ("warm", "cold"):
        for _ in range(20):
            rows = rng.choice(n, 20, replace=False)
            if cache == "cold":  # out of the page cache: as the first query after a reboot
                evict(glob.glob(os.path.join(folder, "*")))
            start = time.perf_counter()
            index = SearchIndex(folder)
            hits = index.hits(rows, np.zeros(len(rows)))
            ms[cache].append(1000 * (time.perf_counter() - start))
            assert all(h["footprint"] is not None for h in hits)
    start = time.perf_counter()
    kept = index.footprint_mask((9.5, 40.0, 10.0, 40.5))
    within_s = time.perf_counter() - start
    columns = sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.*.npy")))
    index_json = os.path.getsize(os.path.join(folder, "index.json"))
    rasters = os.path.getsize(glob.glob(os.path.join(folder, "*.rasters.json"))[0])
    return {f"search_store_query_ms_{s}": statistics.median(ms["warm"]),
            f"search_store_query_cold_ms_{s}": statistics.median(ms["cold"]),
            f"search_store_within_s_{s}": within_s,
            f"search_store_within_kept_{s}": int(kept.sum()),
            "search_columns_bytes_per_tile": columns / n,
            f"search_index_json_bytes_{s}": index_json,
            "search_index_json_bytes_per_file": index_json / n_files,
            "search_raster_records_bytes_per_file": rasters / n_files}


# ---- search at archive scale: `index` shared by torchrun's processes (search/shard.py) ----

def search_dist_child(folder: str, device: str) -> dict:
    """(in a fresh process, or each of torchrun's) `index` of `folder`/images into a new index:
    its tiles and the wall seconds of build_index on rank 0, from when every process has its
    model (plan, header reads, embedding, the wait for the slowest, the commit)."""
    from mrs_adapter.run import distributed
    from mrs_adapter.search import index as search
    device = distributed.start(device, None).device
    torch.manual_seed(0)  # the same random ViT-B/32 in every process
    model = CLIP(**VIT_B_32).eval().to(device)
    identity = {"backbone": "random", "backbone_sha256": "bench", "activation": "quickgelu",
                "method": "zero_shot", "checkpoint": None, "checkpoint_sha256": None}
    out = os.path.join(folder, f"index_{os.getpid()}")
    distributed.together(lambda: None)  # every process ready: the clock starts alike
    start = time.perf_counter()
    result = search.build_index(os.path.join(folder, "images"), out, model, transform(224),
                                identity, device=device, log=lambda *a: None)
    seconds = time.perf_counter() - start
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return {"tiles": result["tiles"], "seconds": seconds} if distributed.rank() == 0 else {}


def dist_figures(args, tmp: str) -> dict:
    """`index` under torchrun with --dist-procs gloo processes (1 thread each) against one process
    with as many threads, and one of 1 thread, on the same files (--dist-images 256 px TIFFs +
    two 1024 px scenes of 25 tiles: the shares must balance pixels); tiles/s of each,
    interleaved --dist-repeats rounds, medians. On as many cores as processes the processes
    share the cores one process's threads would use: the ratio shows what sharing and one
    commit cost (or save: no threads waiting on each other); against 1 thread, how it scales."""
    folder = os.path.join(tmp, "dist")
    images = os.path.join(folder, "images")
    os.makedirs(images)
    rng = np.random.default_rng(0)
    for i in range(args.dist_images):
        write_tiff(os.path.join(images, f"{i:04d}.tif"), rng)
    for i in range(2):
        write_tiff(os.path.join(images, f"scene_{i}.tif"), rng, size=1024)
    n = args.dist_procs
    child = [__file__, "--_search_dist", folder, "--device", args.device]
    variants = {  # name: (command, OMP_NUM_THREADS)
        "1proc": ([sys.executable, *child], n),
        f"{n}proc": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc_per_node={n}", *child], 1),
        "1proc_1thread": ([sys.executable, *child], 1)}
    rates = {name: [] for name in variants}
    tiles = set()
    for _ in range(args.dist_repeats):  # interleaved: a slow spell hits every variant
        for name, (command, threads) in variants.items():
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            run = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                            cwd=HERE, env=env).stdout.strip().splitlines()[-1])
            rates[name].append(run["tiles"] / run["seconds"])
            tiles.add(run["tiles"])
    assert len(tiles) == 1, f"the variants indexed different tiles: {tiles}"
    ratios = [s / o for s, o in zip(rates[f"{n}proc"], rates["1proc"])]
    scaling = [s / o for s, o in zip(rates[f"{n}proc"], rates["1proc_1thread"])]
    return {"search_dist_tiles": tiles.pop(),
            **{f"search_dist_tiles_per_s_{name}": statistics.median(r)
               for name, r in rates.items()},
            "search_dist_ratio_pairs": [round(r, 3) for r in ratios],
            "search_dist_ratio": statistics.median(ratios),
            "search_dist_scaling_vs_1thread": statistics.median(scaling)}


# ---- near copies (mrs_adapter/prepare/overlap.py): how the thresholds were chosen, its speed ----

def jpeg(image: Image.Image, quality: int = 75) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def copies(image: Image.Image) -> Dict[str, Image.Image]:
    """The near copies the hash must survive: JPEG quality 75, 256 -> 224 -> 256, and 224 + JPEG."""
    w, h = image.size
    small = image.resize((w * 7 // 8, h * 7 // 8), Image.Resampling.BICUBIC)  # 256 -> 224
    return {"jpeg75": jpeg(image), "resized": small.resize((w, h), Image.Resampling.BICUBIC),
            "resized_jpeg75": jpeg(small)}


def hashes_of(images: Sequence[Image.Image]) -> Hashes:
    return Hashes.of([hash_pixels(to_rgb8(image)) for image in images])  # as hash_image sees them


def distances(a: Hashes, b: Hashes, i: np.ndarray, j: np.ndarray):
    """(Hamming distances, thumbnail distances) of the pairs a[i], b[j]."""
    hamming = np.bitwise_count(a.phash[i] ^ b.phash[j])
    thumb = np.abs(a.thumb[i].astype(np.int16) - b.thumb[j].astype(np.int16)).mean(1)
    return hamming, thumb


def flagged(hamming: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    return (hamming <= HAMMING_THRESHOLD) & (thumb <= THUMB_THRESHOLD)


def copy_distances(base: Hashes, images: list) -> Dict:
    """How far each kind of near copy lies from its original, and how many the thresholds find."""
    out, n = {}, len(images)
    own = np.arange(n)
    variants = [copies(x) for x in images]
    for kind in ("jpeg75", "resized", "resized_jpeg75"):
        hamming, thumb = distances(base, hashes_of([v[kind] for v in variants]), own, own)
        out[f"copies {kind}"] = {"hamming max": int(hamming.max()),
                                 "hamming p99": float(np.percentile(hamming, 99)),
                                 "thumb max": round(float(thumb.max()), 2),
                                 "detected": f"{int(flagged(hamming, thumb).sum())}/{n}"}
    return out


def measure(n: int, size: int, seed: int = 0) -> Dict:
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [render(s, size, rng) for s in scenes]
    base = hashes_of(images)
    out = copy_distances(base, images)
    i, j = np.triu_indices(n, 1)
    hamming, thumb = distances(base, base, i, j)
    klass = [(s["ground"], s["water"], s["road"]) for s in scenes]
    same = np.array([klass[a] == klass[b] for a, b in zip(i, j)])
    for name, mask in (("distinct, all pairs", np.ones_like(same)), ("distinct, same class", same)):
        close = mask & (hamming <= HAMMING_THRESHOLD)
        out[name] = {"pairs": int(mask.sum()), "hamming min": int(hamming[mask].min()),
                     "hamming p1": float(np.percentile(hamming[mask], 1)),
                     f"thumb min where hamming <= {HAMMING_THRESHOLD}":
                         round(float(thumb[close].min()), 2) if close.any() else None,
                     "false positives": int((flagged(hamming, thumb) & mask).sum())}
    noise = np.random.default_rng(seed)
    # one colour each: the thumbnails agree, only the pHash can tell them apart
    flat = [np.clip(noise.normal(128, 8, (size, size, 3)), 0, 255) for _ in range(n)]
    textures = hashes_of([Image.fromarray(x.astype(np.uint8)) for x in flat])
    hamming, thumb = distances(textures, textures, i, j)
    out["distinct noise textures"] = {"pairs": len(i), "hamming min": int(hamming.min()),
                                      "false positives": int(flagged(hamming, thumb).sum())}
    return out


def overlap_measure(args) -> List[str]:
    """Distances of true copies and of distinct demo scenes, at 256 and 64 px."""
    n = args.overlap_images or 300
    report = [f"thresholds: Hamming <= {HAMMING_THRESHOLD} of 63 bits, "
              f"thumbnail <= {THUMB_THRESHOLD}"]
    for size in (256, 64):
        report.append(f"{n} demo scenes at {size}x{size} px:")
        for name, figures in measure(n, size).items():
            report.append(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    return report


def write_rsicd_like(root: str, n: int, seed: int = 0, threads: int = 2) -> int:
    """`n` 224x224 JPEGs in the precomp layout as `rsicd` (10% test); 1% of the training images
    are copies of test images (a 256 px scene, resized to 224 and saved at quality 75).
    Returns the number of planted copies."""
    rng = random.Random(seed)
    n_test = n // 10
    n_copies = (n - n_test) // 100
    scenes = [sample_scene(rng) for _ in range(n - n_copies)]
    seeds = [rng.getrandbits(32) for _ in scenes]
    folder = os.path.join(root, "rsicd_images")
    os.makedirs(folder)
    os.makedirs(os.path.join(root, "rsicd_precomp"))

    def write(k: int):
        image = render(scenes[k], 256, random.Random(seeds[k]))
        image = image.resize((224, 224), Image.Resampling.BICUBIC)
        image.save(os.path.join(folder, f"{k:05d}.jpg"), quality=90)
        if k < n_copies:  # test image k's copy, re-encoded at quality 75 under another name
            jpeg(image).save(os.path.join(folder, f"copy_{k:05d}.jpg"), quality=95)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(len(scenes))))
    planted = [f"copy_{k:05d}.jpg" for k in range(n_copies)]
    names = {"test": [f"{k:05d}.jpg" for k in range(n_test)],
             "train": [f"{k:05d}.jpg" for k in range(n_test, len(scenes))] + planted}
    for split, files in names.items():
        caps = [c for k, _ in enumerate(files) for c in demo_captions(sample_scene(rng), rng)]
        write_precomp(os.path.join(root, "rsicd_precomp"), split, files, caps)
    return n_copies


def overlap_time(args) -> List[str]:
    """`python -m mrs_adapter.prepare overlap` on a generated RSICD-sized set, cold and cached."""
    n, threads, report = args.overlap_images or 10921, args.overlap_threads, []
    with tempfile.TemporaryDirectory(prefix="overlap-bench-") as root:
        start = time.time()
        planted = write_rsicd_like(root, n, threads=threads)
        seconds = time.time() - start
        report.append(f"generated {n} images ({planted} planted copies) in {seconds:.0f}s")
        command = [sys.executable, "-m", "mrs_adapter.prepare", "overlap", "--datasets", "rsicd",
                   "--data-root", root, "--csv", os.path.join(root, "overlap.csv"),
                   "--threads", str(threads)]
        for run in ("cold", "cached"):
            start = time.time()
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            report.append(f"{run}: {time.time() - start:.1f}s wall")
            report += [line for line in out.splitlines() if line.startswith("rsicd/")]
        with open(os.path.join(root, "overlap.csv")) as f:
            rows = [line.split(",") for line in f.read().splitlines()[1:]]
        found = {(a[2], a[5]) for a in rows if a[6] in ("exact", "near")}
        want = {(f"{k:05d}.jpg", f"copy_{k:05d}.jpg") for k in range(planted)}
        hits = sum(pair in found or pair[::-1] in found for pair in want)
        report.append(f"planted copies found: {hits}/{planted}; "
                      f"other image pairs flagged: {len(found) - hits}")
    return report


# ---- command line ----

# figures: {name: value}, printed as one table (and written to --json)
FIGURES = {"encode": encode_ratios, "train": train_ratios, "eval": eval_overhead,
           "recipe": recipe_projection, "search": search_figures, "geo": search_geo_figures,
           "scale": scale_figures, "tiles": tiles_figures, "dist": dist_figures}
# reports: lines printed as they are; only run when named in --only
REPORTS = {"overlap-measure": overlap_measure, "overlap-time": overlap_time}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (medians)")
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--text-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per process")
    p.add_argument("--eval-repeats", type=int, default=3,
                   help="interleaved eval.py / encode-only runs (medians)")
    p.add_argument("--rounds", type=int, default=2,
                   help="A B rounds of the training-step processes")
    p.add_argument("--search-workers", type=int,
                   help="decoding processes of the timed `search.py index` (default: search.py's)")
    p.add_argument("--search-repeats", type=int, default=9,
                   help="interleaved `search.py index` / encode-only pairs (median ratio)")
    p.add_argument("--search-images", type=int, default=48,
                   help="256 px TIFFs indexed by the search bench")
    p.add_argument("--search-scene-sides", type=int, nargs="*", default=[2048, 4096],
                   help="sides, px, of the generated PNG scenes whose indexing memory is measured")
    p.add_argument("--geo-sides", type=int, nargs="+", default=[10000, 20000],
                   help="sides, px, of the generated 4-band uint16 GeoTIFFs (geo section)")
    p.add_argument("--overlap-images", type=int,
                   help="images (overlap-measure: 300; overlap-time: 10921, RSICD's count)")
    p.add_argument("--overlap-threads", type=int, default=2)
    p.add_argument("--scale-rows", type=int, default=1_000_000,
                   help="generated embeddings of the scale section (10M: 10 GB in the temp folder)")
    p.add_argument("--dist-procs", type=int, default=2,
                   help="torchrun processes of the dist section (gloo on the CPU)")
    p.add_argument("--dist-repeats", type=int, default=3,
                   help="interleaved rounds of the dist section's `index` runs (medians)")
    p.add_argument("--dist-images", type=int, default=24,
                   help="256 px TIFFs indexed by the dist section, beside two 1024 px scenes")
    sections = p.add_mutually_exclusive_group()
    sections.add_argument("--skip", nargs="*", default=[], choices=list(FIGURES))
    sections.add_argument("--only", nargs="+", choices=list(FIGURES) + list(REPORTS),
                          help="run only these sections (the overlap reports run only here)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_search_query", help=argparse.SUPPRESS)
    p.add_argument("--_search_scene", help=argparse.SUPPRESS)
    p.add_argument("--_search_geo", help=argparse.SUPPRESS)
    p.add_argument("--_search_dist", help=argparse.SUPPRESS)
    p.add_argument("--_encode_alone", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def selected(args, name: str) -> bool:
    if args.only is not None:
        return name in args.only
    # recipe: a projection for a GPU (the recipe on CPU would take days)
    return name in FIGURES and name not in args.skip and (
        name != "recipe" or args.device.startswith("cuda")) and (
        name not in ("geo", "tiles") or has_rasterio()) and (
        name != "scale" or importlib.util.find_spec("faiss") is not None)


def run_figures(args) -> dict:
    """The selected figure sections, each timed on stderr; {} when none is selected."""
    chosen = [name for name in FIGURES if selected(args, name)]
    if not chosen:
        return {}
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else f"cpu x{torch.get_num_threads()}"
    out = {"device": device_name, "torch": str(torch.__version__),
           "precision": "bf16 autocast" if cuda else "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            start = time.time()
            fn = FIGURES[name]
            out.update(fn(args) if name in ("encode", "train") else fn(args, tmp))
            print(f"[{name}: {time.time() - start:.0f}s]", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._child:
        print(json.dumps(train_step_child(args._child, args.device, args.steps)))
        return {}
    if args._search_query:
        print(json.dumps(search_query_child(args._search_query)))
        return {}
    if args._search_geo:
        print(json.dumps(search_geo_child(args._search_geo, args.device, args._encode_alone)))
        return {}
    if args._search_dist:
        figures = search_dist_child(args._search_dist, args.device)
        if figures:  # rank 0's
            print(json.dumps(figures))
        return {}
    if args._search_scene:
        print(json.dumps(search_scene_child(args._search_scene, args.device)))
        return {}
    for name in REPORTS:
        if selected(args, name):
            print("\n".join(REPORTS[name](args)))
    out = run_figures(args)
    width = max(map(len, out), default=0)
    for k, v in out.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json and out:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
