"""Speed and memory of mrs-adapter, ViT-B/32 shapes with random weights, on CPU or CUDA.

    python bench.py --json bench_cpu.json                 # CPU, fp32
    python bench.py --device cuda --json bench_gpu.json   # CUDA, bf16 autocast, plus the recipe projection

Measures (medians of interleaved repeats):
  encode_{image,text}_ratio_vs_open_clip  our encoder's throughput / open_clip's, same weights and batch
  train_step_time_ratio_vs_full           one HMMC step (both views, both towers, backward, Adam),
  train_peak_mem_ratio_vs_full            MRS-Adapter vs full fine-tuning (peak RSS on CPU, peak allocated on CUDA)
  eval_overhead_ratio                     `python eval.py` end to end on a synthetic RSITMD-sized test set
                                          (452 images, 2,260 captions, 256x256 TIFF) / encoding its tensors alone
  search_index_ratio_vs_encode            `search.py index` tiles/s / encoding the same tiles alone (48 256 px TIFFs +
                                          2 1024 px scenes of 25 tiles; decoding overlaps encoding)
  search_query_ms_1m, _peak_mb_1m         one top-20 query over 1,000,000 x 512 float16 embeddings memory-mapped
                                          (2 threads; peak memory beyond the mapped file's pages)
  recipe_minutes_projected (CUDA)         the published RSITMD recipe (30 epochs x 17,160 pairs, validation every
                                          epoch, test) from a measured 1-epoch `train.py` run on synthetic data
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from mrs_adapter.clip import transform
from mrs_adapter.demo import captions as demo_captions, sample_scene
from mrs_adapter.model import CLIP, build_model
from mrs_adapter.runfiles import write_json
from mrs_adapter.tokenizer import tokenize

HERE = os.path.dirname(os.path.abspath(__file__))
VIT_B_32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


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


def encode_ratios(args) -> dict:
    """Throughput ratios ours / open_clip on the same weights, interleaving the two each repeat."""
    import open_clip
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval().to(args.device)
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


def train_step_child(variant: str, device: str, steps: int) -> dict:
    """(in a fresh process) median step time and peak memory of the training step of `variant`:
    a method name, or "mrs_adapter_separate_views" (clean and dropout views in separate passes)."""
    sys.argv = [sys.argv[0]]
    import train
    from mrs_adapter.methods import apply_method
    torch.manual_seed(0)
    method, separate = variant.replace("_separate_views", ""), variant.endswith("_separate_views")
    model = apply_method(CLIP(**VIT_B_32), method, verbose=False).to(device)
    args = argparse.Namespace(objective="hmmc", margin=0.2, loss_weights=(1.0, 1.0, 1.0),
                              amp_dtype=torch.bfloat16 if device.startswith("cuda") else None)
    views = train.Views(model, 0.2, both_views=True, separate=separate).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    images = torch.randn(16, 3, 224, 224, device=device)  # the recipe's batch of 16 pairs
    tokens = train.collate_trimmed([(images[0].cpu(), t, 0) for t in tokenize(rs_captions(16))])[1].to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        train.forward_backward(args, views, model, images, tokens, scaler)
        optimizer.step()

    times = [timed(step, device) for _ in range(steps + 2)][2:]  # two warm-up steps (Adam state, allocator)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"step_s": statistics.median(times), "peak_bytes": peak}


def train_ratios(args) -> dict:
    """MRS-Adapter vs full fine-tuning, each in its own process (peak memory is per process), A B A B."""
    runs = {"mrs_adapter": [], "full": [], "mrs_adapter_separate_views": []}
    for _ in range(args.rounds):
        for method in runs:
            cmd = [sys.executable, __file__, "--_child", method, "--device", args.device, "--steps", str(args.steps)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE).stdout.strip().splitlines()[-1]
            runs[method].append(json.loads(line))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "peak_bytes")} for m, rs in runs.items()}
    return {"train_step_s_mrs_adapter": med["mrs_adapter"]["step_s"], "train_step_s_full": med["full"]["step_s"],
            "train_step_s_mrs_adapter_separate_views": med["mrs_adapter_separate_views"]["step_s"],
            "train_peak_bytes_mrs_adapter": med["mrs_adapter"]["peak_bytes"],
            "train_peak_bytes_full": med["full"]["peak_bytes"],
            "train_step_time_ratio_vs_full": med["mrs_adapter"]["step_s"] / med["full"]["step_s"],
            "train_peak_mem_ratio_vs_full": med["mrs_adapter"]["peak_bytes"] / med["full"]["peak_bytes"]}


def write_tiff(path: str, rng: np.random.Generator, size: int = 256):
    """A 256x256 RGB TIFF with smooth structure (as uncompressed as RSITMD's files)."""
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(low).resize((size, size), Image.BICUBIC).save(path, format="TIFF")


def synthetic_rsitmd(root: str, n_train: int, n_test: int = 452, threads: int = 8) -> str:
    """RSITMD's precomp layout with generated images: n_train pool images, n_test test images, 5 captions each."""
    from concurrent.futures import ThreadPoolExecutor
    text, images = os.path.join(root, "rsitmd_precomp"), os.path.join(root, "rsitmd_images")
    os.makedirs(text, exist_ok=True)
    os.makedirs(images, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        names = [f"{split}_{i:05d}.tif" for i in range(n)]
        with open(os.path.join(text, f"{split}_caps.txt"), "w") as f:
            f.write("\n".join(rs_captions(5 * n, seed=len(split))) + "\n")
        with open(os.path.join(text, f"{split}_filename.txt"), "w") as f:  # train: per image; test: per caption
            f.write("\n".join(names if split == "train" else [n for n in names for _ in range(5)]) + "\n")
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: write_tiff(os.path.join(images, names[i]), np.random.default_rng(i)), range(n)))
    return root


