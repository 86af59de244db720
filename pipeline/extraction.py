"""CLIP extraction split by role: read (decode + crop in threads) -> map (batched encoder) -> write, one task per shard.

The roles are injected (a reader of shard samples, an embedder factory, a store writer), so tests swap any
of them. A shard goes through `begin_shard` (its reading starts, possibly while another shard is embedded),
`compute_shard` and `write_shard`: `extract_shard` runs the three as a Dask task; the in-process distributor
runs them itself, overlapping them across shards.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semspai.pipeline.clip import ClipSpec, load_embedder
from semspai.pipeline.config import PROMPT_TEMPLATE, ConfigError
from semspai.pipeline.grid import DEFAULT_RULE, PatchRule, crop_patches, distinct_boxes, grid_boxes
from semspai.pipeline.host import worker_environment
from semspai.pipeline.iterate import Background, batched_by_weight, ordered_map
from semspai.pipeline.progress import configure_logging
from semspai.store.features import ShardFeatures, done_marker, sidecar_fields
from semspai.store.images import (
    DECODER_ID,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    JpegFrame,
    decode_image,
    jpeg_frame,
)
from semspai.store.shards import INDEX_NAME, ShardError, ShardSample, file_sha256, iter_shard, shard_name
from semspai.store.writer import uses_writer_process, write_shard_rows, writer_process

log = logging.getLogger(__name__)

# JPEGs decoded by torchvision on the device, crops resized there; other formats and EXIF- or XMP-rotated,
# RGB-coded, 12-bit, lossless and arithmetic-coded JPEGs still go through DECODER_ID (v2: XMP rotation and
# these JPEG kinds; v1 sent them to the device). Part of the store identity: its pixels differ slightly from PIL's.
GPU_DECODER_ID = "torchvision-decode_jpeg-rgb+torch-bicubic-aa-v2"
JPEG_EXTS = ("jpg", "jpeg")
EXIF_ORIENTATION = 0x0112
# pixels per batched device decode (128 images of 512 x 512): each chunk's decoded images and crops live on
# the device in float32 (about 25 bytes a pixel at 512 px, more for large images), DEVICE_AHEAD + 1 at a time
# per shard (the shard read ahead of the one being embedded holds as many more)
DEVICE_CHUNK_PIXELS = 128 * 512 * 512
DEVICE_AHEAD = 2  # chunks decoded ahead of the encoder


class Embedder(Protocol):
    spec: ClipSpec

    def preprocess_global(self, rgb: np.ndarray) -> torch.Tensor: ...

    def preprocess_patches(self, patches: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor: ...

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
_BUILDING = threading.Lock()


def worker_embedder(factory: Callable[[], Embedder]) -> Embedder:
    """The embedder of this process, built on first use (once, whichever task thread asks first) and kept for
    the worker's later tasks."""
    with _BUILDING:
        if factory not in _EMBEDDERS:
            _EMBEDDERS[factory] = factory()
        return _EMBEDDERS[factory]


def warm_up(factory: Callable[[], Embedder], log_level: int = logging.WARNING, dask_worker: Any = None) -> None:
    """Build this worker's embedder now (returns nothing: the embedder never travels), and start its store writer
    process, which imports Zarr meanwhile. A Dask worker process logs in the client's format, at its level
    (in the client's own process, logging stays as its caller set it up). Dask's `Client.run` passes
    `dask_worker`; an in-process run does not."""
    if dask_worker is not None:
        configure_logging(log_level)
    if uses_writer_process():
        writer_process()
    worker_embedder(factory)


DEFAULT_PROMPTS = Path(str(resources.files("semspai.configs") / "prompts" / "imagenet_classnames.txt"))


