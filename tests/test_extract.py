"""`semspai extract-clip`: vectors against open_clip itself, the grid, resume after SIGKILL, workers, errors."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image
from store_data import CORRUPT_KEY, make_shards
from torchvision.io import ImageReadMode, decode_jpeg

from semspai.pipeline import extraction
from semspai.pipeline.clip import ClipLoadError, load_embedder
from semspai.pipeline.extraction import (
    ClipFactory,
    CpuCrops,
    CropBatcher,
    DaskDistributor,
    DeviceCrops,
    ExtractOptions,
    InlineDistributor,
    ShardJob,
    extract_features,
    prompt_bank,
)
from semspai.pipeline.grid import grid_boxes, pad_image
from semspai.stages.cli import cli
from semspai.stages.extract import ExtractConfig, default_workers, run, worker_gpus
from semspai.store import writer as writer_module
from semspai.store.atomic import write_json_atomic
from semspai.store.features import FeatureStore, FeatureStoreError, writer_lock
from semspai.store.images import decode_image
from semspai.store.shards import (
    INDEX_NAME,
    ShardError,
    ShardSample,
    file_sha256,
    iter_shard,
    resolve_shards,
)
from semspai.store.writer import FAULT_ENV, WRITER_ENV, writer_process
from tests.conftest import XMP_ROTATED, encode, run_in_own_session, with_adobe
from tests.conftest import random_photo as photo

TINY = ClipFactory("tiny-random", "cpu", "fp32")
BATCH = 7  # not a multiple of any image's crop count, so batches cut through images
# Stored vectors are float16 (spacing 2^-11 ~ 4.9e-4 near 0.5 and below); the encoder runs in fp32 with
# other batch compositions here, which moves results by ~1e-6. So |store - open_clip| <= 1e-3.
ATOL = 1e-3
# GPU (nvjpeg) decode vs the CPU decode function, |difference| in grey levels. nvjpeg replicates 4:2:0 chroma
# where libjpeg-turbo interpolates it ("fancy upsampling"), so colour detail decides the difference. Measured
# on an H100 (torchvision 0.26, CUDA 13) for these tests' random-colour photos: mean 2.92 (224 x 224) and
# 2.98 (crops of 500 x 375). Simulating just the chroma rule on the same images gives means of 2.8-3.0 and
# p99.9 of 14-16; on natural photos (scikit-image's) means of 0.3-0.6 and p99.9 of 5-11.
DECODE_MEAN_TOL, DECODE_P999_TOL = 3.5, 24.0
# Vectors of the device-crop path (torch bicubic resize) vs the CPU path (PIL's): cosine similarity.
DEVICE_COSINE_MIN = 0.99


CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for nvjpeg")
)
PROMPTS = Path(__file__).with_name("store_prompts.txt")  # a 3-class bank: the 1000 ImageNet ones cost time


def cfg(shards: Path | str, store: Path | str, **over) -> ExtractConfig:
    base = dict(
        clip="tiny-random",
        workers=0,
        batch_size=BATCH,
        device="cpu",
        precision="fp32",
        decode_workers=2,
        prompts=str(PROMPTS),
    )
    return ExtractConfig(str(shards), str(store), **{**base, **over})


def arrays(store: Path | str) -> dict[str, tuple[str, bytes]]:
    """Every array of the store as (dtype, raw bytes): what "bit for bit equal" compares."""
    root = zarr.open_group(str(store), mode="r")
    out = {"text": (str(root["text"].dtype), root["text"][...].tobytes())}
    for name in sorted(root["shards"].group_keys()):
        for aname, arr in sorted(root["shards"][name].arrays()):
            v = arr[...]
            out[f"{name}/{aname}"] = (str(v.dtype), repr(v.tolist()).encode() if v.dtype.kind == "T" else v.tobytes())
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    make_shards(out)
    return out


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted in-process extraction of all shards."""
    store = tmp_path_factory.mktemp("ref") / "features.zarr"
    result = run(cfg(shards, store), embedder_factory=TINY)
    assert len(result.extracted) == 3 and result.n_skipped == 1
    return store


def test_vectors_equal_open_clip_on_the_same_pixels(shards: Path, reference: Path) -> None:
    fs = FeatureStore.open(str(reference), expect_clip=TINY().spec.identity())
    # open_clip's own model and eval transform, with the seeded weights of the project's tiny-random
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-random")
    model.load_state_dict(load_embedder("tiny-random").model.state_dict())
    model.eval()
    checked = 0
    for path in sorted(shards.glob("*.tar")):
        for sample in iter_shard(path):
            if sample.key == CORRUPT_KEY:
                continue
            i = fs.index_of(sample.key)
            pil = Image.open(io.BytesIO(sample.image)).convert("RGB")
            rgb = np.asarray(pil)
            assert (fs.meta["height"][i], fs.meta["width"][i]) == rgb.shape[:2]
            boxes = fs.boxes(i)
            assert np.array_equal(boxes, grid_boxes(*rgb.shape[:2]))
            padded = pad_image(rgb)
            crops = [pil] + [Image.fromarray(padded[y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes]
            with torch.no_grad():
                want = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(c) for c in crops])))
            got = np.concatenate([fs.global_vectors()[i : i + 1], fs.local_vectors(i)]).astype(np.float32)
            np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=0)
            checked += 1
    assert checked == fs.n_images == 12


def test_a_box_given_twice_is_embedded_once_and_its_vector_copied(
    shards: Path, reference: Path, tmp_path: Path
) -> None:
    seen: list[int] = []

    def counting() -> object:  # tiny-random, counting the crops it embeds
        embedder = TINY()
        embed = embedder.get_image_embedding
        embedder.get_image_embedding = lambda x: seen.append(len(x)) or embed(x)
        return embedder

    store = tmp_path / "s.zarr"
    run(cfg(shards, store), embedder_factory=counting)
    assert arrays(store) == arrays(reference)
    fs = FeatureStore.open(str(store))
    boxes = [[tuple(b) for b in fs.boxes(i).tolist()] for i in range(fs.n_images)]
    assert sum(seen) == sum(1 + len(set(b)) for b in boxes) < sum(1 + len(b) for b in boxes)
    for i, image_boxes in enumerate(boxes):  # 224 x 224: five crops, one box; 300 x 200: five crops, three boxes
        local = fs.local_vectors(i)
        for j, box in enumerate(image_boxes):
            assert np.array_equal(local[j], local[image_boxes.index(box)])