def random_weights(tmp: str):
    """(path, model): ViT-B/32 shapes, random weights, saved as a plain state dict in `tmp`."""
    torch.manual_seed(0)
    model = CLIP(**VIT_B_32).eval()
    path = os.path.join(tmp, "vit_b_32.pt")
    torch.save(model.state_dict(), path)
    return path, model


def eval_overhead(args, tmp: str) -> dict:
    """`python eval.py` wall time on a synthetic RSITMD test set / encoding the same tensors alone."""
    from mrs_adapter.data import load_splits
    from mrs_adapter.datasets import eval_loaders
    from mrs_adapter.metrics import encode_dataset
    root = synthetic_rsitmd(os.path.join(tmp, "eval"), n_train=5)
    weights, model = random_weights(tmp)
    cmd = [sys.executable, os.path.join(HERE, "eval.py"), "--dataset", "rsitmd", "--data-root", root, "--zero-shot",
           "--clip", weights, "--device", args.device, "--json", os.path.join(tmp, "eval.json")]
    split = load_splits("rsitmd", root, verbose=False)["test"]
    images, captions = eval_loaders(split, transform(224), 77, 64)
    images = [b.to(args.device) for b in images]  # the same tensors, decoded and moved beforehand
    captions = [b.to(args.device) for b in captions]
    model = model.to(args.device)
    encode_dataset(model, images[:1], captions[:1], args.device)  # warm-up
    runs = {"end_to_end": [], "encode_only": []}
    for _ in range(args.eval_repeats):  # interleaved, medians: one run of each is at the mercy of the machine
        runs["end_to_end"].append(timed(lambda: subprocess.run(cmd, check=True, capture_output=True), args.device))
        runs["encode_only"].append(timed(lambda: encode_dataset(model, images, captions, args.device), args.device))
    end_to_end, encode_only = statistics.median(runs["end_to_end"]), statistics.median(runs["encode_only"])
    from mrs_adapter.datasets import TrainDataset
    loading = {}
    for cache in (False, True):  # pairs/s that one loader process serves, with and without the uint8 cache
        data = torch.utils.data.DataLoader(TrainDataset(split, transform(224), cache=cache), batch_size=16)
        loading[cache] = len(split.captions) / timed(lambda: [b for b in data], "cpu")
    return {"eval_end_to_end_s": end_to_end, "eval_encode_only_s": encode_only,
            "eval_overhead_ratio": end_to_end / encode_only, "loader_pairs_per_s_decoding": loading[False],
            "loader_pairs_per_s_cached": loading[True]}


def recipe_projection(args, tmp: str) -> dict:
    """Minutes of the full RSITMD recipe: one measured epoch of `python train.py` on synthetic data."""
    root = synthetic_rsitmd(os.path.join(tmp, "recipe"), n_train=4291, threads=16)
    weights, _ = random_weights(tmp)
    run = os.path.join(tmp, "run")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--dataset", "rsitmd", "--data-root", root, "--clip", weights,
           "--epochs", "1", "--output", run, "--device", args.device, "--print-freq", "200"]
    wall = timed(lambda: subprocess.run(cmd, check=True), args.device)
    epoch = [json.loads(line) for line in open(os.path.join(run, "seed2", "log.jsonl")) if '"val"' in line][-1]
    per_epoch = epoch["train_seconds"] + epoch["val_seconds"]
    return {"recipe_one_epoch_run_s": wall, "recipe_epoch_train_s": epoch["train_seconds"],
            "recipe_epoch_val_s": epoch["val_seconds"], "recipe_pairs_per_s": epoch["pairs_per_s"],
            "recipe_minutes_projected": (wall + 29 * per_epoch) / 60}


