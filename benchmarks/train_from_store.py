"""Training steps/s reading CLIP vectors from the store vs computing them every step (DESIGN.md target: >= 3x).

Both variants run the same default-config training step (global_local fusion, same packing, batch and
precision) on the same shards; the online one first computes each image's global vector and each chosen
cell's local vector with a ViT-B-16 CLIP (random weights, inference mode), as a trainer without the store
would. Usage: python benchmarks/train_from_store.py [--images 64] [--batch-size 16] [--steps 2] [--warmup 2]
       [--device cpu] [--num-workers 0] [--breakdown] [--set KEY=VALUE ...]   (e.g. --set TRAIN.COMPILE=true)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from model_cost import count_macs
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from semspai.pipeline.clip import ClipEmbedder, load_embedder, resolve_precision
from semspai.pipeline.config import load_config
from semspai.pipeline.data import BATCHES_AHEAD, Sample, ShardStream, TrainBatch, collate, loader_samples
from semspai.pipeline.demodata import synthetic_photo
from semspai.pipeline.detector import DetectorBatch, unit_pixels
from semspai.pipeline.engine import Trainer
from semspai.pipeline.host import tune_malloc
from semspai.pipeline.iterate import Background, batched
from semspai.stages.extract import ExtractConfig
from semspai.stages.extract import run as extract
from semspai.stages.shard import ShardConfig
from semspai.stages.shard import run as shard

CLIP = "ViT-B-16:random"  # what the online variant runs every step
# what fills the store: the same 512-d width at a quarter of the cost; a step reads only the vectors' width,
# never their values' origin, so the store variant's speed does not depend on which encoder made them
STORE_CLIP = "ViT-B-32:random"
SIDE = 512  # DESIGN.md's extraction target image: 512-px JPEG, 4 grid patches


def make_manifest(root: Path, n_train: int, n_val: int = 4, seed: int = 0) -> Path:
    """Smooth random 512-px JPEGs, alternately real and fake, listed in a manifest with explicit splits
    (content is irrelevant to speed; val exists only because training needs one)."""
    rows = ["path,label,generator,split"]
    for i in range(n_train + n_val):
        path = root / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_photo(SIDE, SIDE, seed + i, grain=0)).save(path, "JPEG", quality=90)
        label = "fake" if i % 2 else "real"
        rows.append(f"{path.name},{label},{'gen' if i % 2 else 'cam'},{'train' if i < n_train else 'val'}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@dataclass
class OnlineSample(Sample):
    global_pixels: torch.Tensor | None = None  # (3, S, S) the CLIP global view, preprocessed in the data worker


class OnlineStream(ShardStream):
    """The store-free trainer's stream: no store rows; each sample carries its preprocessed global view."""

    def __init__(self, base: ShardStream, embedder: ClipEmbedder) -> None:
        super().__init__(base.plan, None, base.view, base.seed, base.rank, base.world)
        self.embedder = embedder

    def make(self, path, raw) -> OnlineSample:
        rgb = self.decode(path, raw)
        sample = self.cut(path, raw, rgb)
        return OnlineSample(**vars(sample), global_pixels=self.embedder.preprocess_global(rgb))


@functools.cache
def device_norm(embedder: ClipEmbedder) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's pixel mean and std as (1, 3, 1, 1) tensors on its device, made once, not every step."""
    spec = embedder.spec
    return tuple(torch.tensor(v, device=embedder.device).view(1, 3, 1, 1) for v in (spec.mean, spec.std))


def clip_vectors(embedder: ClipEmbedder, batch: TrainBatch, global_pixels: torch.Tensor) -> None:
    """Fill the batch's global (B, D) and local (N, D) vectors as the store would hold them (float16 values).

    The batch's patches are 224-px uint8 pixels already, ViT-B-16's input size: they become float and are
    normalised on the encoder's device, as a store-free trainer would do it (no trip through host
    preprocessing); the global views come preprocessed from the loader processes. The vectors stay on the
    device, where the step uses them.
    """
    assert embedder.spec.image_size == batch.patches.shape[1], "the online variant feeds patches at its size"
    mean, std = device_norm(embedder)
    local = (unit_pixels(batch.patches.to(embedder.device, non_blocking=True)) - mean) / std
    batch.global_vec = embedder.get_image_embedding(global_pixels).half().float()
    batch.local_vec = embedder.get_image_embedding(local).half().float()