def prompt_bank(path: str | Path = DEFAULT_PROMPTS) -> list[str]:
    """Class names (one a line; the ImageNet ones by default) -> prompt texts `a photo of a {name}.`."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompts {path}: cannot read the class-name file ({exc})") from exc
    if not names:
        raise ConfigError(f"--prompts {path}: the class-name file is empty")
    return [PROMPT_TEMPLATE.format(n) for n in names]


def _to_f16(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float16).cpu().numpy()


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
        glob = self.embedder.preprocess_global(rgb)  # (3, S, S)
        crops = torch.empty((1 + len(patches), *glob.shape))  # filled in place: one float copy of a large image
        crops[0] = glob
        self.embedder.preprocess_patches(patches, out=crops[1:])
        return Prepared(sample.key, sample.meta, crops, boxes, rgb.shape[0], rgb.shape[1])


@dataclass
class Probed:
    """A sample checked as it is read: JPEG bytes for the device decoder; else, after `DeviceCrops.host`, host
    pixels or an error."""

    sample: ShardSample
    data: torch.Tensor | None = None  # (n_bytes,) uint8: a JPEG the device decodes
    rgb: np.ndarray | None = None  # (H, W, 3) uint8 from the decode function (other formats, rotated JPEGs)
    error: str = ""
    pixels: int = 0  # width x height, where known


def _raise_out_of_memory(exc: RuntimeError) -> None:
    """Re-raise a device decode's out-of-memory error: torchvision reports it as any decode failure, and taking
    it as one would send images to the CPU decoder by memory pressure, not by what they are."""
    if "out of memory" in str(exc).lower():
        raise exc


class DeviceCrops(CpuCrops):
    """JPEG decode with torchvision on `device` (nvjpeg on CUDA, many images per call) and crops cut there.

    Three steps: `probe` (as samples are read: a header check), `host` (decode threads: the decode function
    for what the device cannot take) and `prepare` (one thread: a batched decode of a chunk of JPEGs, then
    the global view and the grid patches of each group of equal-sized images in a few batched kernels).
    Matches CpuCrops within the tolerance tests/test_extract.py states, not bit for bit (another IDCT and
    torch's bicubic instead of PIL's), which is why the store records GPU_DECODER_ID. Only `prepare` waits for
    the device: for its own stream, in the producer thread.
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
        # CUDA: chunks are decoded and cut on a stream of their own, for the stream current here (see `prepare`)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.consumer = torch.cuda.current_stream(self.device) if cuda else None

    def probe(self, sample: ShardSample) -> Probed:
        """A JPEG the device can take, from its header alone (microseconds); else not yet decided (`host`)."""
        # the frame header from the JPEG markers alone: an order of magnitude cheaper than opening it with PIL
        frame = jpeg_frame(sample.image) if sample.ext.lower() in JPEG_EXTS else None
        if frame is not None and self._device_can_take(sample.image, frame):
            # a view of the bytes read from the tar (writable, so no copy is needed); other buffers are copied
            image = sample.image if isinstance(sample.image, bytearray) else bytearray(sample.image)
            data = torch.frombuffer(image, dtype=torch.uint8)
            return Probed(sample, data=data, pixels=frame.width * frame.height)
        return Probed(sample)

    def host(self, probed: Probed) -> Probed:
        """What the device does not take, decoded by the decode function (milliseconds: in reader threads)."""
        if probed.data is not None:
            return probed
        try:
            rgb = self.decode(probed.sample)
        except ImageDecodeError as exc:
            return Probed(probed.sample, error=str(exc))
        return Probed(probed.sample, rgb=rgb, pixels=rgb.shape[0] * rgb.shape[1])

    def _device_can_take(self, data: bytes, frame: JpegFrame) -> bool:
        """An 8-bit baseline, extended or progressive JPEG, grey or YCbCr, within the pixel limit, with an end
        marker and no EXIF or XMP rotation; anything else (RGB-coded, 12-bit, lossless, arithmetic-coded: what
        nvjpeg may refuse or read otherwise, and anything unsure) goes to the decode function, which also gives
        the one, shared error message."""
        if frame.components not in (1, 3) or frame.width * frame.height > self.max_pixels:
            return False
        if frame.marker not in (0xC0, 0xC1, 0xC2) or frame.precision != 8 or frame.adobe_transform == 0:
            return False
        # no end-of-image marker (trailing zero padding allowed): maybe truncated, and nvjpeg may not say so
        end = len(data)
        while end and data[end - 1] == 0:
            end -= 1
        if data[end - 2 : end] != b"\xff\xd9":
            return False
        if frame.has_exif:
            try:
                with Image.open(io.BytesIO(data)) as im:  # header only: the orientation tag
                    return im.getexif().get(EXIF_ORIENTATION, 1) == 1
            except (OSError, ValueError):
                return False
        return True

    def _decode_jpegs(self, probes: list[Probed]) -> list[torch.Tensor | None]:
        """(3, H, W) uint8 device tensors, one call for the chunk; an image nvjpeg refuses gets None."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if not probes:
            return []
        try:
            return list(decode_jpeg([p.data for p in probes], mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError as exc:  # one bad image fails the whole call: find it alone
            _raise_out_of_memory(exc)
        out: list[torch.Tensor | None] = []
        for p in probes:
            try:
                out.append(decode_jpeg(p.data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError as exc:
                _raise_out_of_memory(exc)
                out.append(None)
        refused = [p.sample.key for p, x in zip(probes, out, strict=True) if x is None]
        if refused:
            log.warning("nvjpeg could not decode %d JPEG(s) (e.g. %s); the CPU decoder takes them", len(refused),
                        refused[0])  # fmt: skip
        return out

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        mode = self.embedder.spec.interpolation
        x = F.interpolate(x, size=size, mode=mode, antialias=mode in ("bilinear", "bicubic"))
        return x.round().clamp_(0, 255)  # PIL resizes uint8 images: same rounding

    def _crops(self, x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(G, 3, H, W) float 0..255 images of one size -> (G, 1 + P, 3, S, S) normalised crops, boxes (P, 4)."""
        g, _, h, w = x.shape
        s = self.embedder.spec.image_size
        # open_clip's eval transform: shortest side to S, then a centre crop of S x S
        scale = s / min(h, w)
        rh, rw = max(s, round(h * scale)), max(s, round(w * scale))
        glob = self._resize(x, (rh, rw)) if (rh, rw) != (h, w) else x
        top, left = (rh - s) // 2, (rw - s) // 2
        glob = glob[:, :, top : top + s, left : left + s]
        boxes = grid_boxes(h, w, self.rule)
        if min(h, w) < self.rule.size:  # padding is rare: take the host grid so the rule stays in one place
            hwc = x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            patches = torch.from_numpy(np.stack([crop_patches(im, self.rule)[0] for im in hwc])).to(self.device)
            patches = patches.permute(0, 1, 4, 2, 3).float()  # (G, P, 3, size, size)
        else:
            patches = torch.stack([x[:, :, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes.tolist()], dim=1)
        n = patches.shape[1]
        if patches.shape[-1] != s:
            patches = self._resize(patches.flatten(0, 1), (s, s)).view(g, n, 3, s, s)
        crops = torch.cat([glob[:, None], patches], dim=1)  # (G, 1 + P, 3, S, S)
        crops = (crops.flatten(0, 1) / 255.0 - self.mean) / self.std
        return crops.view(g, 1 + n, 3, s, s), boxes

    def prepare(self, probes: list[Probed]) -> list[Prepared]:
        """Crops for a chunk of probed samples, in their order, ready for the stream that was current where this
        object was made (any thread may call this).

        On CUDA the chunk runs on this object's own stream, which is synchronised before the crops are handed
        over. nvJPEG writes its outputs without waiting for work queued on any stream (pytorch/vision#9606), and
        the caching allocator hands out a block the moment it is freed on its stream: a decode on the consumer's
        stream would get blocks that the consumer's queued kernels still read, and overwrite them. On this
        stream a decode only gets blocks of this object's finished work, or crops the consumer has released
        (`record_stream`: not before the consumer's kernels on them have run).
        """
        if self.stream is None:
            return self._prepare(probes)
        with torch.cuda.stream(self.stream):
            out = self._prepare(probes)
        self.stream.synchronize()  # the host waits (GIL released); the consumer's stream does not
        return out

    def _prepare(self, probes: list[Probed]) -> list[Prepared]:
        jpegs = [i for i, p in enumerate(probes) if p.data is not None]
        images: list[torch.Tensor | None] = [None] * len(probes)
        for i, img in zip(jpegs, self._decode_jpegs([probes[i] for i in jpegs]), strict=True):
            images[i] = img
        out: list[Prepared] = []
        for i, p in enumerate(probes):
            if images[i] is None and not p.error:
                rgb = p.rgb
                if rgb is None:
                    try:
                        rgb = self.decode(p.sample)
                    except ImageDecodeError as exc:
                        p.error = str(exc)
                if rgb is not None:  # decode_image may return a read-only view: copy
                    images[i] = torch.tensor(rgb).permute(2, 0, 1).to(self.device)
            out.append(Prepared(p.sample.key, p.sample.meta, error=p.error))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if img is not None:
                groups.setdefault(tuple(img.shape[1:]), []).append(i)
        for (h, w), idx in groups.items():
            crops, boxes = self._crops(torch.stack([images[i] for i in idx]).float())
            if self.consumer is not None:
                crops.record_stream(self.consumer)
            for j, i in enumerate(idx):
                out[i].crops, out[i].boxes, out[i].height, out[i].width = crops[j], boxes, h, w
        return out

    def __call__(self, sample: ShardSample) -> Prepared:
        return self.prepare([self.host(self.probe(sample))])[0]


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
        self.out: list[torch.Tensor] = []

    def add(self, crops: torch.Tensor) -> None:
        self.pending.append(crops)
        self.n_pending += len(crops)
        while self.n_pending >= self.batch_size:
            batch = torch.cat(self.pending)
            self._run(batch[: self.batch_size])
            rest = batch[self.batch_size :]
            self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def _run(self, batch: torch.Tensor) -> None:
        # float16 where the encoder ran; no copy to the host (and no wait for the device) until finish
        self.out.append(self.embed(batch).to(torch.float16))  # (B, D)

    def finish(self, dim: int) -> np.ndarray:
        """(total crops, D) float16 in the order they were added."""
        if self.pending:
            self._run(torch.cat(self.pending))
            self.pending, self.n_pending = [], 0
        return torch.cat(self.out).cpu().numpy() if self.out else np.zeros((0, dim), np.float16)


@dataclass(frozen=True)
class ExtractOptions:
    """How a shard is turned into vectors; equal options give equal bits."""

    batch_size: int = 256  # crops per encoder call
    decode_workers: int = 2  # decode threads inside a task
    gpu_decode: bool = False
    device: str = "cpu"
    rule: PatchRule = DEFAULT_RULE
    max_pixels: int = DEFAULT_MAX_PIXELS


def probed_samples(samples: Iterable[ShardSample], crops: DeviceCrops, workers: int) -> Iterator[Probed]:
    """Samples probed as they are read (a header check); the few the device cannot take are decoded on the
    host in `workers` threads; input order kept."""
    return ordered_map(crops.host, map(crops.probe, samples), workers, inline=lambda p: p.data is not None)


class PreparedStream(Protocol):
    """A shard's prepared samples, in order, and a way to stop making them (a generator, or `_EachOf`)."""

    def __iter__(self) -> Iterator[Prepared]: ...

    def __next__(self) -> Prepared: ...

    def close(self) -> None: ...


def prepared_samples(samples: Iterable[ShardSample], embedder: Embedder, opts: ExtractOptions) -> PreparedStream:
    """The shard's samples decoded and cropped, in order: on the host in `decode_workers` threads, or (with
    gpu_decode) probed as they are read, the few the device cannot take decoded in those threads, and the
    JPEGs decoded a chunk at a time on the device by a producer thread that keeps DEVICE_AHEAD chunks ready
    while the encoder runs. That producer starts now, before the first sample is asked for, so a shard can be
    read and decoded ahead of its turn at the encoder; closing the iterator (or dropping it) stops it."""
    if not opts.gpu_decode:
        return ordered_map(CpuCrops(embedder, opts.rule, opts.max_pixels), samples, opts.decode_workers)
    crops = DeviceCrops(embedder, opts.device, opts.rule, opts.max_pixels)
    chunks = batched_by_weight(
        probed_samples(samples, crops, opts.decode_workers), DEVICE_CHUNK_PIXELS, lambda p: p.pixels
    )
    return _EachOf(Background(map(crops.prepare, chunks), DEVICE_AHEAD))


class _EachOf(Iterator[Prepared]):
    """The samples of chunks made in the background, one by one; `close()` stops their producer at once, whether
    or not any was taken (a generator's close would not run its cleanup before its first item)."""

    def __init__(self, chunks: Background[list[Prepared]]) -> None:
        self.chunks = chunks
        self.samples = itertools.chain.from_iterable(chunks)

    def __next__(self) -> Prepared:
        return next(self.samples)

    def close(self) -> None:
        self.chunks.close()


def extract_features(
    samples: Iterable[ShardSample], embedder: Embedder, name: str, sha256: str, opts: ExtractOptions
) -> ShardFeatures:
    """A shard's samples -> its rows (global, local, boxes, captions, metadata); unreadable images skipped."""
    return features_of(prepared_samples(samples, embedder, opts), embedder, name, sha256, opts)


def features_of(
    prepared: Iterable[Prepared], embedder: Embedder, name: str, sha256: str, opts: ExtractOptions
) -> ShardFeatures:
    """A shard's prepared samples -> its rows; see extract_features."""
    batcher = CropBatcher(embedder.get_image_embedding, opts.batch_size)
    kept: list[Prepared] = []
    skipped: list[dict] = []
    rows: list[np.ndarray] = []  # per image: the batcher's row of its global crop and of each grid patch
    n_rows = n_samples = 0
    for prep in prepared:
        n_samples += 1
        if prep.error:
            log.warning("shard %s: skipping unreadable image %s: %s", name, prep.key, prep.error)
            skipped.append({"key": prep.key, "reason": prep.error})
            continue
        # a box given twice (a 224-px image's five crops are one) is embedded once and its vector copied
        first, inverse = distinct_boxes(prep.boxes)
        keep = [0, *(1 + first).tolist()]  # cut as slices: an index tensor would be copied to the device, waiting
        batcher.add(prep.crops if len(first) == len(inverse) else torch.cat([prep.crops[i : i + 1] for i in keep]))
        rows.append(n_rows + np.concatenate([[0], 1 + inverse]))
        n_rows += 1 + len(first)
        prep.crops = None  # the batcher holds what it needs; keep only metadata
        kept.append(prep)
    spec = embedder.spec
    vectors = batcher.finish(spec.embed_dim)  # (sum(1 + distinct P_i), D)
    if len(vectors) != sum(len(r) for r in rows):
        vectors = vectors[np.concatenate(rows)]  # (sum(1 + P_i), D)
    n_patches = np.array([len(p.boxes) for p in kept], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(n_patches + 1)])[:-1]  # each image's global row in `vectors`
    is_global = np.zeros(len(vectors), dtype=bool)
    is_global[starts] = True
    metas = [p.meta for p in kept]
    fields = [sidecar_fields(m) for m in metas]  # label, generator, split
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
        label=np.array([f[0] for f in fields], dtype=np.int8),
        generator=[f[1] for f in fields],
        split=[f[2] for f in fields],
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
    expected_sha256: str = ""  # what `semspai shard` recorded for this tar in index.json; empty: not known

    @property
    def name(self) -> str:
        return shard_name(self.shard)