def search_query_child(path: str, repeats: int = 5) -> dict:
    """(in a fresh process, 2 threads) ms of one top-20 query over the memory-mapped float16 file
    `path`, and the peak memory it adds beyond the mapped file's pages (page cache, shared)."""
    from mrs_adapter.search import top_k

    def status(key: str) -> int:  # kB -> bytes, from /proc/self/status (Linux)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

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


def search_figures(args, tmp: str) -> dict:
    """search.py: `index` images/s / the encoder's images/s on the same tiles (RSITMD-like 256 px
    TIFFs and two 1024 px scenes of 25 tiles), and one query over 1,000,000 stored embeddings."""
    from mrs_adapter import search
    from mrs_adapter.datasets import split_at_to_tensor
    rng = np.random.default_rng(0)
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
    tiles = torch.cat([search.read_tiles(os.path.join(images, rel), decode, 256, 192)[0]
                       for rel in search.list_images(images)])
    x = finish(tiles.float().div(255))  # the tensors `index` encodes, decoded beforehand
    workers = 1 if args.device == "cpu" else min(8, os.cpu_count() or 1)

    def encode_only():
        for i in range(0, len(x), 64):
            search.encode_images(model, x[i:i + 64], args.device)

    encode_only()  # warm-up
    runs = {"index": [], "encode": []}
    for r in range(args.eval_repeats):  # interleaved, medians
        out = os.path.join(tmp, f"search_index_{r}")
        runs["index"].append(search.build_index(images, out, model, preprocess, identity, workers=workers,
                                                device=args.device, log=lambda *a: None)["seconds"])
        runs["encode"].append(timed(encode_only, args.device))
    index_s, encode_s = statistics.median(runs["index"]), statistics.median(runs["encode"])
    out = {"search_index_tiles_per_s": len(x) / index_s, "search_encode_tiles_per_s": len(x) / encode_s,
           "search_index_ratio_vs_encode": encode_s / index_s}
    path = os.path.join(tmp, "search_1m.npy")  # 1,000,000 x 512 float16: 1 GB
    emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1_000_000, 512))
    for start in range(0, len(emb), 65536):
        block = rng.standard_normal((min(65536, len(emb) - start), 512), dtype=np.float32)
        emb[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    emb.flush()
    del emb
    cmd = [sys.executable, __file__, "--_search_query", path]
    child = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                      cwd=HERE).stdout.strip().splitlines()[-1])
    os.remove(path)
    tokens = tokenize(["a baseball field beside a highway"])
    with torch.no_grad():
        model.cpu().encode_text(tokens)  # warm-up
        text_s = statistics.median(timed(lambda: model.encode_text(tokens), "cpu") for _ in range(5))
    return dict(out, search_query_ms_1m=1000 * child["median_s"],
                search_query_first_ms_1m=1000 * child["first_s"],
                search_query_cpu_ms_1m=1000 * child["cpu_s"],
                search_query_peak_mb_1m=child["peak_extra_bytes"] / 2 ** 20,
                search_text_encode_ms=1000 * text_s)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats (medians)")
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--text-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per process")
    p.add_argument("--eval-repeats", type=int, default=3, help="interleaved eval.py / encode-only runs (medians)")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds of the training-step processes")
    p.add_argument("--search-images", type=int, default=48, help="256 px TIFFs indexed by the search bench")
    p.add_argument("--skip", nargs="*", default=[], choices=["encode", "train", "eval", "recipe", "search"])
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_search_query", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(train_step_child(args._child, args.device, args.steps)))
        return {}
    if args._search_query:
        print(json.dumps(search_query_child(args._search_query)))
        return {}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    out = {"device": device_name, "torch": str(torch.__version__),
           "precision": "bf16 autocast" if args.device.startswith("cuda") else "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("encode", encode_ratios), ("train", train_ratios), ("eval", eval_overhead),
                         ("recipe", recipe_projection), ("search", search_figures)):
            if name in args.skip or (name == "recipe" and not args.device.startswith("cuda")):
                continue
            start = time.time()
            out.update(fn(args) if name in ("encode", "train") else fn(args, tmp))
            print(f"[{name}: {time.time() - start:.0f}s]", file=sys.stderr, flush=True)
    width = max(map(len, out))
    for k, v in out.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