def flop_bound(trainer: Trainer, embedder: ClipEmbedder, patches_per_image: int) -> tuple[float, float]:
    """GMACs per patch of a training step (forward and backward, the run's config) and of the online variant's
    CLIP work (the patch's local crop plus its share of the image's global crop), counted on the CPU.

    (store + online) / store is the ratio the benchmark would show if both ran at the same FLOP rate: the
    measured ratio sits below it by as much as the spectral step runs less efficiently than CLIP inference.
    """
    detector = copy.deepcopy(trainer.module).cpu().float()
    # with TRAIN.COMPILE the copy shares the compiled method, still bound to the original module: drop it, and the
    # copy counts its own (plain) forward
    detector.detector.spectral.__dict__.pop("forward", None)
    for module in detector.modules():  # fused attention kernels are invisible to the counter: count the matmuls
        if hasattr(module, "fused_attn"):  # timm's attention, which reads the flag at each call
            module.fused_attn = False
    n_images = 2
    n = n_images * patches_per_image
    dim = trainer.clip_dim
    unit = functools.partial(torch.nn.functional.normalize, dim=-1)
    batch = DetectorBatch(
        torch.rand(n, 3, 224, 224),
        torch.full((n_images,), patches_per_image),
        unit(torch.randn(n_images, dim)),
        unit(torch.randn(n, dim)),
    )
    text = unit(torch.randn(n_images, dim))

    def step() -> None:
        parts, _ = detector(batch, torch.ones(n_images), text)
        parts.total.backward()

    train = count_macs(step) / n / 1e9
    visual = copy.deepcopy(embedder.model.visual).cpu().float()
    # an input that requires grad keeps nn.MultiheadAttention off its fused inference path, and SDPA's math
    # path computes attention as matmuls: both fused kernels are invisible to the counter
    with sdpa_kernel(SDPBackend.MATH):
        crop = count_macs(lambda: visual(torch.rand(1, 3, 224, 224, requires_grad=True))) / 1e9
    return train, crop * (1 + 1 / patches_per_image)


def collated(trainer: Trainer, stream: ShardStream, epoch: int) -> Iterator[tuple[list[Sample], TrainBatch]]:
    """The trainer's data path: DATA.NUM_WORKERS loader processes, batches of TRAIN.BATCH_SIZE collated as the
    trainer's loader does (page-locked on CUDA); the samples come along, so each keeps its global view."""
    stream.set_epoch(epoch)
    pin = trainer.device.type == "cuda"
    groups = batched(loader_samples(stream, trainer.cfg.DATA.NUM_WORKERS), trainer.cfg.TRAIN.BATCH_SIZE)
    return ((samples, collate(samples, pin)) for samples in groups)


def data_path_rate(trainer: Trainer, stream: ShardStream) -> float:
    """Samples/s of the data path alone (no model) over one epoch of the stream: the most steps the device could
    be fed. Collated in this thread: the trainer does it in a thread beside the step, which competes with the
    step for the host, so this is an upper bound there too.
    The clock starts at the first batch, when the loader processes are up (their start-up is not the steady
    rate); the samples they had made beyond that batch by then count as made in the clocked time, so the
    figure is somewhat high (with 12 processes, batch 64 and 512 images, about 5-8%)."""
    batches = collated(trainer, stream, epoch=2)
    next(batches)
    start, n = time.perf_counter(), 0
    for samples, _ in batches:
        n += len(samples)
    return n / (time.perf_counter() - start) if n else float("nan")


