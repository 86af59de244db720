"""`semspai extract-clip`: shards -> the Zarr feature store (global, local, caption and prompt vectors); resumable."""

from __future__ import annotations

import logging
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from semspai import __version__
from semspai.pipeline.config import EMBEDDER_PRECISIONS, ConfigError
from semspai.pipeline.grid import DEFAULT_RULE
from semspai.pipeline.progress import progress
from semspai.stages.common import resolve_device, user_errors
from semspai.store.features import (
    FeatureStoreError,
    FeatureStoreWriter,
    StoreHeader,
    check_new_store_path,
    check_shard_unchanged,
    done_shard_attrs,
    read_store_attrs,
    stored_keys,
    writer_lock,
)
from semspai.store.images import ImageDecodeError
from semspai.store.shards import (
    ShardError,
    ShardSample,
    file_sha256,
    indexed_sha256,
    iter_shard,
    resolve_shards,
    shard_name,
    shard_sidecars,
)
from semspai.store.writer import PROCESS_LOCAL, WriterProcessError

if TYPE_CHECKING:  # torch, CLIP and Dask are imported where they are used: `extract-clip --help` answers at once
    from semspai.pipeline.extraction import Embedder, InlineDistributor, ShardSummary

log = logging.getLogger(__name__)


DEFAULT_CLIP = "ViT-B-32:openai"  # a new store's encoder unless --clip names another


@dataclass
class ExtractConfig:
    shards: str  # SPEC: brace pattern, glob or shard folder
    store: str  # local path or fsspec URL that Zarr accepts
    clip: str = ""  # MODEL[:WEIGHTS], tiny-random, or timm/MODEL:FILE; empty: the store's own, else DEFAULT_CLIP
    workers: int | None = None  # Dask worker processes; None = one per core (one per GPU on CUDA); 0 = no Dask
    scheduler: str | None = None  # tcp://HOST:PORT of an existing cluster (then `workers` must be None)
    decode_workers: int = 2  # decode threads inside each task
    batch_size: int = 256  # crops per encoder call; part of what makes two runs bit-identical
    device: str = "auto"  # auto = cuda when available
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32, bf16, bf16-weights
    # decode JPEGs with nvjpeg on the device (recorded: another decoder identity); None: the store's own, else no
    gpu_decode: bool | None = None
    prompts: str = ""  # class-name file for the prompt bank; empty: the store's own, else the ImageNet class names
    torch_threads: int = 1  # per worker; fixed so the bits do not depend on the worker count


@dataclass
class ExtractResult:
    store: str
    shards_total: int
    shards_already_done: list[str]
    extracted: list[ShardSummary] = field(default_factory=list)
    seconds: float = 0.0  # the whole run, model loading and cluster start included
    shard_seconds: float = 0.0  # from the first shard handed out to the last one done

    @property
    def n_images(self) -> int:
        return sum(s.n_images for s in self.extracted)

    @property
    def n_skipped(self) -> int:
        return sum(s.n_skipped for s in self.extracted)

    @property
    def images_per_s(self) -> float:
        """Extraction throughput: images over shard_seconds (loading the model and cluster excluded)."""
        return self.n_images / self.shard_seconds if self.shard_seconds > 0 else 0.0


def default_workers(device: str) -> int:
    """Local Dask workers unless --workers says: one per GPU for `cuda`, one for `cuda:N` (all would share GPU
    N: each with its own encoder and decode buffers), one per core on the CPU."""
    import torch

    if device == "cuda":
        return max(1, torch.cuda.device_count())
    return 1 if device.startswith("cuda") else os.cpu_count() or 1


def worker_gpus(device: str) -> list[str] | None:
    """The GPUs local Dask workers take in turn (CUDA_VISIBLE_DEVICES values), when `device` is `cuda` with no
    index and more than one GPU is visible; else None (`cuda:N` keeps every worker on GPU N)."""
    import torch

    if device != "cuda" or torch.cuda.device_count() < 2:
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible or [str(i) for i in range(torch.cuda.device_count())]


