"""`predict` at any resolution: peak memory of a 4K image chunked and unchunked (DESIGN.md: bounded memory, the
same score), and the rate on 224-px images with their repeated patches computed once against every patch.

Each memory figure comes from a process of its own that scores one image (peak RSS on the CPU, the CUDA
allocator's peak on a GPU), so one setting's peak never hides another's. Without --checkpoint the detector is
the default config (MODEL.SEMANTIC.MODE global_local) with seeded random weights and a CLIP encoder with
random weights: speed and memory do not depend on what the weights learnt.

Usage: python benchmarks/predict.py [--checkpoint CKPT|RUN] [--clip ViT-B-32:random] [--device auto]
       [--chunks 8,64,100000] [--sizes 3840x2160,1920x1080,224x224] [--small-images 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from semspai.pipeline import detector as detector_module
from semspai.pipeline import inference
from semspai.pipeline.clip import load_embedder
from semspai.pipeline.config import RunConfig
from semspai.pipeline.demodata import synthetic_photo
from semspai.pipeline.detector import create_detector, trainable_state_dict
from semspai.pipeline.grid import grid_boxes
from semspai.pipeline.host import tune_malloc
from semspai.stages.common import resolve_device
from semspai.store.checkpoints import save_checkpoint


def make_checkpoint(path: Path, clip: str) -> Path:
    """The default model with seeded random weights, saved as `semspai train` saves one (then loaded back
    through `load_detector`, the path predict takes)."""
    cfg = RunConfig()
    spec = load_embedder(clip).spec
    torch.manual_seed(0)
    model = create_detector(cfg.MODEL, spec.embed_dim)
    save_checkpoint(path, {"model": trainable_state_dict(model), "config": cfg.to_dict(),
                           "clip_spec": spec.to_dict(), "clip_dim": spec.embed_dim, "threshold": 0.5})  # fmt: skip
    return path


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def one(args: argparse.Namespace) -> None:
    """In a process of its own: score one image at one chunk size; print score, peak memory and seconds."""
    width, height = map(int, args.one_size.split("x"))
    image = synthetic_photo(width, height, seed=1)
    det = inference.load_detector(args.checkpoint, device=args.device)
    det.chunk_size = args.one_chunk
    baseline = peak_mb(args.device)  # the process with its model loaded, before any image
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    (pred,) = det.predict(image)
    seconds = time.perf_counter() - start
    print(json.dumps({"score": pred.score, "n_patches": pred.n_patches, "peak_mb": peak_mb(args.device),
                      "baseline_mb": baseline, "seconds": seconds}))  # fmt: skip


def measure(args: argparse.Namespace, size: str, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--device", args.device,
           "--one-size", size, "--one-chunk", str(chunk)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_table(args: argparse.Namespace) -> None:
    chunks = [int(c) for c in args.chunks.split(",")]
    kind = "CUDA allocator peak" if args.device.startswith("cuda") else "peak RSS"
    print(f"\n{kind} while scoring one image (MB; 'model' = the process before the image), per chunk size")
    print(
        f"{'image':>10} {'patches':>7} {'chunk':>7} {'model':>8} {'peak':>8} {'image share':>11} {'score':>10} {'s':>6}"
    )
    for size in args.sizes.split(","):
        rows = {chunk: measure(args, size, chunk) for chunk in chunks}
        for chunk, r in rows.items():
            print(f"{size:>10} {r['n_patches']:>7} {chunk:>7} {r['baseline_mb']:>8.0f} {r['peak_mb']:>8.0f} "
                  f"{r['peak_mb'] - r['baseline_mb']:>11.0f} {r['score']:>10.6f} {r['seconds']:>6.1f}")  # fmt: skip
        smallest, largest = min(chunks), max(chunks)
        a, b = rows[smallest], rows[largest]
        grown = (a["peak_mb"] - a["baseline_mb"]) / max(b["peak_mb"] - b["baseline_mb"], 1e-9)
        print(f"{size:>10}: chunk {smallest} vs {largest}: image share of the peak {grown:.2f}x, "
              f"|score difference| {abs(a['score'] - b['score']):.1e} (target: bounded memory, the same score)")  # fmt: skip


def small_image_rate(args: argparse.Namespace) -> None:
    """img/s on 224-px images (five equal crops each) with repeats computed once vs every patch."""
    det = inference.load_detector(args.checkpoint, device=args.device)
    images = [synthetic_photo(224, 224, seed=10 + i) for i in range(args.small_images)]
    assert len(grid_boxes(224, 224)) == 5
    det.predict(images[:2])  # warm-up
    real = detector_module.distinct_rows
    rates: dict[str, list[float]] = {"once": [], "every": []}
    scores = {}
    for _ in range(args.rounds):
        for name, fn in (("once", real), ("every", lambda x: None)):
            detector_module.distinct_rows = inference.distinct_rows = fn
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            preds = det.predict(images)
            rates[name].append(len(images) / (time.perf_counter() - start))
            scores[name] = np.array([p.score for p in preds])
    detector_module.distinct_rows = inference.distinct_rows = real
    once, every = np.median(rates["once"]), np.median(rates["every"])
    print(
        f"\n{len(images)} images of 224 x 224 px (five equal crops each), medians of {args.rounds} alternating rounds:"
    )
    print(f"  repeated patches computed once: {once:.2f} img/s; every patch: {every:.2f} img/s; "
          f"ratio {once / every:.2f}x; max |score difference| {np.abs(scores['once'] - scores['every']).max():.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint or run dir (default: random weights)")
    parser.add_argument("--clip", default="ViT-B-32:random", help="CLIP of the random-weights checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--chunks", default="8,64,100000", help="chunk sizes; the largest is 'unchunked'")
    parser.add_argument("--sizes", default="3840x2160,1920x1080,224x224", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--small-images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one-size", help=argparse.SUPPRESS)
    parser.add_argument("--one-chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tune_malloc()  # as the `semspai` command runs
    args.device = resolve_device(args.device)
    if args.one_size:
        one(args)
        return
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is None:
            args.checkpoint = make_checkpoint(Path(tmp) / "random.pt", args.clip)
            print(f"checkpoint: the default model with random weights, CLIP {args.clip}")
        memory_table(args)
        small_image_rate(args)


if __name__ == "__main__":
    main()