def test_layout_offsets_captions_and_skipped(reference: Path) -> None:
    fs = FeatureStore.open(str(reference))
    assert fs.done_shards == ["train-000000", "train-000001", "train-000002"]
    assert fs.keys[:4] == ["s0n0", "s0n1", "s0n2", "s0n3"]
    square = fs.local_vectors(0)  # 224 x 224: the five-crop of one image gives five equal rows
    assert square.shape == (5, fs.embed_dim) and (square == square[0]).all()
    assert fs.boxes(2).shape == (4, 4)  # 480 x 460: a 2 x 2 grid
    assert [fs.caption_vector(i) is not None for i in range(4)] == [True, False, True, False]
    assert fs.prompt_vectors().shape == (3, fs.embed_dim)
    assert fs.prompts() == ["a photo of a cat.", "a photo of a dog.", "a photo of a tench."]
    assert (
        fs.skipped
        == [
            {"shard": "train-000001", "key": CORRUPT_KEY, "reason": fs.skipped[0]["reason"]},
        ]
        and "not a readable image" in fs.skipped[0]["reason"]
    )
    info = CliRunner().invoke(cli, ["store", "info", str(reference)]).output.splitlines()
    assert info[0] == "images: 12" and "skipped images (unreadable): 1" in info


def test_verify_passes_on_an_extracted_store(shards: Path, reference: Path) -> None:
    result = CliRunner().invoke(cli, ["store", "verify", str(reference), "--shards", str(shards)])
    assert result.exit_code == 0, result.output
    assert "ok (3 shard(s) of the spec: 12 images, 1 unreadable skipped)" in result.output
    part = CliRunner().invoke(cli, ["store", "verify", str(reference), "--shards", str(shards / "train-000001.tar")])
    assert part.exit_code == 0, part.output  # the counts are the spec's, not the whole store's
    assert (
        "ok (1 shard(s) of the spec: 4 images, 1 unreadable skipped; the store holds 2 more shard(s), not checked against tars)"
        in part.output
    )


def cli_args(shards: Path, store: Path, clip: str = "tiny-random", *extra: str) -> list[str]:
    """`extract-clip` arguments for an in-process, CPU, fp32 run with the small prompt bank."""
    return ["extract-clip", "--shards", str(shards), "--store", str(store), "--clip", clip, "--workers", "0",
            "--device", "cpu", "--precision", "fp32", "--prompts", str(PROMPTS), *extra]  # fmt: skip