def _raise_failures(failures: list[tuple[str, BaseException]], total: int) -> None:
    from semspai.pipeline.clip import ClipLoadError

    # failures that mean bad input or a failed writer process (reported in one line, saying what to do), not a
    # bug (re-raised as is)
    input_errors = (ShardError, FeatureStoreError, ImageDecodeError, ClipLoadError, WriterProcessError)
    bugs = [exc for _, exc in failures if not isinstance(exc, input_errors)]
    if bugs:
        raise bugs[0]
    first = failures[0][1]
    if len(failures) == 1:
        raise first
    names = ", ".join(n for n, _ in failures)
    raise ShardError(f"{len(failures)} of {total} shards failed ({names}); first: {first}")


def check_inputs(store: str, paths: list[Path], threads: int = 8, stop: threading.Event | None = None) -> None:
    """What must hold before anything is written (it runs while the cluster and the encoder start):

    - every tar the store already holds is the one it was extracted from (sha256);
    - no shard to extract holds a key the store or another shard of the SPEC already has (the same images
      sharded twice): once in the store, training and eval could only refuse its keys, and no command takes
      a shard back out. Only the tars' sidecars and the store's key arrays are read, in threads.

    `stop` set (the run failed elsewhere) ends it at the next tar, so that no hashing outlives the run.
    """
    stop = stop or threading.Event()
    attrs = read_store_attrs(store)
    done = done_shard_attrs(store) if attrs else {}
    recorded = (attrs or {}).get("shards", {})
    pending = []
    for path in paths:
        if stop.is_set():
            return
        name = shard_name(path)
        if name in done:
            check_shard_unchanged(store, name, done[name]["sha256"], file_sha256(path), path, recorded.get(name, ""))
        else:
            pending.append(path)
    if not pending:
        return

    def sidecar_keys(path: Path) -> list[str]:
        if stop.is_set():
            return []
        try:
            return [key for key, _ in shard_sidecars(path)]
        except (OSError, tarfile.ReadError, EOFError, ValueError):
            return []  # a damaged tar: its own task reports it, and the other shards go on

    owner = stored_keys(store, done, threads) if done else {}  # key -> shard holding it
    with ThreadPoolExecutor(threads) as pool:
        for path, keys in zip(pending, pool.map(sidecar_keys, pending), strict=True):
            name = shard_name(path)
            for key in keys:
                other = owner.setdefault(key, name)
                if other != name:
                    where = f"in feature store {store} (shard {other})" if other in done else f"in shard {other}"
                    raise ShardError(
                        f"shard {name}: sample {key} is already {where}; a sample can be extracted once. Were the "
                        "same images sharded twice? Leave one copy out of --shards (a later batch needs a source "
                        "folder of its own name: keys come from that name and the paths below it)"
                    )


def run(
    cfg: ExtractConfig,
    embedder_factory: Callable[[], Embedder] | None = None,
    distributor_factory: Callable[[int, str | None], InlineDistributor] | None = None,
    read: Callable[[str | Path], Iterable[ShardSample]] = iter_shard,
) -> ExtractResult:
    """Extract every shard of `cfg.shards` not yet done in `cfg.store`; done shards are checked and kept."""
    with writer_lock(cfg.store):
        return _run(cfg, embedder_factory, distributor_factory, read)