def timed_steps(
    trainer: Trainer, stream: ShardStream, steps: int, warmup: int, embedder: ClipEmbedder | None, breakdown: bool
) -> float:
    """Steps/s over `steps` training steps after `warmup` untimed ones, data loading included (DATA.NUM_WORKERS
    loader processes, as the trainer's own loader; batches formed here so samples keep their global view).

    As in the trainer, nothing waits for the device between steps (the host prepares batch k+1 while the
    device runs step k); the clock stops after a final synchronisation. `breakdown` synchronises after each
    part instead, to print where a step's time goes (slower: the overlap is lost).
    """
    trainer.module.train()
    sync = (lambda: torch.cuda.synchronize(trainer.device)) if trainer.device.type == "cuda" else (lambda: None)
    part_sync = sync if breakdown else (lambda: None)
    start, waits = 0.0, {"data": 0.0, "clip": 0.0, "step": 0.0}
    # collated in a thread, as the trainer's loader does
    with contextlib.closing(Background(collated(trainer, stream, epoch=1), BATCHES_AHEAD)) as batches:
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                start, waits = time.perf_counter(), dict.fromkeys(waits, 0.0)
            t0 = time.perf_counter()
            samples, batch = next(batches)
            t1 = time.perf_counter()
            if embedder is not None:  # the embedder applies the same precision itself
                clip_vectors(embedder, batch, torch.stack([s.global_pixels for s in samples]))
                part_sync()
            t2 = time.perf_counter()
            trainer.step(batch)
            part_sync()
            t3 = time.perf_counter()
            for k, dt in zip(waits, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                waits[k] += dt
    sync()
    total = time.perf_counter() - start
    what = "seconds per step" if breakdown else "host seconds per step (the device runs behind)"
    print(f"  {what}: " + ", ".join(f"{k} {v / steps:.3f}" for k, v in waits.items()), flush=True)
    return steps / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="TRAIN.BATCH_SIZE of both variants")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator and caches settle)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-workers", type=int, default=0, help="DATA.NUM_WORKERS: loader processes")
    parser.add_argument("--work", default=None, help="folder for shards and store (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override of both "
                        "variants, e.g. AUG.WHERE=loader (repeatable)")  # fmt: skip
    parser.add_argument("--breakdown", action="store_true", help="synchronise after each part of a step and "
                        "print where the time goes (a diagnostic: it removes the host/device overlap)")  # fmt: skip
    args = parser.parse_args()
    # as the `semspai` command does in its own process (pipeline/host.py); GLIBC_TUNABLES=glibc.malloc.check=0 (any
    # allocator setting of one's own) measures glibc's defaults instead
    print(f"malloc tuned: {tune_malloc()}", flush=True)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    need = args.batch_size * (args.warmup + args.steps)
    if args.images < need:
        parser.error(f"--images must be at least batch-size x (warmup + steps) = {need}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        shards, store = work / "shards", work / "store.zarr"
        if not (store / "zarr.json").exists():
            manifest = make_manifest(work / "data", args.images)
            # loader processes take whole shards: at least four shards each, or some idle (512 images in tars of 64,
            # as before, left 4 of 12 processes without a shard)
            per_shard = max(1, min(64, args.images // max(1, 4 * args.num_workers)))
            shard(ShardConfig(sources=[], manifests=[str(manifest)], out=str(shards), shard_size=per_shard))
            t0 = time.perf_counter()
            extract(
                ExtractConfig(
                    shards=str(shards),
                    store=str(store),
                    clip=STORE_CLIP,
                    workers=0,
                    device=args.device,
                    torch_threads=torch.get_num_threads(),
                )
            )
            print(f"store: {args.images + 4} images extracted with {STORE_CLIP} in {time.perf_counter() - t0:.0f} s")
        overrides = [f"TRAIN.BATCH_SIZE={args.batch_size}", f"DATA.NUM_WORKERS={args.num_workers}", *args.set]
        cfg = load_config(None, overrides)
        precision = resolve_precision(cfg.TRAIN.PRECISION, device)
        trainer = Trainer(cfg, str(shards), work / "run", str(store), device, precision)
        if len(trainer.train_stream) < need:
            parser.error(f"--work {work} holds {len(trainer.train_stream)} train images from an earlier run, fewer "
                         f"than the {need} asked for: give an empty folder")  # fmt: skip
        embedder = load_embedder(CLIP, device, precision)
        train_gmacs, clip_gmacs = flop_bound(trainer, embedder, (SIDE // 224) ** 2)
        data_rate = data_path_rate(trainer, trainer.train_stream)
        from_store = timed_steps(trainer, trainer.train_stream, args.steps, args.warmup, None, args.breakdown)
        online_stream = OnlineStream(trainer.train_stream, embedder)
        online = timed_steps(trainer, online_stream, args.steps, args.warmup, embedder, args.breakdown)
    card = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{card}, precision {precision}, batch {args.batch_size} images of {SIDE}x{SIDE} "
          f"(up to {cfg.DATA.MAX_PATCHES} patches each), encoder {cfg.MODEL.SPECTRAL.ENCODER}, "
          f"mode {cfg.MODEL.SEMANTIC.MODE}, {args.num_workers} loader processes, augmentation "
          f"{'batched on the device' if trainer.train_stream.view.aug_on_device else 'in the loader'} (AUG.WHERE)"
          f"{', spectral branch compiled (TRAIN.COMPILE)' if cfg.TRAIN.COMPILE else ''}")  # fmt: skip
    print("| variant | steps/s |\n|---|---|")
    print(f"| from store | {from_store:.3f} |\n| online CLIP ({CLIP}) | {online:.3f} |")
    print(f"ratio store/online: {from_store / online:.2f}x (target >= 3x)")
    batch = args.batch_size
    print(f"data path alone ({args.num_workers} loader processes + collate, no model): {data_rate:.0f} samples/s = "
          f"{data_rate / batch:.2f} steps/s at batch {batch}, {data_rate / batch / online:.2f}x the online rate: "
          "the from-store variant cannot run faster (the online one also preprocesses each global view)")  # fmt: skip
    bound = (train_gmacs + clip_gmacs) / train_gmacs
    print(f"per patch: training step {train_gmacs:.2f} GMACs, online CLIP {clip_gmacs:.2f} GMACs; at equal FLOP rates "
          f"the ratio would be {bound:.2f}x, so 3x needs the step at >= {2 * train_gmacs / clip_gmacs:.0%} of "
          "CLIP inference's FLOP rate")  # fmt: skip


if __name__ == "__main__":
    main()