@dataclass
class ShardSummary:
    name: str
    n_images: int
    n_skipped: int
    seconds: float
    pid: int  # of the process that wrote the shard
    host: str


@dataclass
class ShardReading:
    """A shard whose reading has begun (`begin_shard`): its sha256 is being hashed and, with gpu_decode, its
    first chunks are being decoded on the device, ahead of its turn at the encoder (`compute_shard`)."""

    job: ShardJob
    sha256: Future[str]
    prepared: PreparedStream

    def close(self) -> None:
        """Stop reading ahead (compute_shard does this when it is done; also for a shard never computed)."""
        self.prepared.close()


def begin_shard(job: ShardJob) -> ShardReading:
    """Start reading a shard: at the GPU's shard boundaries the next shard's first batches are then ready when the
    encoder finishes the shard before, instead of the device idling while they are read and decoded."""
    torch.set_num_threads(job.torch_threads)
    pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    sha = pool.submit(file_sha256, job.shard)  # hashlib releases the GIL: hashing overlaps the extraction
    pool.shutdown(wait=False)  # its thread ends with the hash
    return ShardReading(job, sha, prepared_samples(job.read(job.shard), worker_embedder(job.embedder), job.opts))


def compute_shard(reading: ShardReading) -> tuple[ShardFeatures, float]:
    """Embed one shard whose reading has begun: its rows in memory, and when this started (perf_counter)."""
    start = time.perf_counter()
    job = reading.job
    try:
        features = features_of(reading.prepared, worker_embedder(job.embedder), job.name, "", job.opts)
    finally:
        reading.close()
    sha = reading.sha256.result()
    if job.expected_sha256 and sha != job.expected_sha256:  # checked before anything of it is written
        raise ShardError(
            f"shard {job.name} ({job.shard}): its sha256 is not the one {INDEX_NAME} recorded when it was sharded "
            "(damaged or replaced since); rebuild it with `semspai shard ... --force`"
        )
    return dataclasses.replace(features, sha256=sha), start


