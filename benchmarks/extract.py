"""extract-clip throughput against the bare encoder (CPU) and in absolute images/s (one CUDA GPU).

(a) CPU (DESIGN.md target: ratio >= 0.8): ViT-B-32 with random weights; end-to-end `semspai extract-clip`
    images/s (in process, torch on every core, decode threads beside it) over the bare encoder's crops/s at
    the same batch divided by crops per image. Runs alternate e2e and bare and report medians, because
    other jobs on a shared machine move both.
(b) GPU, only when CUDA is available (target >= 5,000 images/s): ViT-B-32, 512-px JPEGs made here, global +
    4 local crops, nvjpeg decode (--gpu-decode), bf16; prints the card's name beside the figures.

Usage: python benchmarks/extract.py [--images 64] [--batch-size 32] [--repeats 3] [--skip-gpu]
       python benchmarks/extract.py --host-ceiling [--writer-ab]   # (b)'s pipeline with the device's work
            # stubbed: what the host allows one process, on any machine; --writer-ab: alternating runs with the
            # shard writes by the writer process and in a thread
       QUICK=1 python benchmarks/extract.py   # tiny dry run of both variants on the CPU (tiny-random)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from PIL import Image

from semspai.pipeline.demodata import synthetic_photo
from semspai.pipeline.extraction import (
    ClipFactory,
    DeviceCrops,
    ExtractOptions,
    extract_features,
    prepared_samples,
    probed_samples,
    worker_embedder,
)
from semspai.pipeline.grid import grid_boxes
from semspai.pipeline.host import tune_malloc
from semspai.stages.extract import ExtractConfig, run
from semspai.store.shards import ShardWriter, iter_shard
from semspai.store.writer import WRITER_ENV

QUICK = os.environ.get("QUICK") == "1"
SIZE = 512  # px: a 2 x 2 grid, so global + 4 local = 5 crops per image
CROPS_PER_IMAGE = 5


def make_shards(out: Path, n_images: int, per_shard: int, unique: int | None = None) -> Path:
    """Photo-like 512-px JPEGs (upsampled noise plus grain, quality 90) in tars of `per_shard`; with `unique`,
    only that many distinct images, repeated (making JPEGs in Python would take longer than extracting them)."""
    out.mkdir(parents=True, exist_ok=True)
    blobs: list[bytes] = []
    for seed in range(min(n_images, unique or n_images)):
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(SIZE, SIZE, seed, grain=12)).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    for s in range(0, n_images, per_shard):
        writer = ShardWriter(out / f"train-{s // per_shard:06d}.tar")
        for i in range(s, min(n_images, s + per_shard)):
            meta = {"label": i % 2, "generator": "bench", "split": "train"}
            writer.write(f"img{i:06d}", blobs[i % len(blobs)], "jpg", meta)
        writer.close()
    return out


def gpu_shards(args: argparse.Namespace, root: Path) -> tuple[Path, int]:
    """The GPU variant's shards (also the host ceiling's): --gpu-images 512-px JPEGs in --gpu-shards tars."""
    n = 16 if QUICK else args.gpu_images
    return make_shards(root / "gpu-shards", n, max(1, n // args.gpu_shards), unique=min(n, 1024)), n


def bare_encoder_images_per_s(factory: ClipFactory, batch_size: int, n_batches: int, threads: int) -> float:
    """The encoder alone on ready (B, 3, S, S) batches, converted to images: crops/s / crops per image."""
    torch.set_num_threads(threads)
    embedder = factory()
    s = embedder.spec.image_size
    x = torch.randn(batch_size, 3, s, s, device=embedder.device)
    embedder.get_image_embedding(x)  # warm-up
    sync = (lambda: torch.cuda.synchronize(embedder.device)) if embedder.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n_batches):
        embedder.get_image_embedding(x)
    sync()
    return batch_size * n_batches / (time.perf_counter() - start) / CROPS_PER_IMAGE


def end_to_end_images_per_s(shards: Path, root: Path, factory: ClipFactory, **cfg_kw) -> float:
    store = root / f"store-{time.monotonic_ns()}.zarr"
    prompts = root / "prompts.txt"
    prompts.write_text("cat\ndog\n")  # the 1000-class bank would time the text tower, not extraction
    cfg = ExtractConfig(
        str(shards),
        str(store),
        clip=factory.clip,
        device=factory.device,
        precision=factory.precision,
        prompts=str(prompts),
        **cfg_kw,
    )
    result = run(cfg, embedder_factory=factory)
    return result.images_per_s


def cpu_variant(args: argparse.Namespace, root: Path) -> dict:
    threads = os.cpu_count() or 1
    factory = ClipFactory("tiny-random" if QUICK else "ViT-B-32:random", "cpu", "fp32")
    shards = make_shards(root / "cpu-shards", args.images, args.images // 2)
    e2e, bare = [], []
    for _ in range(args.repeats):
        # in process, torch on every core, decode threads beside it: the overhead a user pays over the encoder
        e2e.append(
            end_to_end_images_per_s(
                shards,
                root,
                factory,
                workers=0,
                batch_size=args.batch_size,
                decode_workers=args.decode_workers,
                torch_threads=threads,
            )
        )
        n_batches = max(1, args.images * CROPS_PER_IMAGE // args.batch_size)
        bare.append(bare_encoder_images_per_s(factory, args.batch_size, n_batches, threads))
    e, b = statistics.median(e2e), statistics.median(bare)
    return {
        "variant": "cpu",
        "model": factory.clip,
        "threads": threads,
        "batch": args.batch_size,
        "images": args.images,
        "e2e_img_per_s": round(e, 2),
        "bare_img_per_s": round(b, 2),
        "ratio": round(e / b, 3),
        "e2e_runs": [round(v, 2) for v in e2e],
        "bare_runs": [round(v, 2) for v in bare],
    }


def gpu_variant(args: argparse.Namespace, root: Path) -> Iterator[dict]:
    """Rows for each way of running on the GPU: in process or on Dask workers sharing the card, nvjpeg or the
    host decode function, shard writes by the writer process or in a thread; and the bare encoder (autocast as
    extract-clip runs it, and with bf16 weights)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only for the QUICK dry run
    factory = ClipFactory("tiny-random" if QUICK else "ViT-B-32:random", device, "bf16" if device == "cuda" else "fp32")
    shards, n = gpu_shards(args, root)
    card = torch.cuda.get_device_name() if device == "cuda" else "none (CPU dry run)"
    bare = bare_encoder_images_per_s(factory, args.gpu_batch_size, 20, os.cpu_count() or 1)
    bf16 = bare_bf16_weights_images_per_s(factory, args.gpu_batch_size, 20) if device == "cuda" else 0.0
    common = {"card": card, "model": factory.clip, "images": n, "batch": args.gpu_batch_size, "target_img_per_s": 5000}
    yield {"variant": "gpu-bare", "how": "encoder alone, bf16 autocast", "img_per_s": round(bare, 1), **common}
    yield {"variant": "gpu-bare", "how": "encoder alone, bf16 weights", "img_per_s": round(bf16, 1), **common}
    ceiling = host_ceiling_images_per_s(shards, root, args.gpu_batch_size, args.gpu_decode_workers)
    yield {
        "variant": "gpu-host",
        "how": "host ceiling: in process, device work stubbed",
        "img_per_s": round(ceiling),
        **common,
    }
    for row in gpu_stages(sorted(shards.glob("*.tar"))[0], factory, args.gpu_batch_size, args.gpu_decode_workers):
        yield {"variant": "gpu-stage", "how": f"one shard in process: {row.pop('stage')}", **row, **common}
    # rows as they come: a run cut off by a time limit still leaves the figures measured so far
    pure = ClipFactory(factory.clip, factory.device, "bf16-weights")
    first = args.gpu_workers[0]
    runs = [(first, True, factory, "process"), (first, True, pure, "process"), (first, True, factory, "thread")]
    runs += [(first, False, factory, "process")] + [(w, True, factory, "process") for w in args.gpu_workers[1:]]
    for k, (workers, nvjpeg, fac, writer) in enumerate(runs):
        with mock.patch.dict(os.environ, {WRITER_ENV: writer}):
            rates = [
                end_to_end_images_per_s(
                    shards,
                    root,
                    fac,
                    workers=workers,
                    batch_size=args.gpu_batch_size,
                    decode_workers=args.gpu_decode_workers,
                    gpu_decode=nvjpeg,
                    torch_threads=max(1, (os.cpu_count() or 1) // max(1, workers)),
                )
                for _ in range(2 if k == 0 and not QUICK else 1)  # the first run also warms the allocator and kernels
            ]
        how = f"e2e, {'nvjpeg' if nvjpeg else 'host'} decode, {f'{workers} dask workers' if workers else 'in process'}"
        how += ", bf16 weights" if fac.precision == "bf16-weights" else ""
        how += ", writes in a thread" if writer == "thread" else ""
        yield {
            "variant": "gpu",
            "how": how,
            "img_per_s": round(rates[-1], 1),
            "runs": [round(r) for r in rates],
            **common,
        }


class _StubbedFactory(ClipFactory):
    """tiny-random on the CPU whose image encoder returns unit vectors at once (no compute)."""

    def __call__(self):
        embedder = super().__call__()
        dim = embedder.spec.embed_dim
        embedder.get_image_embedding = lambda x: torch.full((len(x), dim), dim**-0.5)
        return embedder


def host_ceiling_images_per_s(shards: Path, root: Path, batch_size: int, decode_workers: int) -> float:
    """The --gpu-decode pipeline in process with the device's work stubbed out: the batched decode returns
    8 x 8 images, crops and the encoder return at once. Reading, probing, chunking, batching, the sha256 and
    the Zarr writes run as they do: the images/s the host lets one process reach, whatever the GPU."""

    def decode(self, probes):
        return [torch.zeros(3, 8, 8, dtype=torch.uint8) for _ in probes]

    def crops(self, x):
        boxes = grid_boxes(SIZE, SIZE, self.rule)  # what a SIZE-px image gives
        return torch.zeros(len(x), 1 + len(boxes), 3, 1, 1), boxes

    factory = _StubbedFactory("tiny-random", "cpu", "fp32")
    with mock.patch.object(DeviceCrops, "_decode_jpegs", decode), mock.patch.object(DeviceCrops, "_crops", crops):
        return end_to_end_images_per_s(
            shards, root, factory, workers=0, batch_size=batch_size, decode_workers=decode_workers, gpu_decode=True
        )


def gpu_stages(shard: Path, factory: ClipFactory, batch_size: int, decode_workers: int) -> Iterator[dict]:
    """Images/s of one shard through the pipeline cut after each stage, in process (where e2e time goes):
    read (tar -> samples), + probe (reader threads), + device decode and crops, + encoder (all rows in host
    memory: everything but the Zarr write and the Dask hop)."""
    embedder = worker_embedder(factory)
    opts = ExtractOptions(batch_size, decode_workers, gpu_decode=True, device=factory.device)
    sync = (lambda: torch.cuda.synchronize(embedder.device)) if embedder.device.type == "cuda" else (lambda: None)
    crops = DeviceCrops(embedder, factory.device)
    stages = {
        "read": lambda: sum(1 for _ in iter_shard(shard)),
        "read+probe": lambda: sum(1 for _ in probed_samples(iter_shard(shard), crops, decode_workers)),
        "read+probe+decode+crops": lambda: sum(1 for _ in prepared_samples(iter_shard(shard), embedder, opts)),
        "read+probe+decode+crops+encoder": lambda: extract_features(iter_shard(shard), embedder, "s", "", opts).n_samples,
    }  # fmt: skip
    for name, fn in stages.items():
        fn()  # warm-up (page cache, allocator, kernels)
        sync()
        start = time.perf_counter()
        n = fn()
        sync()
        seconds = time.perf_counter() - start
        yield {"stage": name, "images": n, "us_per_img": round(seconds / n * 1e6, 1), "img_per_s": round(n / seconds)}


def bare_bf16_weights_images_per_s(factory: ClipFactory, batch_size: int, n_batches: int) -> float:
    """The encoder with its weights cast to bf16 (no autocast): the DESIGN.md anchor's fastest mode."""
    model = factory().model.visual.to(torch.bfloat16)
    x = torch.randn(batch_size, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        model(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n_batches):
            model(x)
        torch.cuda.synchronize()
    return batch_size * n_batches / (time.perf_counter() - start) / CROPS_PER_IMAGE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8 if QUICK else 64)
    parser.add_argument("--batch-size", type=int, default=8 if QUICK else 32)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1 if QUICK else 3)
    parser.add_argument("--gpu-images", type=int, default=16384)
    parser.add_argument("--gpu-shards", type=int, default=8)
    parser.add_argument("--gpu-batch-size", type=int, default=1280)  # 256 images x 5 crops
    parser.add_argument("--gpu-decode-workers", type=int, default=8)
    parser.add_argument(
        "--gpu-workers",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[0],
        help="comma list: 0 = in process, N = N Dask worker processes sharing the GPU",
    )
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument(
        "--host-ceiling",
        action="store_true",
        help="only the host ceiling of the --gpu-decode path (device work stubbed; runs without a GPU)",
    )
    parser.add_argument(
        "--writer-ab",
        action="store_true",
        help="with --host-ceiling: alternate runs with shard writes by the writer process and in a thread",
    )
    args = parser.parse_args()
    # as the `semspai` command does in its own process (pipeline/host.py); GLIBC_TUNABLES=glibc.malloc.check=0 (any
    # allocator setting of one's own) measures glibc's defaults instead
    print(json.dumps({"malloc_tuned": tune_malloc()}), flush=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("semspai.pipeline.extraction").setLevel(logging.INFO)  # a line per shard, with its seconds
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.host_ceiling:
            shards, n = gpu_shards(args, Path(tmp))
            writers = ["process", "thread"] if args.writer_ab else [os.environ.get(WRITER_ENV, "process")]
            runs: dict[str, list[float]] = {w: [] for w in writers}
            for _ in range(args.repeats):
                for writer in writers:  # alternating: other jobs on a shared machine move both alike
                    with mock.patch.dict(os.environ, {WRITER_ENV: writer}):
                        runs[writer].append(
                            host_ceiling_images_per_s(shards, Path(tmp), args.gpu_batch_size, args.gpu_decode_workers)
                        )
            for writer, rates in runs.items():
                how = f"host ceiling: in process, device work stubbed, {os.cpu_count()} cores"
                rows.append(
                    {
                        "variant": "host",
                        "how": how + (", writes in a thread" if writer == "thread" else ""),
                        "img_per_s": round(statistics.median(rates)),
                        "runs": [round(r) for r in rates],
                        "card": "none",
                        "model": "stub",
                        "images": n,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        elif not args.skip_cpu:
            rows.append(cpu_variant(args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
        if not args.host_ceiling and not args.skip_gpu and (torch.cuda.is_available() or QUICK):
            for row in gpu_variant(args, Path(tmp)):
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    for r in rows:
        if r["variant"] == "cpu":
            print(
                f"cpu  {r['model']}: e2e {r['e2e_img_per_s']} img/s, bare encoder {r['bare_img_per_s']} img/s, "
                f"ratio {r['ratio']} (target >= 0.8)"
            )
        else:
            print(f"{r['card']}  {r['model']}  {r['how']:<58} {r['img_per_s']:>9} img/s (target 5000)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "extract_bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
