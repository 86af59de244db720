"""Training data: shard samples decoded, cut on the patch grid, augmented, and joined with the feature store by key."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from semspai.pipeline.augment import AugDraws, choose_cells
from semspai.pipeline.config import AugConfig
from semspai.pipeline.grid import crop_patches
from semspai.pipeline.iterate import batched
from semspai.store.features import FeatureStore, FeatureStoreError
from semspai.store.images import ImageDecodeError, decode_image
from semspai.store.manifest import unique_files
from semspai.store.shards import ShardSample, iter_shard, shard_name, shard_sidecars

log = logging.getLogger(__name__)

PROMPT_MATCH_ROWS = 65536  # global vectors matched against the prompt bank at once: bounds the (rows, K) scores


class DataError(ValueError):
    """Training data cannot be assembled as asked; the message names the split, shard or key and the fix."""


@dataclass
class SplitPlan:
    """The samples of one split an epoch visits: per shard, the kept keys in stored order."""

    split: str
    keys: dict[Path, list[str]]  # shard tar -> keys of this split (after DATA.GENERATORS), stored order
    labels: dict[str, int]  # key -> 0 real / 1 fake
    n_missing: int = 0  # samples skipped because the store lacks them (DATA.SKIP_MISSING)
    generators: dict[str, int] = field(default_factory=dict)  # generator -> its fakes in the plan

    def __len__(self) -> int:
        return sum(len(k) for k in self.keys.values())


class StoreJoin:
    """The store rows training needs, read into memory once before any DataLoader worker starts, so workers
    never open Zarr (its event-loop thread does not survive a fork).

    The semantic-consistency target of a sample is its caption vector when the store has one, else the
    prompt-bank vector that best matches its global image vector (zero-shot CLIP's pick for the image).
    """

    def __init__(
        self,
        store: FeatureStore,
        need_global: bool,
        need_local: bool,
        need_text: bool,
        spill_dir: Path | None = None,  # memory-map the local rows from copies here (see local_spill_dir)
    ) -> None:
        self.path = store.path
        self.embed_dim = store.embed_dim
        self.index = {k: i for i, k in enumerate(store.keys)}
        if len(self.index) != len(store.keys):
            store.index_of("")  # the store's own check names the duplicated key
        self.need_global, self.need_local, self.need_text = need_global, need_local, need_text
        self.store = store if need_local else None
        if need_local:
            store.preload_local(spill_dir)
        self.global_ = store.global_vectors() if need_global or need_text else None  # (N, D) float16
        self.text: np.ndarray | None = self._text_targets(store) if need_text else None  # (N, D) float16

    def _text_targets(self, store: FeatureStore) -> np.ndarray:
        prompts = store.prompt_vectors()  # (K, D)
        if prompts is None or not len(prompts):
            raise DataError(f"feature store {store.path} holds no text vectors (its encoder has no text tower)")
        bank = prompts.astype(np.float32)
        best = (
            np.concatenate(
                [
                    (self.global_[lo : lo + PROMPT_MATCH_ROWS].astype(np.float32) @ bank.T).argmax(axis=1)
                    for lo in range(0, len(self.global_), PROMPT_MATCH_ROWS)
                ]
            )
            if len(self.global_)
            else np.zeros(0, np.int64)
        )
        text = prompts[best]  # (N, D)
        n_caption = 0
        for i in range(len(text)):
            caption = store.caption_vector(i)
            if caption is not None:
                text[i] = caption
                n_caption += 1
        log.info("semantic targets: %d caption vectors, %d best-matching prompts", n_caption, len(text) - n_caption)
        return text

    def vectors(
        self, where: str, key: str, boxes: np.ndarray, cells: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(global (D,), local of `cells` (k, D), text target (D,)) of one sample, each None when not needed.

        `boxes` (P, 4) are the sample's grid boxes as cut now: they must equal the store's, row for row,
        or the local vectors would describe other pixels.
        """
        try:
            row = self.index[key]
        except KeyError:
            raise FeatureStoreError(f"{where}: sample {key} is not in feature store {self.path}") from None
        local = None
        if self.need_local:
            stored = self.store.boxes(row)
            if not np.array_equal(stored, boxes):
                raise DataError(
                    f"{where}: sample {key} has {len(boxes)} grid patches but its store rows describe "
                    f"{len(stored)} other boxes; the store {self.path} was made with another patch rule or from "
                    "other pixels: extract it again"
                )
            local = self.store.local_vectors(row)[cells]
        return (self.global_[row] if self.need_global else None, local, self.text[row] if self.need_text else None)


STORE_CACHE_DIR = ".store-cache"  # in a run's (or eval's) out dir: memory-mapped copies of a large store's rows


def local_spill_dir(store: FeatureStore, memory_gb: float, where: Path) -> Path | None:
    """None when the store's local rows fit in `memory_gb`; else `where`, emptied, to memory-map them from."""
    nbytes = store.local_nbytes()
    if nbytes <= memory_gb * 2**30:
        return None
    shutil.rmtree(where, ignore_errors=True)  # a killed run's copies: made again, they may be of another store
    where.mkdir(parents=True)
    log.info(
        "store %s: %.1f GiB of local vectors > DATA.STORE_MEMORY_GB=%g: memory-mapped from copies in %s",
        store.path,
        nbytes / 2**30,
        memory_gb,
        where,
    )
    return where


def count_text(generators: dict[str, int]) -> str:
    """'biggan 12, stylegan 9' (a fake with no generator counts as '(none)')."""
    return ", ".join(f"{g or '(none)'} {n}" for g, n in generators.items()) or "none"


def plan_split(
    shards: list[Path],
    split: str,
    generators: list[str],
    join: StoreJoin | None,
    skip_missing: bool,
    missing_hint: str = "or set DATA.SKIP_MISSING=true",
    shards_are: str = "the given shards",
) -> SplitPlan:
    """List the samples of `split` from the shards' sidecars (no image is read): reals always, fakes of
    `generators` only (all when empty); each must be in the store when one is given (else an error ending
    with `missing_hint`). Each of `generators` must have fakes somewhere in `shards` (a name nothing has is a
    typo), and no key may be in two tars (a tar named twice counts once). Errors call the tars `shards_are`."""
    wanted = set(generators)
    shards = unique_files(shards)  # a tar named twice (or by two paths) counts once, under the name it had first
    keys: dict[Path, list[str]] = {}
    labels: dict[str, int] = {}
    missing: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    fake_generators: set[str] = set()  # in any split: a name in DATA.GENERATORS that is none of these is a typo
    holder: dict[str, Path] = {}  # key -> the tar it was first seen in (tars of one name may be two copies)
    for path in shards:
        kept = []
        name = shard_name(path)
        for key, meta in shard_sidecars(path):
            if holder.setdefault(key, path) != path:
                raise DataError(
                    f"{path}: sample {key} is also in {holder[key]}: the shards hold the same images twice (sharded "
                    "twice, or a copy?), which would count them twice; leave one copy out of --shards"
                )
            label = int(meta["label"])
            if label == 1:
                fake_generators.add(meta.get("generator", ""))
            if meta.get("split") != split or (label == 1 and wanted and meta.get("generator") not in wanted):
                continue
            if join is not None and key not in join.index:
                missing.append((name, key))
                continue
            kept.append(key)
            labels[key] = label
            if label == 1:
                gen = meta.get("generator", "")
                counts[gen] = counts.get(gen, 0) + 1
        if kept:
            keys[path] = kept
    if missing and not skip_missing:
        name, key = missing[0]
        raise DataError(
            f"shard {name}: sample {key} is not in feature store {join.path} ({len(missing)} {split} sample(s) "
            f"missing); run `semspai extract-clip` on these shards into that store, {missing_hint}"
        )
    if missing:
        log.warning("%s: skipped %d sample(s) absent from the store (DATA.SKIP_MISSING)", split, len(missing))
    unknown = sorted(wanted - fake_generators)
    if unknown:
        raise DataError(
            f"DATA.GENERATORS: no fake image of {shards_are} comes from {unknown[0]!r} "
            f"(their generators: {', '.join(sorted(fake_generators)) or 'none'})"
        )
    plan = SplitPlan(
        split=split, keys=keys, labels=labels, n_missing=len(missing), generators=dict(sorted(counts.items()))
    )
    if not len(plan):
        which = f" with DATA.GENERATORS={','.join(generators)}" if generators else ""
        raise DataError(f"split {split!r} is empty{which} in {shards_are}")
    if len(set(labels.values())) < 2:
        only = "real" if 0 in labels.values() else "fake"
        raise DataError(f"split {split!r} holds only {only} images; it needs both reals and fakes")
    return plan


@dataclass
class Sample:
    key: str
    label: int
    patches: np.ndarray  # (P, S, S, 3) uint8, the chosen grid cells after augmentation
    boxes: np.ndarray  # (P, 4) int32, the cells' boxes in the padded image (their store rows' boxes)
    global_vec: np.ndarray | None  # (D,) float16
    local_vec: np.ndarray | None  # (P, D) float16, row j describes the original pixels of boxes[j]
    text_vec: np.ndarray | None  # (D,) float16 semantic-consistency target
    aug: AugDraws | None = None  # drawn for the patches but not yet applied (View.aug_on_device)


@dataclass
class TrainBatch:
    patches: torch.Tensor  # (N, S, S, 3) uint8 as cut (and augmented, unless `aug`), all samples' patches packed
    counts: torch.Tensor  # (B,) int64, on the CPU
    labels: torch.Tensor  # (B,) float32, 1 = fake
    boxes: torch.Tensor  # (N, 4) int32
    keys: list[str]
    global_vec: torch.Tensor | None  # (B, D) float32
    local_vec: torch.Tensor | None  # (N, D) float32
    text_vec: torch.Tensor | None  # (B, D) float32
    aug: AugDraws | None = None  # the patches' augmentation, to apply on the training device


def _packed(rows: list[np.ndarray], concat: bool, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """The rows concatenated (or stacked) as `dtype`; in page-locked memory when `pin`, so that the copy to a
    GPU runs while the host goes on (from pageable memory the host waits for the device's queued work first)."""
    shape = (sum(len(r) for r in rows), *rows[0].shape[1:]) if concat else (len(rows), *rows[0].shape)
    out = torch.empty(shape, dtype=dtype, pin_memory=pin)
    (np.concatenate if concat else np.stack)(rows, out=out.numpy())
    return out


def _vectors(rows: list[np.ndarray | None], concat: bool, pin: bool) -> torch.Tensor | None:
    return None if rows[0] is None else _packed(rows, concat, torch.float32, pin)


def collate(samples: list[Sample], pin: bool = False) -> TrainBatch:
    """Pack samples of any patch count: patches concatenated, `counts` says which belong to which image.

    Patches stay uint8 here: they become float on the model's device (`detector.unit_pixels`), so the loader's
    host work and the copy to the device are a quarter of what float32 would cost. `pin` (for a CUDA device):
    patches and vectors in page-locked memory.
    """
    return TrainBatch(
        patches=_packed([s.patches for s in samples], True, torch.uint8, pin),
        counts=torch.tensor([len(s.patches) for s in samples], dtype=torch.int64),
        labels=torch.tensor([s.label for s in samples], dtype=torch.float32),
        boxes=torch.from_numpy(np.concatenate([s.boxes for s in samples])),
        keys=[s.key for s in samples],
        global_vec=_vectors([s.global_vec for s in samples], False, pin),
        local_vec=_vectors([s.local_vec for s in samples], True, pin),
        text_vec=_vectors([s.text_vec for s in samples], False, False),  # stays on the host (the loss groups it)
        aug=AugDraws.cat([s.aug for s in samples]) if samples[0].aug is not None else None,
    )


def key_seed(key: str) -> int:
    """A stable 64-bit number for a sample key (Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class View:
    """How a sample is turned into patches: training views draw cells and augment; evaluation views do not."""

    max_patches: int = 0  # 0 = every grid cell (what eval and predict see)
    aug: AugConfig | None = None
    shuffle_buffer: int = 0  # raw samples mixed within a worker's stream; 0 keeps the stored order
    # augmentation drawn in the loader but applied on the training device (AUG.WHERE): the loader processes then
    # only read, decode and cut, and the perturbations run batched on the GPU
    aug_on_device: bool = False


class ShardStream(IterableDataset):
    """Streams one split's planned samples for one rank.

    Order per epoch: shards permuted by (seed, epoch); the k-th sample of that order belongs to rank
    k mod world, so ranks differ by at most one sample and none is seen twice; within a rank, DataLoader
    workers take whole shards in turn (worker splitting) and skip the samples of other ranks unread-decoded.
    Every random draw of a sample comes from (seed, epoch, key), so what a sample becomes does not depend on
    the number of ranks or workers, and a resumed run redraws exactly what the uninterrupted one drew.
    """

    def __init__(
        self, plan: SplitPlan, join: StoreJoin | None, view: View, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.plan, self.join, self.view, self.seed = plan, join, view, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_order(self) -> list[Path]:
        shards = sorted(self.plan.keys)
        if self.view.aug is None:
            return shards
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
        return [shards[i] for i in perm]

    def rank_sizes(self) -> list[int]:
        """Samples each rank gets this epoch (the round-robin deal of the whole split)."""
        n = len(self.plan)
        return [len(range(r, n, self.world)) for r in range(self.world)]

    def __len__(self) -> int:
        return self.rank_sizes()[self.rank]

    def _mine(self) -> tuple[list[Path], set[str]]:
        order = self.shard_order()
        flat = [key for path in order for key in self.plan.keys[path]]
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return order[worker::n_workers], set(flat[self.rank :: self.world])

    def _raw(self, shards: list[Path], mine: set[str]) -> Iterator[tuple[Path, ShardSample]]:
        for path in shards:
            for sample in iter_shard(path):
                if sample.key in mine:
                    yield path, sample

    def _shuffled(self, items: Iterator[tuple[Path, ShardSample]]) -> Iterator[tuple[Path, ShardSample]]:
        size = self.view.shuffle_buffer
        if size <= 1:
            yield from items
            return
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, info.id if info is not None else 0])
        buf: list[tuple[Path, ShardSample]] = []
        for item in items:
            if len(buf) < size:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            yield buf[j]
            buf[j] = item
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def __iter__(self) -> Iterator[Sample]:
        shards, mine = self._mine()
        for path, raw in self._shuffled(self._raw(shards, mine)):
            yield self.make(path, raw)

    def make(self, path: Path, raw: ShardSample) -> Sample:
        return self.cut(path, raw, self.decode(path, raw))

    def decode(self, path: Path, raw: ShardSample) -> np.ndarray:
        try:
            return decode_image(raw.image)
        except ImageDecodeError as exc:
            raise DataError(
                f"shard {shard_name(path)}: sample {raw.key} cannot be decoded ({exc}); "
                "rerun `semspai shard` for its source"
            ) from exc

    def cut(self, path: Path, raw: ShardSample, rgb: np.ndarray) -> Sample:
        """Cut the decoded (H, W, 3) image on the grid, choose cells, augment, and attach the store rows of
        exactly those cells."""
        patches, boxes = crop_patches(rgb)  # (P, S, S, 3), (P, 4)
        rng = np.random.default_rng([self.seed, self.epoch, key_seed(raw.key)])
        cells = choose_cells(len(patches), self.view.max_patches, rng)
        patches, chosen = patches[cells], boxes[cells]
        draws = AugDraws.draw(len(cells), self.view.aug, rng) if self.view.aug is not None else None
        if draws is not None and not self.view.aug_on_device:
            patches, draws = draws.apply(torch.from_numpy(patches)).numpy(), None
        global_vec = local_vec = text_vec = None
        if self.join is not None:
            global_vec, local_vec, text_vec = self.join.vectors(f"shard {shard_name(path)}", raw.key, boxes, cells)
        return Sample(
            key=raw.key,
            label=self.plan.labels[raw.key],
            patches=patches,
            boxes=chosen,
            global_vec=global_vec,
            local_vec=local_vec,
            text_vec=text_vec,
            aug=draws,
        )


# samples a loader process ships at once: the DataLoader's cost per item (a request, a pickle, a pipe round
# trip) dominated the main process's time per sample; a chunk pays it once, and its patches travel as one
# shared-memory tensor (main-process CPU per sample measured 0.92-1.05 ms one by one, 0.40 ms in chunks)
SAMPLES_PER_TRANSFER = 8
LOADER_PREFETCH = 4  # chunks in flight per loader process
BATCHES_AHEAD = 2  # batches collated ahead of the step, in a thread of the training process


@dataclass
class SampleChunk:
    """Consecutive samples of one loader process's stream, as one DataLoader item."""

    samples: list[Sample]  # each with patches=None: they travel in `patches`
    patches: torch.Tensor  # (sum of P_i, S, S, 3) uint8, the samples' patches in order
    counts: list[int]

    @classmethod
    def of(cls, samples: list[Sample]) -> SampleChunk:
        counts = [len(s.patches) for s in samples]
        patches = torch.from_numpy(np.concatenate([s.patches for s in samples]))
        return cls([dataclasses.replace(s, patches=None) for s in samples], patches, counts)

    def unpack(self) -> list[Sample]:
        views = torch.split(self.patches, self.counts)  # no copy: collate concatenates them into the batch
        return [dataclasses.replace(s, patches=v.numpy()) for s, v in zip(self.samples, views, strict=True)]


class _Chunked(IterableDataset):
    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[SampleChunk]:
        return map(SampleChunk.of, batched(iter(self.stream), SAMPLES_PER_TRANSFER))


def loader_samples(stream: ShardStream, workers: int) -> Iterator[Sample]:
    """The stream's samples made in `workers` DataLoader processes (shipped in chunks), or in this process
    for 0. Batches are formed from these by the caller, so a rank's batch count does not depend on `workers`."""
    if workers <= 0:
        return iter(stream)
    # a generator of its own: the loader's worker seeds are drawn from it, not from torch's global generator,
    # which dropout draws from (with the global one, a run with workers trained other weights than one without)
    loader = DataLoader(_Chunked(stream), batch_size=None, num_workers=workers, prefetch_factor=LOADER_PREFETCH,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    return (sample for chunk in loader for sample in chunk.unpack())