def write_shard(job: ShardJob, features: ShardFeatures, start: float) -> ShardSummary:
    """A shard's rows into the store, then its done marker (exactly once per shard), by this process's writer
    process (store/writer.py; or here, with SEMSPAI_STORE_WRITER=thread or a memory:// store)."""
    try:
        writer_pid = write_shard_rows(job.store, features, job.zarr_concurrency)
    except Exception:
        # a worker Dask counted lost while it still ran may have marked the shard done meanwhile: then this
        # task's rows are that one's, and the shard is done
        done = already_done(job)
        if done is None:
            raise
        return done
    seconds = time.perf_counter() - start
    log.debug("shard %s: %d images (%d skipped) in %.1fs", job.name, len(features.keys), len(features.skipped), seconds)
    return ShardSummary(job.name, len(features.keys), len(features.skipped), seconds, writer_pid, socket.gethostname())


# one shard at a time is embedded in a process (they would share its device and encoder), and one more begins
# reading meanwhile (each reading ahead holds device memory: with more task threads, the others wait before
# beginning); a Dask worker's other task thread writes the shard before and then begins reading the next, as
# InlineDistributor's writer thread and read-ahead do
_COMPUTE = threading.Lock()
_AHEAD = threading.Lock()


def already_done(job: ShardJob) -> ShardSummary | None:
    """The summary of a shard done in the store (from the same tar, where its index recorded one), else None."""
    done = done_marker(job.store, job.name)
    if done is None or (job.expected_sha256 and done["sha256"] != job.expected_sha256):
        return None
    log.info("shard %s: already done in %s (a task run again after its worker was lost)", job.name, job.store)
    writer = done.get("writer", {})
    return ShardSummary(job.name, int(done["n_images"]), len(done.get("skipped", [])), 0.0,
                        int(writer.get("pid", 0)), str(writer.get("host", "")))  # fmt: skip


