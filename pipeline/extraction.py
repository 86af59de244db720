"""CLIP extraction split by role: read (decode + crop in threads) -> map (batched encoder) -> write, one task per shard.

The roles are injected (a reader of shard samples, an embedder factory, a store writer), so tests swap any
of them; `extract_shard` is the task a distributor (inline, or Dask) runs once per shard.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semspai.pipeline.clip import ClipSpec, load_embedder
from semspai.pipeline.grid import DEFAULT_RULE, PatchRule, crop_patches, grid_boxes
from semspai.store.features import FeatureStoreWriter, ShardFeatures, limit_zarr_concurrency
from semspai.store.images import DECODER_ID, DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from semspai.store.shards import ShardSample, file_sha256, iter_shard, shard_name

log = logging.getLogger(__name__)

# Set to a shard name: SIGKILL this extraction's process group after that shard's rows are written and
# before its done marker (the crash the resume logic must survive; used by the tests).
FAULT_ENV = "SEMSPAI_FAULT_KILL_AFTER_SHARD"
PROMPT_TEMPLATE = "a photo of a {}."
# JPEGs decoded by torchvision on the device, crops resized there; other formats and EXIF-rotated JPEGs
# still go through DECODER_ID. Part of the store identity: its pixels differ slightly from PIL's.
GPU_DECODER_ID = "torchvision-decode_jpeg-rgb+torch-bicubic-aa-v1"
JPEG_EXTS = ("jpg", "jpeg")
EXIF_ORIENTATION = 0x0112
PREFETCH_PER_WORKER = 4  # images in flight per decode thread: enough to hide jitter, bounded memory


class Embedder(Protocol):
    spec: ClipSpec

    def preprocess_global(self, rgb: np.ndarray) -> torch.Tensor: ...

    def preprocess_patches(self, patches: np.ndarray) -> torch.Tensor: ...

    def get_image_embedding(self, x: torch.Tensor) -> torch.Tensor: ...

    def get_text_embedding(self, texts: list[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class ClipFactory:
    """A picklable recipe for the embedder (Dask ships it to workers; each builds it once)."""

    clip: str = "tiny-random"
    device: str = "cpu"
    precision: str = "auto"

    def __call__(self) -> Embedder:
        return load_embedder(self.clip, self.device, self.precision)


_EMBEDDERS: dict[Any, Embedder] = {}


def worker_embedder(factory: Callable[[], Embedder]) -> Embedder:
    """The embedder of this process, built on first use and kept for the worker's later tasks."""
    if factory not in _EMBEDDERS:
        _EMBEDDERS[factory] = factory()
    return _EMBEDDERS[factory]


def warm_up(factory: Callable[[], Embedder]) -> None:
    """Build this worker's embedder now (returns nothing: the embedder never travels)."""
    worker_embedder(factory)


def prompt_bank(path: str | Path) -> list[str]:
    """Class names (one a line) -> prompt texts `a photo of a {name}.`."""
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return [PROMPT_TEMPLATE.format(n) for n in names]