def _run(
    cfg: ExtractConfig,
    embedder_factory: Callable[[], Embedder] | None,
    distributor_factory: Callable[[int, str | None], InlineDistributor] | None,
    read: Callable[[str | Path], Iterable[ShardSample]],
) -> ExtractResult:
    from semspai.pipeline.clip import ClipLoadError, is_weights_path, parse_clip_arg
    from semspai.pipeline.extraction import (
        ClipFactory,
        ExtractOptions,
        ShardJob,
        decoder_record,
        describe,
        make_distributor,
        prompt_bank,
        warm_up,
    )

    start = time.perf_counter()
    paths = resolve_shards(cfg.shards)
    names = [shard_name(p) for p in paths]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ShardError(f"{cfg.shards}: two tars are named {dup}.tar; a store keys its shards by name")
    if cfg.scheduler and cfg.workers is not None:
        raise ConfigError(f"--workers {cfg.workers} sizes the local cluster; with --scheduler the cluster's own "
                          "workers take the shards: leave --workers out")  # fmt: skip
    # an attached cluster's workers, not this client, say which devices exist (a login node may have no GPU)
    device = cfg.device if cfg.scheduler else resolve_device(cfg.device)
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    if cfg.store.startswith(PROCESS_LOCAL):  # a store in this process's memory: no other process can write it
        if cfg.scheduler or cfg.workers:
            raise ConfigError(f"--store {cfg.store} lives in this process's memory, where Dask workers cannot "
                              "write: extract with --workers 0 (and no --scheduler), or into a path or URL")  # fmt: skip
        workers = 0
    existing = read_store_attrs(cfg.store)
    if existing is None:  # before the cluster and the encoder start: a wrong --store costs no minutes
        check_new_store_path(cfg.store)
    # what is not asked for is the store's own when extending one: a later batch needs no repeated options
    clip = cfg.clip or (existing["clip"]["arg"] if existing else DEFAULT_CLIP)
    prompts = prompt_bank(cfg.prompts) if cfg.prompts else existing["prompts"] if existing else prompt_bank()
    gpu_decode = bool(existing and existing["decoder"].get("gpu")) if cfg.gpu_decode is None else cfg.gpu_decode
    model_name, weights = parse_clip_arg(clip)
    if existing and not cfg.clip:
        if is_weights_path(weights) and not os.path.isfile(weights):  # recorded as given, maybe from elsewhere
            raise ClipLoadError(f"{cfg.store} was made with --clip {clip}, whose weights file is not at {weights} "
                                "from here: pass --clip with the file's path now")  # fmt: skip
        log.info("extending %s with its own encoder, %s", cfg.store, clip)
    if is_weights_path(weights) and os.path.isfile(weights) and not os.path.isabs(weights):
        # as workers started elsewhere find it, and as the store records it for later runs from other folders
        clip = f"{model_name}:{os.path.abspath(weights)}"
    checker, stop = ThreadPoolExecutor(1, thread_name_prefix="check-inputs"), threading.Event()
    checked = checker.submit(check_inputs, cfg.store, paths, 8, stop)  # hashing tars overlaps the cluster's start
    checker.shutdown(wait=False)
    try:
        if distributor_factory is not None:
            dist = distributor_factory(workers, cfg.scheduler)
        else:  # with several GPUs, each local worker gets its own
            dist = make_distributor(workers, cfg.scheduler, None if cfg.scheduler else worker_gpus(device))
    except BaseException:
        stop.set()
        wait([checked])
        raise
    try:
        if cfg.scheduler:
            device = dist.call(resolve_device, cfg.device)
        factory = embedder_factory or ClipFactory(clip, device, cfg.precision)
        # every worker builds its embedder before any shard is handed out, so no worker idles while another
        # one is still loading; prompt vectors only for a new store
        dist.on_every_worker(warm_up, factory, logging.getLogger("semspai").getEffectiveLevel())
        info = dist.call(describe, factory, [] if existing else prompts, cfg.batch_size, cfg.torch_threads)
        header = StoreHeader(
            clip=info.spec,
            clip_identity=info.identity,
            has_text=info.has_text,
            embed_dim=info.embed_dim,
            decoder=decoder_record(gpu_decode),
            patch_rule={"id": DEFAULT_RULE.id, **DEFAULT_RULE.to_dict()},
            prompts=prompts,
            preprocessing={
                "global": "the encoder's own eval transform of the whole decoded image",
                "local": f"grid patches ({DEFAULT_RULE.id}), resized to the encoder's input size when not "
                f"{DEFAULT_RULE.size}, normalised with its mean and std",
                "batch_size": cfg.batch_size,
                "precision": cfg.precision,
                "device": device,
            },
            semspai_version=__version__,
        )
        checked.result()  # raises what is wrong with the inputs, before the store is made or touched
        writer = FeatureStoreWriter.create_or_check(cfg.store, header, info.text)
        done = writer.done_shards()
        writer.record_shards({n: str(p) for p, n in zip(paths, names, strict=True)})
        opts = ExtractOptions(cfg.batch_size, cfg.decode_workers, gpu_decode, device)
        recorded = indexed_sha256(paths)
        # workers (of a cluster started elsewhere, too) get paths that do not depend on their working folder
        store = cfg.store if "://" in cfg.store else os.path.abspath(cfg.store)
        jobs = [
            ShardJob(
                os.path.abspath(p),
                store,
                factory,
                opts,
                cfg.torch_threads,
                read=read,
                expected_sha256=recorded.get(str(p), ""),
            )  # fmt: skip
            for p, n in zip(paths, names, strict=True)
            if n not in done
        ]
        result = ExtractResult(cfg.store, len(paths), sorted(set(names) & set(done)))
        if result.shards_already_done:
            log.info("%d of %d shards already done in %s; extracting %d", len(result.shards_already_done), len(paths),
                     cfg.store, len(jobs))  # fmt: skip
        failures: list[tuple[str, BaseException]] = []
        shard_start = time.perf_counter()

        def status() -> str:
            return f"{result.n_images} images, {result.images_per_s:.1f} images/s"

        for job, summary, exc in progress(dist.map_shards(jobs), len(jobs), "extract-clip", "shard", status):
            if exc is not None:
                log.error("shard %s failed: %s", job.name, exc)
                failures.append((job.name, exc))
                continue
            result.extracted.append(summary)
            result.shard_seconds = time.perf_counter() - shard_start
    finally:
        stop.set()  # a failure before the check's result was taken: the check ends too, and is waited for
        wait([checked])
        dist.close()
    result.seconds = time.perf_counter() - start
    if failures:
        _raise_failures(failures, len(jobs))
    return result