def extract_shard(job: ShardJob) -> ShardSummary:
    """Read, embed and write one shard: rows first, then the done marker (the task a Dask worker runs). A shard
    already done is not redone: Dask reruns the task of a worker lost after it marked the shard done and before
    its result reached the scheduler."""
    done = already_done(job)
    if done is not None:
        return done
    with _AHEAD:
        reading = begin_shard(job)  # while another task of this process still holds the encoder
        _COMPUTE.acquire()
    try:
        computed = compute_shard(reading)  # which closes the reading, whatever happens
    finally:
        _COMPUTE.release()
    return write_shard(job, *computed)


# --- distributor: inline, or one Dask task per shard --------------------------------------------------------

Outcome = tuple[Any, Any, BaseException | None]  # (item, result or None, exception or None)


class InlineDistributor:
    """Runs every task in this process, one after the other (`--workers 0`; debugging, one-GPU runs)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def on_every_worker(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)

    def map_shards(self, jobs: list[ShardJob]) -> Iterator[Outcome]:
        """Each shard extracted and written, in order. The next shard's reading begins while one is embedded (with
        gpu_decode its first chunks are then decoded ahead), and a shard's write (store/writer.py) runs in a
        thread while the next one is embedded (one write at a time, so shards still become done in order)."""
        with ThreadPoolExecutor(1, thread_name_prefix="store-writer") as writer, _ReadAhead(jobs) as readings:
            pending: tuple[ShardJob, Future] | None = None
            for job, reading in readings:
                try:
                    if isinstance(reading, Exception):
                        raise reading
                    computed: tuple[ShardFeatures, float] | Exception = compute_shard(reading)
                except Exception as exc:
                    computed = exc
                if pending is not None:
                    yield _outcome(*pending)
                    pending = None
                if isinstance(computed, Exception):
                    yield job, None, computed
                else:
                    pending = (job, writer.submit(write_shard, job, *computed))
            if pending is not None:
                yield _outcome(*pending)

    def close(self) -> None:
        pass


class _ReadAhead:
    """(job, its ShardReading, or the exception beginning it raised) in order; each shard's reading begins when
    the one before is handed out, so it runs ahead while that one is embedded. Leaving the block stops a
    reading that was begun but never handed out."""

    def __init__(self, jobs: list[ShardJob]) -> None:
        self.jobs = jobs
        self.ahead: ShardReading | Exception | None = None

    def _begin(self, job: ShardJob) -> ShardReading | Exception:
        try:
            return begin_shard(job)
        except Exception as exc:  # reported as this shard's failure, in its turn
            return exc

    def __iter__(self) -> Iterator[tuple[ShardJob, ShardReading | Exception]]:
        for i, job in enumerate(self.jobs):
            reading = self.ahead if self.ahead is not None else self._begin(job)
            self.ahead = self._begin(self.jobs[i + 1]) if i + 1 < len(self.jobs) else None
            yield job, reading

    def __enter__(self) -> _ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ahead is not None and not isinstance(self.ahead, Exception):
            self.ahead.close()
        self.ahead = None


class _NoComputeFailed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def quiet_task_failures() -> None:
    """In a Dask worker process: leave out distributed's log of a task that raised (its traceback and repr); the
    driver reports the shard's error in one line. Idempotent."""
    worker_log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _NoComputeFailed) for f in worker_log.filters):
        worker_log.addFilter(_NoComputeFailed())