def _to_f16(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy().astype(np.float16)


def embed_texts(embedder: Embedder, texts: list[str], batch_size: int) -> np.ndarray:
    """(T, D) float16 text vectors, in fixed batches so the bits do not depend on where this runs."""
    parts = [_to_f16(embedder.get_text_embedding(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, embedder.spec.embed_dim), np.float16)


@dataclass
class EmbedderInfo:
    spec: dict
    identity: dict
    has_text: bool
    embed_dim: int
    text: np.ndarray | None  # (K, D) float16 prompt vectors, when asked for and the encoder has a text tower


def describe(factory: Callable[[], Embedder], prompts: list[str], batch_size: int, torch_threads: int) -> EmbedderInfo:
    """Run on a worker: the encoder's spec and, when `prompts` is not empty, their vectors."""
    torch.set_num_threads(torch_threads)  # as for shards: the bits must not depend on where this ran
    embedder = worker_embedder(factory)
    spec = embedder.spec
    text = embed_texts(embedder, prompts, batch_size) if spec.has_text and prompts else None
    return EmbedderInfo(spec.to_dict(), spec.identity(), spec.has_text, spec.embed_dim, text)


# --- reader: decode and crop (runs in the decode threads) ---------------------------------------------------


@dataclass
class Prepared:
    """One sample, decoded and cut into the encoder's inputs (or the reason it could not be)."""

    key: str
    meta: dict  # the shard's sidecar (label, generator, split, caption, ...); the image bytes are not kept
    crops: torch.Tensor | None = None  # (1 + P, 3, S, S): the global crop, then the grid patches
    boxes: np.ndarray | None = None  # (P, 4) int32
    height: int = 0
    width: int = 0
    error: str = ""


class CpuCrops:
    """PIL decode (the one decode function) and the embedder's own preprocessing on the host."""

    def __init__(
        self, embedder: Embedder, rule: PatchRule = DEFAULT_RULE, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        self.embedder, self.rule, self.max_pixels = embedder, rule, max_pixels

    def decode(self, sample: ShardSample) -> np.ndarray:
        return decode_image(sample.image, self.max_pixels)  # (H, W, 3) uint8

    def __call__(self, sample: ShardSample) -> Prepared:
        try:
            rgb = self.decode(sample)
        except ImageDecodeError as exc:
            return Prepared(sample.key, sample.meta, error=str(exc))
        patches, boxes = crop_patches(rgb, self.rule)  # (P, 224, 224, 3), (P, 4)
        glob = self.embedder.preprocess_global(rgb)[None]  # (1, 3, S, S)
        crops = torch.cat([glob, self.embedder.preprocess_patches(patches)])
        return Prepared(sample.key, sample.meta, crops, boxes, rgb.shape[0], rgb.shape[1])


class DeviceCrops(CpuCrops):
    """JPEG decode with torchvision on `device` (nvjpeg on CUDA) and crops resized there.

    Matches CpuCrops within the tolerance tests/test_extract.py states, not bit for bit (another IDCT and
    torch's bicubic instead of PIL's), which is why the store records GPU_DECODER_ID.
    """

    def __init__(
        self, embedder: Embedder, device: str, rule: PatchRule = DEFAULT_RULE, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> None:
        super().__init__(embedder, rule, max_pixels)
        if embedder.spec.kind == "timm":
            raise ValueError("--gpu-decode supports open_clip encoders only (timm's crop_pct transform is not ported)")
        self.device = torch.device(device)
        spec = embedder.spec
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)

    def _device_decode(self, sample: ShardSample) -> torch.Tensor | None:
        """(3, H, W) uint8 on the device, or None when the CPU decoder must handle it."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if sample.ext.lower() not in JPEG_EXTS:
            return None
        try:
            with Image.open(io.BytesIO(sample.image)) as im:  # header only: size and EXIF, no pixels
                w, h = im.size
                rotated = im.getexif().get(EXIF_ORIENTATION, 1) != 1
            if rotated or w * h > self.max_pixels or im.mode == "CMYK":
                return None
            data = torch.frombuffer(bytearray(sample.image), dtype=torch.uint8)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except (OSError, RuntimeError, ValueError):
            return None  # let the CPU decoder give the one, shared error message

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        mode = self.embedder.spec.interpolation
        x = F.interpolate(x, size=size, mode=mode, antialias=mode in ("bilinear", "bicubic"))
        return x.round().clamp_(0, 255)  # PIL resizes uint8 images: same rounding

    def __call__(self, sample: ShardSample) -> Prepared:
        img = self._device_decode(sample)
        if img is None:
            try:
                rgb = self.decode(sample)
            except ImageDecodeError as exc:
                return Prepared(sample.key, sample.meta, error=str(exc))
            img = torch.tensor(rgb).permute(2, 0, 1).to(self.device)  # decode_image may return a read-only view
        _, h, w = img.shape
        s = self.embedder.spec.image_size
        x = img[None].float()  # (1, 3, H, W), 0..255
        # open_clip's eval transform: shortest side to S, then a centre crop of S x S
        scale = s / min(h, w)
        rh, rw = max(s, round(h * scale)), max(s, round(w * scale))
        glob = self._resize(x, (rh, rw)) if (rh, rw) != (h, w) else x
        top, left = (rh - s) // 2, (rw - s) // 2
        glob = glob[:, :, top : top + s, left : left + s]
        if min(h, w) < self.rule.size:  # padding is rare: take the host grid so the rule stays in one place
            patches_np, boxes = crop_patches(img.permute(1, 2, 0).cpu().numpy(), self.rule)
            patches = torch.from_numpy(patches_np).to(self.device).permute(0, 3, 1, 2).float()
        else:
            boxes = grid_boxes(h, w, self.rule)
            patches = torch.stack([x[0, :, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes.tolist()])
        if patches.shape[-1] != s:
            patches = self._resize(patches, (s, s))
        crops = (torch.cat([glob, patches]) / 255.0 - self.mean) / self.std  # (1 + P, 3, S, S)
        return Prepared(sample.key, sample.meta, crops, boxes, h, w)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """`map(fn, items)` on `workers` threads, in input order, with a bounded number of items in flight.

    Threads, not processes: Dask workers are daemonic and cannot fork; PIL and torch release the GIL.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    window: deque[Future] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= workers * PREFETCH_PER_WORKER:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


# --- mapper: full batches through the encoder -------------------------------------------------------------


class CropBatcher:
    """Packs crops of consecutive images into full batches of `batch_size`; the last one may be short.

    Batches hold crops of one shard only, so the bits of a shard's vectors do not depend on which worker
    ran it or what else it ran.
    """

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> None:
        self.embed, self.batch_size = embed, batch_size
        self.pending: list[torch.Tensor] = []
        self.n_pending = 0
        self.out: list[np.ndarray] = []

    def add(self, crops: torch.Tensor) -> None:
        self.pending.append(crops)
        self.n_pending += len(crops)
        while self.n_pending >= self.batch_size:
            batch = torch.cat(self.pending)
            self._run(batch[: self.batch_size])
            rest = batch[self.batch_size :]
            self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def _run(self, batch: torch.Tensor) -> None:
        self.out.append(_to_f16(self.embed(batch)))  # (B, D)

    def finish(self, dim: int) -> np.ndarray:
        """(total crops, D) float16 in the order they were added."""
        if self.pending:
            self._run(torch.cat(self.pending))
            self.pending, self.n_pending = [], 0
        return np.concatenate(self.out) if self.out else np.zeros((0, dim), np.float16)


@dataclass(frozen=True)
class ExtractOptions:
    """How a shard is turned into vectors; equal options give equal bits."""

    batch_size: int = 256  # crops per encoder call
    decode_workers: int = 2  # decode threads inside a task
    gpu_decode: bool = False
    device: str = "cpu"
    rule: PatchRule = DEFAULT_RULE
    max_pixels: int = DEFAULT_MAX_PIXELS


def extract_features(
    samples: Iterable[ShardSample], embedder: Embedder, name: str, sha256: str, opts: ExtractOptions
) -> ShardFeatures:
    """A shard's samples -> its rows (global, local, boxes, captions, metadata); unreadable images skipped."""
    prepare = (
        DeviceCrops(embedder, opts.device, opts.rule, opts.max_pixels)
        if opts.gpu_decode
        else (CpuCrops(embedder, opts.rule, opts.max_pixels))
    )
    batcher = CropBatcher(embedder.get_image_embedding, opts.batch_size)
    kept: list[Prepared] = []
    skipped: list[dict] = []
    n_samples = 0
    for prep in ordered_map(prepare, samples, opts.decode_workers):
        n_samples += 1
        if prep.error:
            log.warning("shard %s: skipping unreadable image %s: %s", name, prep.key, prep.error)
            skipped.append({"key": prep.key, "reason": prep.error})
            continue
        batcher.add(prep.crops)
        prep.crops = None  # the batcher holds what it needs; keep only metadata
        kept.append(prep)
    spec = embedder.spec
    vectors = batcher.finish(spec.embed_dim)  # (sum(1 + P_i), D)
    n_patches = np.array([len(p.boxes) for p in kept], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(n_patches + 1)])[:-1]  # each image's global row in `vectors`
    is_global = np.zeros(len(vectors), dtype=bool)
    is_global[starts] = True
    metas = [p.meta for p in kept]
    captions = [str(m.get("caption") or "") for m in metas]
    caption = caption_mask = None
    if spec.has_text:
        caption_mask = np.array([bool(c) for c in captions], dtype=bool)
        caption = np.zeros((len(kept), spec.embed_dim), np.float16)
        caption[caption_mask] = embed_texts(embedder, [c for c in captions if c], opts.batch_size)
    return ShardFeatures(
        name=name,
        sha256=sha256,
        n_samples=n_samples,
        keys=[p.key for p in kept],
        label=np.array([int(m["label"]) for m in metas], dtype=np.int8),
        generator=[str(m.get("generator") or "") for m in metas],
        split=[str(m.get("split") or "") for m in metas],
        width=np.array([p.width for p in kept], dtype=np.int32),
        height=np.array([p.height for p in kept], dtype=np.int32),
        global_=vectors[is_global],
        local=vectors[~is_global],
        local_offsets=np.concatenate([[0], np.cumsum(n_patches)]).astype(np.int64),
        boxes=np.concatenate([p.boxes for p in kept]) if kept else np.zeros((0, 4), np.int32),
        caption=caption,
        caption_mask=caption_mask,
        skipped=skipped,
    )


# --- runner: one task per shard --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to extract one shard into the store (picklable)."""

    shard: str  # tar path, readable from the worker
    store: str
    embedder: Callable[[], Embedder]
    opts: ExtractOptions = field(default_factory=ExtractOptions)
    torch_threads: int = 1  # fixed, so the bits do not depend on how many cores a worker happens to have
    zarr_concurrency: int = 4
    read: Callable[[str | Path], Iterable[ShardSample]] = iter_shard

    @property
    def name(self) -> str:
        return shard_name(self.shard)


@dataclass
class ShardSummary:
    name: str
    n_images: int
    n_skipped: int
    seconds: float
    pid: int
    host: str


def _fault_hook(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        log.warning("%s=%s: killing the extraction's process group now (fault injection)", FAULT_ENV, name)
        os.killpg(os.getpgid(0), signal.SIGKILL)


def extract_shard(job: ShardJob) -> ShardSummary:
    """Read, embed and write one shard: rows first, then the done marker (exactly once per shard)."""
    start = time.perf_counter()
    torch.set_num_threads(job.torch_threads)
    limit_zarr_concurrency(job.zarr_concurrency)
    sha = file_sha256(job.shard)
    features = extract_features(job.read(job.shard), worker_embedder(job.embedder), job.name, sha, job.opts)
    writer = FeatureStoreWriter(job.store)
    writer.write_rows(features)
    _fault_hook(job.name)
    writer.mark_done(features)
    seconds = time.perf_counter() - start
    log.info("shard %s: %d images (%d skipped) in %.1fs", job.name, len(features.keys), len(features.skipped), seconds)
    return ShardSummary(job.name, len(features.keys), len(features.skipped), seconds, os.getpid(), socket.gethostname())


# --- distributor: inline, or one Dask task per shard --------------------------------------------------------


class InlineDistributor:
    """Runs every task in this process, one after the other (`--workers 0`; debugging, one-GPU runs)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def on_every_worker(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def map_unordered(
        self, fn: Callable[[Any], Any], items: list[Any]
    ) -> Iterator[tuple[Any, Any, BaseException | None]]:
        for item in items:
            try:
                yield item, fn(item), None
            except Exception as exc:  # reported per shard by the runner; the other shards still run
                yield item, None, exc

    def close(self) -> None:
        pass


class DaskDistributor(InlineDistributor):
    """One Dask task per item: an in-process LocalCluster of `workers` processes, or the cluster at `scheduler`."""

    def __init__(self, workers: int, scheduler: str | None = None) -> None:
        from distributed import Client, LocalCluster

        self.cluster = None
        if scheduler:
            self.client = Client(scheduler)
        else:
            # processes, one thread each: a task's torch threads are set by the task itself
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
            self.client = Client(self.cluster)
            self.client.wait_for_workers(workers)
        log.info("dask: %s", self.client)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False).result()

    def on_every_worker(self, fn: Callable[..., Any], *args: Any) -> None:
        self.client.run(fn, *args)

    def map_unordered(
        self, fn: Callable[[Any], Any], items: list[Any]
    ) -> Iterator[tuple[Any, Any, BaseException | None]]:
        from distributed import as_completed

        futures = {self.client.submit(fn, item, pure=False): item for item in items}
        for fut in as_completed(futures):
            item = futures[fut]
            if fut.status == "error":
                yield item, None, fut.exception()
            else:
                yield item, fut.result(), None

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_distributor(workers: int, scheduler: str | None) -> InlineDistributor:
    if scheduler or workers > 0:
        return DaskDistributor(workers, scheduler)
    return InlineDistributor()


def decoder_record(gpu_decode: bool) -> dict:
    return {"cpu": DECODER_ID, "gpu": GPU_DECODER_ID if gpu_decode else None}