def test_kill_after_rows_then_resume_is_bitwise_equal(shards: Path, reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "killed.zarr"
    exe = Path(sys.executable).with_name("semspai")
    args = [str(exe), *cli_args(shards, store, "tiny-random", "--batch-size", str(BATCH))]
    env = {**os.environ, FAULT_ENV: "train-000001"}
    returncode, out, _ = run_in_own_session(args, env, stderr=subprocess.STDOUT)
    assert returncode == -signal.SIGKILL, out.decode()[-2000:]
    partial = zarr.open_group(str(store), mode="r")["shards"]
    assert partial["train-000001"].attrs["done"] is False  # rows written, marker not
    assert FeatureStore.open(str(store)).done_shards == ["train-000000"]

    result = run(cfg(shards, store), embedder_factory=TINY)
    assert result.shards_already_done == ["train-000000"]
    assert sorted(s.name for s in result.extracted) == ["train-000001", "train-000002"]
    assert arrays(store) == arrays(reference)


def test_cli_log_is_quiet_about_dask_and_reports_images_per_second(shards: Path, tmp_path: Path) -> None:
    """Piped, a Dask run logs progress with images/s once per mark, and none of the scheduler's INFO chatter."""
    exe = Path(sys.executable).with_name("semspai")
    args = [str(exe), *cli_args(shards, tmp_path / "s.zarr")]
    args[args.index("--workers") + 1] = "1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO distributed." not in proc.stderr and "INFO root" not in proc.stderr, proc.stderr[-3000:]
    # the worker's own records (the unreadable image's warning) in the client's format, not Python's bare one
    assert "WARNING semspai.pipeline.extraction: shard train-000001: skipping" in proc.stderr, proc.stderr[-3000:]
    assert not re.search(r"^(WARNING|INFO):", proc.stderr, re.M), proc.stderr[-3000:]
    done = [line for line in proc.stderr.splitlines() if "extract-clip: done, 3 shard (" in line]
    assert len(done) == 1 and re.search(r", 12 images, [\d.]+ images/s\)$", done[0]), proc.stderr[-3000:]
    assert proc.stderr.count("extract-clip: 1/3 shard") == 1 and "extract-clip: 3/3" not in proc.stderr


def writer_pids(store: Path) -> dict[str, int]:
    """Done shard -> the id of the process that wrote it."""
    fs = FeatureStore.open(str(store))
    return {n: fs.shard_info[n]["writer"]["pid"] for n in fs.done_shards}


def _dask_matches_reference(shards: Path, reference: Path, store: Path, workers: int, **over) -> set[int]:
    run(cfg(shards, store, workers=workers, **over), embedder_factory=TINY)
    assert arrays(store) == arrays(reference)
    return set(writer_pids(store).values())


def test_writes_by_a_writer_process_and_in_a_thread_give_the_same_bits(
    shards: Path, reference: Path, tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture, capfd
) -> None:
    """The reference's shards were written by this process's writer process; writes in a thread (WRITER_ENV)
    give the same bits. The writer process logs at the level this process's semspai loggers let through."""
    writer_pid = writer_process().proc.pid
    assert set(writer_pids(reference).values()) == {writer_pid} and writer_pid != os.getpid()
    store = tmp_path / "thread.zarr"
    with monkeypatch.context() as m:
        m.setenv(WRITER_ENV, "thread")
        run(cfg(shards, store), embedder_factory=TINY)
    assert set(writer_pids(store).values()) == {os.getpid()}
    assert arrays(store) == arrays(reference)

    for name in ("train-000001", "train-000002"):  # as a run killed before these shards' markers leaves them
        group = zarr.open_group(str(store), mode="r+")["shards"][name]
        group.attrs["done"] = False
        del group["global"]
    capfd.readouterr()
    monkeypatch.setattr(writer_module, "_WRITER", None)  # a writer process started here writes to capfd's stderr
    try:
        with caplog.at_level(logging.INFO, logger="semspai.store.features"):
            result = run(cfg(shards, store), embedder_factory=TINY)
    finally:
        new_pid = writer_module._WRITER.proc.pid
        writer_module._WRITER.close()
    assert [s.name for s in result.extracted] == ["train-000001", "train-000002"]
    assert writer_pids(store) == {"train-000000": os.getpid(), "train-000001": new_pid, "train-000002": new_pid}
    assert arrays(store) == arrays(reference)
    # logged by the writer process, which rewrote them, on the stderr it shares with this one
    assert (
        capfd.readouterr().err.count(f"INFO semspai.store.features (store writer, pid {new_pid}): shard train-00000")
        == 2
    )
    assert "replacing an unfinished group" not in caplog.text


def test_two_dask_workers_give_the_same_bits(shards: Path, reference: Path, tmp_path: Path) -> None:
    pids = _dask_matches_reference(shards, reference, tmp_path / "two.zarr", workers=2)
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes wrote


def test_an_attached_cluster_decides_the_device_and_gives_the_same_bits(
    shards: Path, reference: Path, tmp_path: Path, monkeypatch
) -> None:
    """--scheduler: `auto` is resolved by the cluster's workers, not by the client (a client without a GPU may
    drive GPU workers; here the client claims a GPU its CPU-only worker lacks), and the store is bit for bit
    the in-process one."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # in this process only, after the spawn
        store = tmp_path / "attached.zarr"
        run(cfg(shards, store, workers=None, scheduler=address, device="auto"))  # the embedder built from cfg
    assert arrays(store) == arrays(reference)
    pids = set(writer_pids(store).values())
    assert len(pids) == 1 and os.getpid() not in pids
    assert zarr.open_group(str(store), mode="r").attrs["preprocessing"]["device"] == "cpu"


def test_an_unreachable_scheduler_is_one_line_error(shards: Path, tmp_path: Path) -> None:
    import dask

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["extract-clip", "--shards", str(shards), "--store", str(tmp_path / "s.zarr"), "--clip", "tiny-random"]
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        line = one_line_error([*args, "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert f"--scheduler tcp://127.0.0.1:{port}: cannot reach a Dask scheduler" in line
    assert not (tmp_path / "s.zarr").exists()
    # --workers sizes the local cluster only: given with --scheduler, it is refused rather than ignored
    line = one_line_error([*args, "--scheduler", f"tcp://127.0.0.1:{port}", "--workers", "2"])
    assert "--workers 2 sizes the local cluster; with --scheduler the cluster's own workers" in line


@pytest.mark.parametrize("extra", [["--workers", "2"], ["--scheduler", "tcp://127.0.0.1:1"]])
def test_a_memory_store_with_other_processes_is_refused_before_they_start(shards: Path, extra: list[str]) -> None:
    args = ["extract-clip", "--shards", str(shards), "--store", "memory://m.zarr", "--clip", "tiny-random", *extra]
    assert "lives in this process's memory, where Dask workers cannot write: extract with --workers 0" in (
        one_line_error(args)
    )


@pytest.mark.parametrize(
    "device,match",
    [
        ("foo", "--device 'foo' is not a device"),
        pytest.param(
            "cuda",
            "--device cuda: no CUDA GPU is visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
        ("mps" if not torch.backends.mps.is_available() else "foo:0", "is not a device|no mps device"),
        ("meta", "--device meta: the meta device holds no data"),
    ],
)
def test_a_device_that_is_not_here_is_one_line_error(shards: Path, tmp_path: Path, device: str, match: str) -> None:
    args = ["extract-clip", "--shards", str(shards), "--store", str(tmp_path / "s.zarr"), "--clip", "tiny-random"]
    assert re.search(match, one_line_error([*args, "--device", device, "--workers", "0"]))
    assert not (tmp_path / "s.zarr").exists()


def test_two_dask_workers_reading_ahead_on_the_device_path_give_the_same_bits(shards: Path, tmp_path: Path) -> None:
    """--gpu-decode (here on the CPU device): each worker's second task thread reads and decodes ahead in a
    producer thread while the first embeds; the store is bit for bit the in-process one."""
    inline = tmp_path / "inline.zarr"
    run(cfg(shards, inline, gpu_decode=True), embedder_factory=TINY)
    pids = _dask_matches_reference(shards, inline, tmp_path / "two.zarr", workers=2, gpu_decode=True)
    assert len(pids - {os.getpid()}) == 2


def test_each_local_worker_gets_its_own_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_gpus("cuda") == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, 7,GPU-1a2b")  # what this process sees, by any naming
    assert worker_gpus("cuda") == ["5", "7", "GPU-1a2b"]
    assert worker_gpus("cuda:1") is None and worker_gpus("cpu") is None  # an index keeps every worker there
    assert default_workers("cuda") == 3 and default_workers("cuda:1") == 1  # not three on GPU 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_gpus("cuda") is None
    # three workers over two GPUs: taken in turn, each worker process sees only its own
    dist = DaskDistributor(3, gpus=["5", "7"])
    try:
        seen = dist.client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    finally:
        dist.close()
    assert sorted(seen.values()) == ["5", "5", "7"]


def test_a_failed_task_is_reported_once_not_also_by_dask(capfd) -> None:
    dist = DaskDistributor(1)
    try:
        ((item, result, exc),) = list(dist.map_unordered(int, ["not a number"]))
    finally:
        dist.close()
    assert item == "not a number" and result is None and isinstance(exc, ValueError)
    assert "Compute Failed" not in capfd.readouterr().err  # the worker's log of it, traceback and all, is left out


@pytest.mark.slow
def test_one_dask_worker_gives_the_same_bits(shards: Path, reference: Path, tmp_path: Path) -> None:
    pids = _dask_matches_reference(shards, reference, tmp_path / "one.zarr", workers=1)
    assert len(pids) == 1 and os.getpid() not in pids


def test_rerun_adds_new_shards_only(shards: Path, reference: Path, tmp_path: Path) -> None:
    part = tmp_path / "part"
    part.mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        shutil.copy(shards / name, part / name)
    store = tmp_path / "grow.zarr"
    assert len(run(cfg(part, store), embedder_factory=TINY).extracted) == 2
    assert FeatureStore.open(str(store)).n_images == 8
    shutil.copy(shards / "train-000002.tar", part / "train-000002.tar")
    # a later batch needs no repeated --clip or --prompts: what is not asked for is the store's own
    result = run(cfg(part, store, clip="", prompts=""))
    assert result.shards_already_done == ["train-000000", "train-000001"]
    assert [s.name for s in result.extracted] == ["train-000002"]
    assert arrays(store) == arrays(reference)


def test_bf16_weights_precision_is_recorded_and_close_to_fp32(shards: Path, reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "bf16w.zarr"
    result = CliRunner().invoke(cli, [*cli_args(shards, store), "--precision", "bf16-weights"])
    assert result.exit_code == 0, result.output
    pure, full = FeatureStore.open(str(store)), FeatureStore.open(str(reference))
    assert pure.attrs["preprocessing"]["precision"] == "bf16-weights" and pure.keys == full.keys
    g, h = pure.global_vectors().astype(np.float32), full.global_vectors().astype(np.float32)
    cos = (g * h).sum(axis=1) / np.linalg.norm(g, axis=1) / np.linalg.norm(h, axis=1)
    assert 0.99 < cos.min() and not np.array_equal(g, h)  # bf16 did run, and stayed close


def test_fsspec_url_store_gives_the_same_bits(shards: Path, reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "url.zarr"
    run(cfg(shards, store.as_uri()), embedder_factory=TINY)  # file://: Zarr's FsspecStore, as for s3:// or gs://
    assert arrays(store) == arrays(reference)
    # memory:// lives in this process only: its shards are written here, not by the writer process
    run(cfg(shards, f"memory://{tmp_path.name}.zarr"), embedder_factory=TINY)
    assert arrays(f"memory://{tmp_path.name}.zarr") == arrays(reference)


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_second_run_on_a_store_being_written_is_refused(shards: Path, reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "busy.zarr"
    lock = tmp_path / "busy.zarr.lock"
    with writer_lock(str(store)):  # as a run in another process holds it (flock: per open file, not per process)
        assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
        line = one_line_error(cli_args(shards, store))
        assert "is being written by another extract-clip or store drop" in line and f"pid {os.getpid()}" in line
        line = one_line_error(["store", "drop", str(store), "train-000000"])  # a drop takes the same lock
        assert f"feature store {store} is being written by another" in line
    assert not lock.exists() and not store.exists()  # the refused run wrote nothing
    lock.write_text("pid 1 on a killed run")  # a killed run leaves its file, never the lock itself
    run(cfg(shards, store), embedder_factory=TINY)
    assert arrays(store) == arrays(reference) and not lock.exists()


def test_other_weights_are_refused(shards: Path, reference: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.clone().contiguous() for k, v in TINY().model.state_dict().items()}
    sd["logit_scale"] += 1
    weights = tmp_path / "tiny-other.safetensors"
    save_file(sd, str(weights))
    line = one_line_error(cli_args(shards, reference, f"tiny-random:{weights}"))
    assert f"feature store {reference} was made with another setup" in line
    assert "clip.sha256: store has '" in line and "asked for '" in line


def test_a_store_whose_recorded_weights_path_is_not_found_from_here_asks_for_clip(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import save_file

    (tmp_path / "w").mkdir()
    save_file(
        {k: v.clone().contiguous() for k, v in TINY().model.state_dict().items()}, str(tmp_path / "w" / "t.safetensors")
    )
    monkeypatch.chdir(tmp_path)
    run(cfg(f"{shards}/train-000000.tar", tmp_path / "s.zarr", clip="tiny-random:w/t.safetensors"))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    # a path relative to here is recorded absolute (Dask workers started elsewhere were given it so, too)
    assert root.attrs["clip"]["arg"] == f"tiny-random:{tmp_path / 'w' / 't.safetensors'}"
    root.attrs["clip"] = root.attrs["clip"] | {"arg": "tiny-random:w/t.safetensors"}  # as earlier versions did
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(
        ClipLoadError,
        match=r"made with --clip tiny-random:w/t.safetensors, whose weights file is not at w/t.safetensors",
    ):
        run(cfg(f"{shards}/train-000001.tar", tmp_path / "s.zarr", clip=""))
    run(cfg(f"{shards}/train-000001.tar", tmp_path / "s.zarr", clip=f"tiny-random:{tmp_path / 'w' / 't.safetensors'}"))


def test_gpu_decoder_on_a_cpu_store_is_refused(shards: Path, reference: Path) -> None:
    with pytest.raises(FeatureStoreError, match="decoder.gpu: store has None, asked for 'torchvision"):
        run(cfg(shards, reference, gpu_decode=True), embedder_factory=TINY)


def test_extending_a_store_keeps_its_decoder_unless_told(shards: Path, tmp_path: Path) -> None:
    store = tmp_path / "gpu.zarr"
    run(cfg(f"{shards}/train-000000.tar", store, gpu_decode=True), embedder_factory=TINY)
    result = run(cfg(f"{shards}/train-000001.tar", store), embedder_factory=TINY)  # no decoder asked for
    assert [s.name for s in result.extracted] == ["train-000001"]
    assert FeatureStore.open(str(store)).attrs["decoder"]["gpu"] is not None
    with pytest.raises(FeatureStoreError, match="decoder.gpu: store has 'torchvision.*asked for None"):
        run(cfg(f"{shards}/train-000002.tar", store, gpu_decode=False), embedder_factory=TINY)
    assert run(cfg(f"{shards}/train-000000.tar", tmp_path / "cpu.zarr"), embedder_factory=TINY).extracted
    assert FeatureStore.open(str(tmp_path / "cpu.zarr")).attrs["decoder"]["gpu"] is None  # a new store: the CPU


def test_changed_shard_is_refused(reference: Path, tmp_path: Path) -> None:
    # a tar of the same name from another folder: two shard folders in one store need other names
    make_shards(tmp_path / "other", n_shards=1, per_shard=3)
    line = one_line_error(cli_args(tmp_path / "other", reference))
    assert "shard train-000000: " in line and "is not the tar extracted under that name" in line
    assert "--prefix NAME" in line
    # the tar it was extracted from, rewritten in place (the store recorded its absolute path)
    own, store = tmp_path / "own", tmp_path / "own.zarr"
    make_shards(own, n_shards=1, per_shard=3, corrupt=False)
    run(cfg(own, store), embedder_factory=TINY)
    make_shards(own, n_shards=1, per_shard=4, corrupt=False)
    line = one_line_error(cli_args(own, store))
    assert "shard train-000000 (" in line and "changed since it was extracted" in line
    with pytest.raises(FeatureStoreError, match="changed since it was extracted"):
        FeatureStore.open(str(store)).check_shards([own / "train-000000.tar"])


def test_a_changed_tar_is_dropped_from_the_store_and_extracted_again(shards: Path, reference: Path,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    store = Path(shutil.copytree(reference, tmp_path / "ref.zarr"))
    other = tmp_path / "other"
    make_shards(other, n_shards=1, per_shard=3)  # train-000000, with other contents
    assert (
        CliRunner()
        .invoke(cli, ["store", "drop", str(store), "--changed", str(shards)])
        .output.endswith("nothing to drop (every shard of " + str(shards) + " is as it was extracted)\n")
    )
    before = arrays(store)
    # another folder's tar of a name the store holds, or an unknown name: refused, and nothing is dropped
    line = one_line_error(["store", "drop", str(store), "--changed", str(other)])
    assert "shard train-000000: " in line and "is not the tar extracted under that name" in line
    line = one_line_error(["store", "drop", str(store), "train-000001", "train-000009", "nope"])
    assert f"feature store {store} holds no shard nope (nor 1 more); nothing dropped" in line
    assert arrays(store) == before
    # a tar rewritten in place: refused with the way out, which drops it alone and extracts it again
    changed = tmp_path / "changed"
    make_shards(changed, per_shard=4)
    run(cfg(changed, tmp_path / "c.zarr"), embedder_factory=TINY)
    make_shards(tmp_path / "remade", per_shard=5)
    shutil.copyfile(tmp_path / "remade" / "train-000001.tar", changed / "train-000001.tar")
    line = one_line_error(cli_args(changed, tmp_path / "c.zarr"))
    assert f"`semspai store drop {tmp_path / 'c.zarr'} train-000001` (or `--changed SPEC`" in line
    res = CliRunner().invoke(cli, ["store", "drop", str(tmp_path / "c.zarr"), "--changed", str(changed)])
    assert res.exit_code == 0 and "dropped 1 shard(s): train-000001;" in res.output, res.output
    assert not (tmp_path / "c.zarr" / "shards" / "train-000001").exists()
    info = CliRunner().invoke(cli, ["store", "info", str(tmp_path / "c.zarr")]).output
    assert (
        "shards: 2 done, 1 missing (train-000001: asked for, not done: an extract-clip running or stopped, or dropped)"
        in info
    )
    result = run(cfg(changed, tmp_path / "c.zarr"), embedder_factory=TINY)
    assert [s.name for s in result.extracted] == ["train-000001"]
    run(cfg(changed, tmp_path / "c-fresh.zarr"), embedder_factory=TINY)
    assert arrays(tmp_path / "c.zarr") == arrays(tmp_path / "c-fresh.zarr")
    # by name (or tar): a shard's group goes whole, and the next run extracts it again, bit for bit
    res = CliRunner().invoke(cli, ["store", "drop", str(store), "train-000002", str(shards / "train-000000.tar")])
    assert res.exit_code == 0 and "dropped 2 shard(s): train-000000, train-000002;" in res.output, res.output
    assert FeatureStore.open(str(store)).done_shards == ["train-000001"]
    assert [s.name for s in run(cfg(shards, store), embedder_factory=TINY).extracted] == [
        "train-000000",
        "train-000002",
    ]
    assert arrays(store) == before


def test_a_rerun_over_part_of_a_store_counts_the_done_shards_of_its_spec(shards: Path, reference: Path, tmp_path: Path,
                                                                          caplog) -> None:  # fmt: skip
    store = Path(shutil.copytree(reference, tmp_path / "ref.zarr"))
    with caplog.at_level(logging.INFO, logger="semspai"):
        result = run(cfg(str(shards / "train-000001.tar"), store), embedder_factory=TINY)
    assert result.shards_already_done == ["train-000001"] and not result.extracted
    assert f"1 of 1 shards already done in {store}; extracting 0" in caplog.text  # not the store's 3


def test_tar_unlike_its_index_fails_naming_it_and_keeps_the_others(
    shards: Path, reference: Path, tmp_path: Path
) -> None:
    """A tar whose sha256 is not the one its folder's index.json recorded (a flipped byte inside an image still
    reads as a valid tar) is not extracted; the other shards are, and after a repair the rerun adds it."""
    folder = Path(shutil.copytree(shards, tmp_path / "indexed"))
    entries = [{"name": p.name, "sha256": file_sha256(p)} for p in sorted(folder.glob("*.tar"))]
    write_json_atomic(folder / INDEX_NAME, {"shards": entries})
    tar = folder / "train-000002.tar"
    good = tar.read_bytes()
    data = bytearray(good)
    data[1024 + 200] ^= 0xFF  # inside the first member's bytes, past its header block
    tar.write_bytes(bytes(data))
    store = tmp_path / "s.zarr"
    line = one_line_error(cli_args(folder, store, "tiny-random", "--batch-size", str(BATCH)))
    assert f"shard train-000002 ({tar}): its sha256 is not the one index.json recorded" in line
    assert FeatureStore.open(str(store)).done_shards == ["train-000000", "train-000001"]
    tar.write_bytes(good)
    run(cfg(folder, store), embedder_factory=TINY)
    assert arrays(store) == arrays(reference)


def test_truncated_tar_fails_naming_it_and_keeps_the_others(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    tar = bad / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    store = tmp_path / "t.zarr"
    line = one_line_error(cli_args(bad, store, "tiny-random", "--batch-size", str(BATCH)))
    assert f"shard {tar}: truncated or corrupt tar" in line and "rerun `semspai shard`" in line
    assert FeatureStore.open(str(store)).done_shards == ["train-000000", "train-000002"]


@dataclass
class FakeReading:
    """What a faked `begin_shard` hands out: the job, and whether its reading was stopped."""

    job: str
    closed: bool = False

    def close(self) -> None:
        self.closed = True


def test_inline_run_reads_the_next_shard_ahead_and_writes_beside_the_embedding(monkeypatch) -> None:
    next_started = threading.Event()
    events: list[tuple[str, str]] = []
    readings: list[FakeReading] = []

    def begin(job: str) -> FakeReading:
        events.append(("begin", job))
        if job == "bad-begin":
            raise ValueError("cannot begin")
        readings.append(FakeReading(job))
        return readings[-1]

    def compute(reading: FakeReading):
        job = reading.job
        events.append(("compute", job))
        if job == "b":
            next_started.set()
        if job == "bad":
            raise ValueError("unreadable")
        return f"rows-{job}", 0.0

    def write(job: str, rows: str, start: float) -> str:
        if job == "a":  # without the overlap, b would not start before a's write ends: the wait times out
            events.append(("b started during a's write", str(next_started.wait(timeout=60))))
        events.append(("write", job))
        return f"done-{job}"

    monkeypatch.setattr(extraction, "already_done", lambda job: None)
    monkeypatch.setattr(extraction, "begin_shard", begin)
    monkeypatch.setattr(extraction, "compute_shard", compute)
    monkeypatch.setattr(extraction, "write_shard", write)
    jobs = ["a", "b", "bad", "bad-begin", "c"]
    out = list(InlineDistributor().map_shards(jobs))
    assert [(j, r) for j, r, _ in out] == [(j, None if j.startswith("bad") else f"done-{j}") for j in jobs]
    assert [str(e) for _, _, e in out] == ["None", "None", "unreadable", "cannot begin", "None"]
    assert ("b started during a's write", "True") in events
    assert [j for kind, j in events if kind == "write"] == ["a", "b", "c"]  # one write at a time, in order
    order = [f"{kind} {j}" for kind, j in events if kind in ("begin", "compute")]
    # each shard's reading begins before the shard before it is embedded: it runs ahead meanwhile
    assert order == ["begin a", "begin b", "compute a", "begin bad", "compute b", "begin bad-begin", "compute bad",
                     "begin c", "compute c"]  # fmt: skip

    # a caller that stops early (a's outcome comes once b is embedded): c's reading, begun ahead and never
    # embedded, is stopped (a and b are closed by the real compute_shard, faked here)
    readings.clear()
    shards = InlineDistributor().map_shards(["a", "b", "c", "d"])
    next(shards)
    shards.close()
    assert [(r.job, r.closed) for r in readings] == [("a", False), ("b", False), ("c", True)]


def test_dask_task_threads_embed_one_shard_at_a_time_and_read_and_write_beside_it(monkeypatch) -> None:
    """A Dask worker runs `extract_shard` in several task threads: shards are embedded one at a time; one more
    (not every waiting one: each holds device memory) begins reading while one is embedded, and is embedded while
    the one before is written."""
    a_computing, b_submitted, b_computing = threading.Event(), threading.Event(), threading.Event()
    computing = threading.Lock()  # held by whichever compute runs: a second one at the same time is a failure
    events: list[tuple[str, str]] = []
    readings: list[FakeReading] = []
    began = threading.Semaphore(0)

    def begin(job: str) -> FakeReading:
        readings.append(FakeReading(job))
        began.release()
        return readings[-1]

    def compute(reading: FakeReading):
        job = reading.job
        if not computing.acquire(blocking=False):
            events.append(("computes overlapped", job))
            return f"rows-{job}", 0.0
        try:
            if job == "a":
                a_computing.set()
                b_submitted.wait(timeout=10)
                events.append(("one more began reading during a's compute", str(began.acquire(timeout=10))))
                time.sleep(0.2)  # a window for b or c to compute too, or to begin reading, if nothing kept them out
                events.append(("readings begun during a's compute", str(len(readings))))
            else:
                b_computing.set()
        finally:
            computing.release()
        return f"rows-{job}", 0.0

    def write(job: str, rows: str, start: float) -> str:
        if job == "a":  # without the overlap, b would not start before a's write ends: the wait times out
            events.append(("another computed during a's write", str(b_computing.wait(timeout=10))))
        return f"done-{job}"

    monkeypatch.setattr(extraction, "already_done", lambda job: None)
    monkeypatch.setattr(extraction, "begin_shard", begin)
    monkeypatch.setattr(extraction, "compute_shard", compute)
    monkeypatch.setattr(extraction, "write_shard", write)
    with ThreadPoolExecutor(3) as pool:
        a = pool.submit(extraction.extract_shard, "a")
        assert a_computing.wait(timeout=10) and began.acquire(timeout=10)  # a's own reading
        rest = [pool.submit(extraction.extract_shard, job) for job in ("b", "c")]
        b_submitted.set()
        assert [f.result() for f in (a, *rest)] == ["done-a", "done-b", "done-c"]
    assert events == [
        ("one more began reading during a's compute", "True"),
        ("readings begun during a's compute", "2"),  # a's and one more: the third thread waited
        ("another computed during a's write", "True"),
    ]


@dataclass(frozen=True)
class SlowFactory:
    calls: list = field(default_factory=list, compare=False, hash=False)

    def __call__(self) -> object:
        self.calls.append(1)
        time.sleep(0.3)  # a model load: long enough for a second task thread to ask meanwhile
        return object()


def test_the_worker_embedder_is_built_once_whichever_task_thread_asks(monkeypatch) -> None:
    monkeypatch.setattr(extraction, "_EMBEDDERS", {})
    factory = SlowFactory()
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: extraction.worker_embedder(factory), range(2))
    assert first is second and len(factory.calls) == 1


def test_a_device_reading_never_embedded_stops_its_producer_when_closed(tmp_path: Path, monkeypatch) -> None:
    make_shards(tmp_path, n_shards=1, per_shard=8, corrupt=False)
    monkeypatch.setattr("semspai.pipeline.extraction.DEVICE_CHUNK_PIXELS", 300 * 300)  # about one image a chunk
    opts = ExtractOptions(BATCH, 2, gpu_decode=True, device="cpu")
    before = set(threading.enumerate())
    reading = extraction.begin_shard(ShardJob(str(tmp_path / "train-000000.tar"), "unused", TINY, opts))
    producers = [t for t in threading.enumerate() if t.name == "producer" and t not in before]
    time.sleep(0.5)  # it decodes DEVICE_AHEAD chunks of eight, then waits for room
    assert any(t.is_alive() for t in producers)
    reading.close()
    assert not any(t.is_alive() for t in producers)
    reading.sha256.result(timeout=10)


def test_a_task_run_again_for_a_shard_its_lost_worker_finished_reports_it_done(
    shards: Path, reference: Path, tmp_path: Path, monkeypatch
) -> None:
    """Dask reruns the task of a worker lost after it marked its shard done and before its result came back:
    the rerun reports the shard as the store has it, computing and writing nothing (it used to fail the run
    with "already done")."""
    store = Path(shutil.copytree(reference, tmp_path / "s.zarr"))
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    monkeypatch.setattr(extraction, "begin_shard", lambda job: pytest.fail("a done shard was read again"))
    job = ShardJob(str(shards / "train-000001.tar"), str(store), TINY, ExtractOptions(BATCH, 0))
    summary = extraction.extract_shard(job)
    marker = FeatureStore.open(str(store)).shard_info["train-000001"]
    assert (summary.name, summary.n_images, summary.n_skipped) == ("train-000001", marker["n_images"],
                                                                   len(marker["skipped"]))  # fmt: skip
    assert summary.n_images > 0 and summary.pid == marker["writer"]["pid"]
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    # a shard not done (its group removed) is extracted as ever
    shutil.rmtree(store / "shards" / "train-000001")
    with pytest.raises(pytest.fail.Exception, match="read again"):
        extraction.extract_shard(job)
    # nor is one done by another tar (its index recorded another sha256)
    other = dataclasses.replace(job, shard=str(shards / "train-000002.tar"), expected_sha256="0" * 64)
    with pytest.raises(pytest.fail.Exception, match="read again"):
        extraction.extract_shard(other)
    monkeypatch.undo()
    # the same race later: the shard becomes done (by a worker counted lost, yet running) while this task
    # computes; its write then finds it done and reports it so, writing nothing
    features, start = extraction.compute_shard(extraction.begin_shard(job))
    shutil.rmtree(store)
    shutil.copytree(reference, store)
    assert extraction.write_shard(job, features, start).n_images == summary.n_images
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_workers_get_paths_that_do_not_depend_on_their_working_folder(
    shards: Path, reference: Path, tmp_path: Path, monkeypatch
) -> None:
    """Relative --shards and --store, as typed on a cluster's login node: each task runs in a worker started
    elsewhere (here: another working folder), and the store is the same as the reference."""

    class Elsewhere(extraction.InlineDistributor):
        def map_shards(self, jobs):
            monkeypatch.chdir(tmp_path / "elsewhere")  # a worker's own working folder
            try:
                yield from ((job, extraction.extract_shard(job), None) for job in jobs)
            finally:
                monkeypatch.chdir(tmp_path)

    (tmp_path / "elsewhere").mkdir()
    shutil.copytree(shards, tmp_path / "shards")
    monkeypatch.chdir(tmp_path)
    result = run(cfg("shards", "rel.zarr"), embedder_factory=TINY, distributor_factory=lambda *a: Elsewhere())
    assert len(result.extracted) == 3 and not (tmp_path / "elsewhere" / "rel.zarr").exists()
    ours, ref = FeatureStore.open(str(tmp_path / "rel.zarr")), FeatureStore.open(str(reference))
    assert ours.keys == ref.keys and np.array_equal(ours.global_vectors(), ref.global_vectors())


def test_batches_are_full_and_keep_order() -> None:
    seen: list[int] = []

    def embed(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x[:, 0, 0, :2].float()  # (B, 2): the crop's id, passed through

    batcher = CropBatcher(embed, batch_size=4)
    ids = 0
    for n in (6, 1, 5, 3):  # crops per image
        crops = torch.zeros(n, 3, 1, 2)
        crops[:, 0, 0, 0] = torch.arange(ids, ids + n)
        batcher.add(crops)
        ids += n
    out = batcher.finish(dim=2)
    assert seen == [4, 4, 4, 3]
    assert out[:, 0].tolist() == list(range(15))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        CUDA,
    ],
)
def test_gpu_decode_agrees_with_the_decode_function(device: str) -> None:
    for seed, (w, h) in enumerate(((224, 224), (700, 250), (513, 389))):
        data = encode(photo(w, h, seed), "JPEG")
        want = decode_image(data).astype(np.float32)  # (H, W, 3)
        got = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, device=device)
        diff = np.abs(got.permute(1, 2, 0).cpu().numpy().astype(np.float32) - want)
        assert diff.mean() <= DECODE_MEAN_TOL and np.quantile(diff, 0.999) <= DECODE_P999_TOL


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_device_crops_match_cpu_crops(shards: Path, device: str) -> None:
    embedder = TINY()
    samples = list(iter_shard(shards / "train-000000.tar"))
    opts = ExtractOptions(batch_size=BATCH, decode_workers=1)
    cpu = extract_features(samples, embedder, "s", "x", opts)
    dev = extract_features(samples, embedder, "s", "x", ExtractOptions(BATCH, 1, gpu_decode=True, device=device))
    assert np.array_equal(cpu.boxes, dev.boxes) and np.array_equal(cpu.local_offsets, dev.local_offsets)
    for a, b in ((cpu.global_, dev.global_), (cpu.local, dev.local)):
        cos = (a.astype(np.float32) * b.astype(np.float32)).sum(axis=1)
        assert cos.min() >= DEVICE_COSINE_MIN
    if device != "cpu":
        return
    # patches need no resize at 224: identical pixels, identical crops, for the JPEGs decoded on the device
    jpeg = next(s for s in samples if s.ext == "jpg")
    assert torch.equal(CpuCrops(embedder)(jpeg).crops[1:], DeviceCrops(embedder, "cpu")(jpeg).crops[1:])


def test_device_chunks_bounded_by_pixels_give_the_same_rows(shards: Path, monkeypatch) -> None:
    embedder = TINY()
    samples = list(iter_shard(shards / "train-000000.tar"))
    opts = ExtractOptions(BATCH, 2, gpu_decode=True, device="cpu")
    whole = extract_features(samples, embedder, "s", "x", opts)
    seen: list[int] = []
    prepare = DeviceCrops.prepare
    monkeypatch.setattr(DeviceCrops, "prepare", lambda self, probes: seen.append(len(probes)) or prepare(self, probes))
    monkeypatch.setattr("semspai.pipeline.extraction.DEVICE_CHUNK_PIXELS", 300 * 300)  # about one image a chunk
    small = extract_features(samples, embedder, "s", "x", opts)
    assert len(seen) > len(samples) // 2 and sum(seen) == len(samples)
    for name in ("global_", "local", "boxes", "local_offsets", "width", "height"):
        assert np.array_equal(getattr(whole, name), getattr(small, name)), name
    assert whole.keys == small.keys


def test_device_decode_reads_each_next_shard_ahead_and_keeps_the_rows(shards: Path, tmp_path: Path, monkeypatch):
    """With the real device path (on the CPU): while a shard is embedded, the next one's first chunk is already
    decoded; the rows are those of each shard extracted alone."""
    names = sorted(p.stem for p in shards.glob("*.tar"))
    first_key = {next(iter(iter_shard(shards / f"{n}.tar"))).key: n for n in names}
    decoded = {n: threading.Event() for n in names}
    prepare = DeviceCrops.prepare

    def recording(self, probes):
        out = prepare(self, probes)
        if probes[0].sample.key in first_key:
            decoded[first_key[probes[0].sample.key]].set()
        return out

    seen: list[tuple[str, bool]] = []
    features_of = extraction.features_of

    def embedding(prepared, embedder, name, sha256, opts):
        nxt = names[names.index(name) + 1 : names.index(name) + 2]  # without read-ahead, its wait times out
        seen.append((name, all(decoded[n].wait(timeout=20) for n in nxt)))
        return features_of(prepared, embedder, name, sha256, opts)

    monkeypatch.setattr(DeviceCrops, "prepare", recording)
    monkeypatch.setattr(extraction, "features_of", embedding)
    store = tmp_path / "ahead.zarr"
    run(cfg(shards, store, gpu_decode=True), embedder_factory=TINY)
    assert seen == [(n, True) for n in names]
    monkeypatch.undo()
    got = arrays(store)
    opts = ExtractOptions(BATCH, 2, gpu_decode=True, device="cpu")
    for n in names:
        alone = extract_features(iter_shard(shards / f"{n}.tar"), TINY(), n, "", opts)
        assert got[f"{n}/global"][1] == alone.global_.tobytes() and got[f"{n}/local"][1] == alone.local.tobytes()


def _rotated_jpeg(rgb: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_device_chunk_of_mixed_images_matches_cpu_crops(device: str) -> None:
    """One batched device call over a chunk of every kind the device path meets, in order, against CpuCrops."""
    embedder = TINY()
    jpeg = encode(photo(500, 375, 1), "JPEG", quality=92)
    kinds = {
        "same-size-a": jpeg,  # two equal sizes: one group, one set of batched kernels
        "same-size-b": encode(photo(500, 375, 2), "JPEG", quality=92),
        "other-size": encode(photo(300, 700, 3), "JPEG", quality=92),
        "small-padded": encode(photo(100, 80, 4), "JPEG", quality=92),  # below 224: the host grid pads
        "png": encode(photo(256, 256, 5), "PNG"),
        "exif-rotated": _rotated_jpeg(photo(320, 240, 6)),
        "xmp-rotated": encode(photo(320, 240, 8), "JPEG", xmp=XMP_ROTATED),  # the orientation in XMP only
        "rgb-coded": with_adobe(encode(photo(240, 230, 9), "JPEG"), 0),  # components stored as RGB: PIL's
        "truncated": jpeg[: len(jpeg) // 2],
        "grey": encode(photo(260, 250, 7)[..., 0], "JPEG"),
    }
    samples = [ShardSample(k, data, "png" if k == "png" else "jpg", {"label": 0}) for k, data in kinds.items()]
    dev = DeviceCrops(embedder, device)
    probes = [dev.probe(s) for s in samples]
    on_device = {p.sample.key for p in probes if p.data is not None}
    assert on_device == {"same-size-a", "same-size-b", "other-size", "small-padded", "grey"}
    got = dev.prepare(probes)
    assert [g.key for g in got] == list(kinds)
    cpu = CpuCrops(embedder)
    for sample, g in zip(samples, got, strict=True):
        want = cpu(sample)
        assert g.error == want.error, sample.key
        if want.error:
            assert "truncated" in sample.key and g.crops is None
            continue
        assert (g.height, g.width) == (want.height, want.width), sample.key  # after EXIF orientation
        assert np.array_equal(g.boxes, want.boxes), sample.key
        assert g.crops.shape == want.crops.shape, sample.key
        levels = (g.crops.cpu() - want.crops).abs() * 255 * torch.tensor(embedder.spec.std).view(3, 1, 1)
        if device == "cpu":  # libjpeg on both sides: grid patches (no resize) are the same pixels
            assert torch.equal(g.crops[1:], want.crops[1:]), sample.key
        else:  # nvjpeg's IDCT: within the decode tolerance
            assert levels[1:].mean() <= DECODE_MEAN_TOL, sample.key
        # the global view is resized by torch's bicubic instead of PIL's: close, not equal (about 7 grey
        # levels at most on these noisy photos; DEVICE_COSINE_MIN bounds what that does to the vectors)
        assert levels[0].mean() < 7, sample.key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for nvjpeg")
def test_device_crops_never_overwrite_what_queued_kernels_still_read() -> None:
    """nvJPEG writes its outputs without waiting for queued kernels, and the caching allocator hands out a freed
    block at once (pytorch/vision#9606). Decoding while the caller's stream is busy must corrupt neither the
    caller's queued reads of memory it just freed, nor crops handed over earlier and still being read."""
    embedder = ClipFactory("tiny-random", "cuda", "fp32")()
    size = (3, 512, 512)  # the decoder's output for these JPEGs: freed blocks of this size are what it reuses
    samples = [ShardSample(f"k{i}", encode(photo(512, 512, i), "JPEG"), "jpg", {"label": 0}) for i in range(4)]
    dev = DeviceCrops(embedder, "cuda")

    def chunk() -> list[torch.Tensor]:
        return [p.crops for p in dev.prepare([dev.probe(s) for s in samples])]

    want = [c.double().sum().item() for c in chunk()]  # on an idle device
    for _ in range(10):
        victims = [torch.full(size, 7, dtype=torch.uint8, device="cuda") for _ in range(2 * len(samples))]
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # keeps the caller's stream busy while the reads below wait
        victim_sums = [v.sum(dtype=torch.int64) for v in victims]
        del victims  # freed with reads still queued
        first = chunk()
        torch.cuda._sleep(100_000_000)
        crop_sums = [c.double().sum() for c in first]
        del first  # handed-over crops released with reads still queued, then the next chunk made
        chunk()
        torch.cuda.synchronize()
        assert [s.item() for s in victim_sums] == [7 * size[0] * size[1] * size[2]] * len(victim_sums)
        assert [s.item() for s in crop_sums] == pytest.approx(want, rel=1e-9)


def test_injected_reader_and_unreadable_image(tmp_path: Path) -> None:
    def reader(path: str | Path) -> list[ShardSample]:
        good = encode(photo(256, 256, 1), "PNG")
        return [ShardSample("a", good, "png", {"label": 0}), ShardSample("b", b"", "png", {"label": 1})]

    (tmp_path / "train-000000.tar").write_bytes(b"stand-in")
    result = run(cfg(tmp_path / "train-000000.tar", tmp_path / "s.zarr"), embedder_factory=TINY, read=reader)
    assert result.n_images == 1 and result.n_skipped == 1
    fs = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert fs.keys == ["a"] and fs.skipped[0]["key"] == "b" and "empty file" in fs.skipped[0]["reason"]


def test_default_prompt_bank_is_imagenet() -> None:
    bank = prompt_bank()
    assert len(bank) == 1000 and bank[0] == "a photo of a tench."
    assert all(p.startswith("a photo of a ") and p.endswith(".") for p in bank)
    assert len(set(bank)) >= 998  # ImageNet repeats two names (crane, maillot)


def test_unreadable_or_empty_prompt_file_is_one_line_error(shards: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n \n")
    for path, why in (
        (tmp_path / "none.txt", "cannot read the class-name file"),
        (tmp_path / "empty.txt", "the class-name file is empty"),
    ):
        line = one_line_error([*cli_args(shards, tmp_path / "s.zarr")[:-2], "--prompts", str(path)])
        assert line.startswith(f"Error: --prompts {path}: {why}")


def test_help() -> None:
    result = CliRunner().invoke(cli, ["extract-clip", "--help"])
    assert result.exit_code == 0
    for opt in (
        "--shards",
        "--store",
        "--clip",
        "--workers",
        "--scheduler",
        "--decode-workers",
        "--batch-size",
        "--device",
        "--precision",
        "--gpu-decode",
    ):
        assert opt in result.output


def test_missing_shards_is_one_line_error(tmp_path: Path) -> None:
    line = one_line_error(
        [
            "extract-clip",
            "--shards",
            str(tmp_path / "none-{000000..000001}.tar"),
            "--store",
            str(tmp_path / "s.zarr"),
            "--clip",
            "tiny-random",
            "--workers",
            "0",
        ]
    )
    assert "do not exist" in line
    with pytest.raises(ShardError):
        run(cfg(tmp_path / "nothing", tmp_path / "s.zarr"))


def test_the_input_check_ends_when_the_run_has_failed(shards: Path, reference: Path, monkeypatch) -> None:
    """The check hashes the store's tars in a thread while the cluster starts; a run that fails meanwhile tells
    it to stop, so no hashing outlives the run."""
    from semspai.stages import extract as extract_stage

    hashed: list[Path] = []
    monkeypatch.setattr(extract_stage, "file_sha256", lambda p: hashed.append(p) or "0" * 64)
    stop = threading.Event()
    stop.set()
    extract_stage.check_inputs(str(reference), resolve_shards(shards), stop=stop)
    assert hashed == []
    with pytest.raises(FeatureStoreError, match="changed since it was extracted"):  # not stopped: it hashes
        extract_stage.check_inputs(str(reference), resolve_shards(shards))
    assert len(hashed) == 1


def test_a_store_in_a_folder_of_something_else_is_refused_before_anything_starts(shards: Path) -> None:
    def no_cluster(*args):
        raise AssertionError("a cluster was started (and the encoder loaded) before the path was checked")

    before = sorted(p.name for p in shards.iterdir())
    with pytest.raises(FeatureStoreError, match="is a folder of something else, not a feature store"):
        run(cfg(shards, shards), distributor_factory=no_cluster)  # the shard folder given as --store by a slip
    assert sorted(p.name for p in shards.iterdir()) == before


def test_a_jpeg_nvjpeg_refuses_goes_to_the_cpu_decoder_with_a_warning_but_out_of_memory_is_an_error(
    monkeypatch, caplog
) -> None:
    import torchvision.io

    embedder = TINY()
    samples = [ShardSample(f"k{i}", encode(photo(260, 240, 20 + i), "JPEG"), "jpg", {"label": 0}) for i in range(3)]
    real = torchvision.io.decode_jpeg
    refused = samples[1].image

    def decode_jpeg(data, **kw):
        if isinstance(data, list):
            if any(bytes(d.numpy()) == refused for d in data):
                raise RuntimeError("Error while decoding JPEG images: unsupported JPEG")
            return real(data, **kw)
        if bytes(data.numpy()) == refused:
            raise RuntimeError("Error while decoding JPEG images: unsupported JPEG")
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    dev = DeviceCrops(embedder, "cpu")
    with caplog.at_level(logging.WARNING, logger="semspai.pipeline.extraction"):
        got = dev.prepare([dev.probe(s) for s in samples])
    assert "nvjpeg could not decode 1 JPEG(s) (e.g. k1); the CPU decoder takes them" in caplog.text
    cpu = CpuCrops(embedder)
    for sample, g in zip(samples, got, strict=True):
        assert torch.equal(g.crops[1:], cpu(sample).crops[1:]), sample.key

    def out_of_memory(data, **kw):
        raise RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        dev.prepare([dev.probe(s) for s in samples])