def _outcome(job: ShardJob, write: Future) -> Outcome:
    try:
        return job, write.result(), None
    except Exception as exc:
        return job, None, exc


class DaskDistributor(InlineDistributor):
    """One Dask task per item: an in-process LocalCluster of `workers` processes, or the cluster at `scheduler`."""

    def __init__(self, workers: int, scheduler: str | None = None, gpus: list[str] | None = None) -> None:
        """`gpus`: CUDA_VISIBLE_DEVICES values handed to the local workers in turn, so that each one sees
        (and its `cuda` means) its own GPU, as dask-cuda's workers do."""
        from distributed import Client, LocalCluster

        self.cluster = None
        if scheduler:
            try:
                self.client = Client(scheduler)
            except (OSError, ValueError) as exc:  # refused, timed out, or not an address
                raise ConfigError(f"--scheduler {scheduler}: cannot reach a Dask scheduler there ({exc})") from exc
        else:
            # processes; a task's torch threads are set by the task itself. Two task threads: one shard is
            # embedded while the one before is written (`extract_shard` lets one compute at a time)
            import dask

            # the workers are this command's own processes: they get its allocator settings, as variables that the
            # nanny sets before it starts them (Dask's own MALLOC_TRIM_THRESHOLD_ would return freed memory at once)
            spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **worker_environment()}
            with dask.config.set({"distributed.nanny.pre-spawn-environ": spawn}):  # until every worker is up
                self.cluster = LocalCluster(
                    n_workers=0 if gpus else workers, threads_per_worker=2, processes=True, dashboard_address=None
                )
                if gpus:
                    for i in range(workers):
                        ((name, spec),) = self.cluster.new_worker_spec().items()  # the cluster's shared template
                        env = {**spec["options"].get("env", {}), "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}
                        self.cluster.worker_spec[name] = {**spec, "options": {**spec["options"], "env": env}}
                    self.cluster.scale(workers)
                self.client = Client(self.cluster)
                self.client.wait_for_workers(workers)
            if not log.isEnabledFor(logging.DEBUG):  # our own workers: a failed shard is ours to report, once
                self.client.run(quiet_task_failures)
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

    def map_shards(self, jobs: list[ShardJob]) -> Iterator[Outcome]:
        """One task per shard, extracted and written by whichever worker takes it, as they finish."""
        return self.map_unordered(extract_shard, jobs)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_distributor(workers: int, scheduler: str | None, gpus: list[str] | None = None) -> InlineDistributor:
    if scheduler or workers > 0:
        return DaskDistributor(workers, scheduler, gpus)
    return InlineDistributor()


def decoder_record(gpu_decode: bool) -> dict:
    return {"cpu": DECODER_ID, "gpu": GPU_DECODER_ID if gpu_decode else None}