@click.command("extract-clip")
@click.option("--shards", required=True, help="Shard SPEC: brace pattern, glob, or shard folder.")
@click.option("--store", required=True, help="Feature store path or fsspec URL (created, or extended when it exists).")
@click.option(
    "--clip",
    default="",
    help="MODEL[:WEIGHTS]: hub tag, local .safetensors, MODEL:random, tiny-random, or timm/MODEL:FILE "
    f"(default: the store's own when extending one, else {DEFAULT_CLIP}).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Local Dask worker processes (one task per shard); default one per core (per GPU; one with cuda:N); "
    "0 = no Dask. Not with --scheduler.",
)
@click.option("--scheduler", default=None, help="Attach to an existing Dask cluster (tcp://HOST:PORT).")
@click.option(
    "--decode-workers",
    type=click.IntRange(min=1),
    default=ExtractConfig.decode_workers,
    show_default=True,
    help="Image-decoding threads inside each task.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=ExtractConfig.batch_size,
    show_default=True,
    help="Crops per encoder call (global + grid patches of many images of one shard).",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto.")
@click.option(
    "--precision",
    type=click.Choice(EMBEDDER_PRECISIONS),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast on CUDA, fp32 on CPU. bf16-weights: the encoder's weights in bf16, no autocast "
    "(faster on GPUs; recorded in the store).",
)
@click.option(
    "--gpu-decode/--cpu-decode",
    default=None,
    help="Decode JPEGs with torchvision on --device (nvjpeg on CUDA; on the CPU it runs but gains nothing), or with "
    "the CPU decode function; recorded in the store. Default: the store's own when extending one, else the CPU.",
)
@click.option(
    "--prompts",
    default="",
    help="Class-name file for the prompt bank (default: the store's own, or for a new store the ImageNet class names).",
)
@user_errors
def command(
    shards: str,
    store: str,
    clip: str,
    workers: int | None,
    scheduler: str | None,
    decode_workers: int,
    batch_size: int,
    device: str,
    precision: str,
    gpu_decode: bool | None,
    prompts: str,
) -> None:
    """Fill the feature store with CLIP vectors of every image and grid patch; reruns skip done shards."""
    result = run(
        ExtractConfig(
            shards, store, clip, workers, scheduler, decode_workers, batch_size, device, precision, gpu_decode, prompts
        )
    )
    click.echo(
        f"{store}: {len(result.extracted)} shards extracted ({result.n_images} images, {result.n_skipped} unreadable "
        f"skipped, {result.images_per_s:.1f} images/s), {len(result.shards_already_done)} already done, "
        f"{result.shards_total} in the spec"
    )
