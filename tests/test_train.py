"""`semspai train`: run directory, checkpoints, resume, CLIP never built, config checks, DDP."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from semspai.pipeline import engine
from semspai.pipeline.config import ConfigError, load_config
from semspai.pipeline.data import STORE_CACHE_DIR, DataError
from semspai.pipeline.engine import (
    INTERRUPT_WAIT_S,
    Trainer,
    TrainResult,
    best_epoch,
    is_best,
    last_epoch,
    lr_at,
    shared_tar_shas,
    youden_threshold,
)
from semspai.pipeline.iterate import Background
from semspai.stages import train as train_stage
from semspai.stages.cli import cli
from semspai.stages.evaluate import EvalConfig
from semspai.stages.evaluate import run as evaluate
from semspai.stages.extract import ExtractConfig
from semspai.stages.extract import run as extract
from semspai.stages.shard import ShardConfig
from semspai.stages.shard import run as shard_stage
from semspai.stages.train import TrainStageConfig, run
from semspai.store import shards as shards_module
from semspai.store.checkpoints import CheckpointError, load_checkpoint
from semspai.store.features import FeatureStore, FeatureStoreError
from semspai.store.locks import run_lock
from semspai.store.manifest import MANIFEST_NAME, StaleOutputError, fingerprint_paths
from semspai.store.shards import file_sha256, resolve_shards, shard_name
from tests.conftest import make_tree

MICRO = [
    "MODEL.SPECTRAL.ENCODER=spectral-vit-micro",
    "MODEL.HIDDEN_DIM=32",
    "MODEL.SCA_HEADS=2",
    "MODEL.SEMANTIC.PROJ_DIM=16",
    "TRAIN.EPOCHS=2",
    "TRAIN.BATCH_SIZE=4",
    "TRAIN.WARMUP_EPOCHS=0.5",
    "DATA.MAX_PATCHES=2",
    "LOSS.SEMANTIC_WEIGHT=0.5",
]
CPU = torch.device("cpu")


class Interrupted(Exception):
    pass


def _train(shards: Path, store: Path | None, out: Path, extra: tuple[str, ...] = (), on_epoch_end=None,
           init: Path | None = None):  # fmt: skip
    cfg = TrainStageConfig(shards=str(shards), out=str(out), store=str(store) if store else None,
                           overrides=[*MICRO, *extra], init=str(init) if init else None)  # fmt: skip
    return run(cfg, CPU, on_epoch_end=on_epoch_end)


@pytest.fixture(scope="module")
def full_run(tiny_shards: Path, train_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    _train(tiny_shards, train_store, out)
    return out


def test_early_stop_ends_a_run_after_its_patience_and_best_pt_follows_is_best():
    def history(*aucs):
        return [{"epoch": i + 1, "val_auc": a} for i, a in enumerate(aucs)]

    h = history(0.6, 0.7, 0.65, 0.68, 0.9)
    assert [last_epoch(h, 10, p) for p in (0, 1, 2, 3)] == [10, 3, 4, 10]
    assert last_epoch(h, 3, 2) == 3 and best_epoch(h) == 5 and best_epoch(h[:4]) == 2
    tie = history(0.7, 0.7 + 1e-15, 0.69)  # float noise is no better AUC (is_best), for best.pt and early stop
    assert best_epoch(tie) == 1 and last_epoch(tie, 10, 2) == 3
    assert last_epoch(history(None, None), 10, 1) == 2 and best_epoch(history(None, None)) == 1


def test_early_stop_stops_training_and_a_rerun_or_resume_has_nothing_to_do(tiny_shards, train_store, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    scripted = {1: 0.6, 2: 0.8, 3: 0.7, 4: 0.75, 5: 0.99}  # patience 2: epochs 3 and 4 beat nothing -> stop at 4
    real = Trainer.validate

    def validate(self, epoch):
        return real(self, epoch) | {"val_auc": scripted[epoch]}

    monkeypatch.setattr(Trainer, "validate", validate)
    out = tmp_path / "run"
    extra = ("TRAIN.EPOCHS=5", "TRAIN.EARLY_STOP=2")
    result = _train(tiny_shards, train_store, out, extra)
    assert result.stopped_early and result.epochs_run == 4 and [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert engine.load_checkpoint(out / "checkpoints" / "best.pt")["epoch"] == 2
    args = ["train", "--from-store", str(train_store), "--shards", str(tiny_shards), "--out", str(out)]
    args += [x for o in (*MICRO, *extra) for x in ("--set", o)]
    for more in ([], ["--resume"]):
        res = CliRunner().invoke(cli, [*args, *more])
        assert res.exit_code == 0 and "it stopped early after epoch 4 (TRAIN.EARLY_STOP)" in res.output, res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_run_directory_and_checkpoint_contents(full_run: Path, train_store: Path):
    names = sorted(p.name for p in (full_run / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch-0001.pt", "epoch-0002.pt", "last.pt"]
    assert (full_run / "semspai-stage.json").exists()
    resolved = load_config(full_run / "config.yaml")
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"epoch", "step", "loss", "val_auc", "val_ap", "val_acc", "lr"} <= set(r)
        assert 0 <= r["val_auc"] <= 1 and r["loss"] > 0
    state = load_checkpoint(full_run / "checkpoints" / "last.pt")  # weights_only
    store = FeatureStore.open(str(train_store))
    assert state["clip_spec"] == store.clip_spec and state["clip_dim"] == store.embed_dim == 64
    assert state["config"] == resolved.to_dict() and resolved.MODEL.CLIP.NAME == "tiny-random"
    assert state["threshold"] == rows[-1]["threshold"] and 0 <= state["threshold"] <= 1
    assert state["epoch"] == 2 and state["step"] == 4
    assert state["train_generators"] == {"gan_a": 2, "gan_b": 2}  # the train split's fakes: eval marks the unseen
    assert set(state["optimizer"]) == {"state", "param_groups"} and "torch" in state["rng"]
    assert load_checkpoint(full_run)["epoch"] in (1, 2)  # RUN -> best.pt
    assert rows[-1]["lr"] == pytest.approx(1e-6)  # the cosine reached MIN_LR on the last step


def test_resume_after_interruption_matches_the_uninterrupted_run(full_run, tiny_shards, train_store, tmp_path):
    out = tmp_path / "resumed"

    def stop(row: dict) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        _train(tiny_shards, train_store, out, on_epoch_end=stop)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch-0001.pt", "last.pt"]
    with pytest.raises(FileExistsError, match="--resume"):
        _train(tiny_shards, train_store, out)
    # the shards copied elsewhere (new paths, new mtimes, as to a node's scratch disk) are the same input
    moved = Path(shutil.copytree(tiny_shards, tmp_path / "scratch" / "shards", copy_function=shutil.copyfile))
    assert (moved / "train-000000.tar").stat().st_mtime_ns != (tiny_shards / "train-000000.tar").stat().st_mtime_ns
    names = [t.stem for t in sorted(moved.glob("*.tar")) if not t.name.startswith("test-")]
    fewer = str(moved / f"{{{','.join(names)}}}.tar")  # test tars left out: other input
    with pytest.raises(StaleOutputError, match=r"--resume: the run's input shards changed since it started"):
        run(TrainStageConfig(shards=fewer, out=str(out), store=str(train_store), resume=True), CPU)
    with pytest.raises(ConfigError, match=r"--resume: the config differs .*\(TRAIN.EPOCHS; see "):
        run(TrainStageConfig(shards=str(tiny_shards), out=str(out), store=str(train_store), resume=True,
                             overrides=["TRAIN.EPOCHS=3"]), CPU)  # fmt: skip
    # a memory budget is no part of what the run is: resumable with another (its store then memory-mapped)
    result = run(TrainStageConfig(shards=str(moved), out=str(out), store=str(train_store), resume=True,
                                  overrides=["DATA.STORE_MEMORY_GB=0"]), CPU)  # fmt: skip
    assert result.epochs_run == 1
    assert (out / "metrics.jsonl").read_bytes() == (full_run / "metrics.jsonl").read_bytes()
    a, b = load_checkpoint(out / "checkpoints" / "last.pt"), load_checkpoint(full_run / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # resuming a finished run: exit 0, nothing to do
    res = CliRunner().invoke(
        cli, ["train", "--from-store", str(train_store), "--shards", str(tiny_shards), "--out", str(out), "--resume"]
    )
    assert res.exit_code == 0, res.output
    assert "nothing to do" in res.output


def test_rerun_is_up_to_date_stale_after_a_change_and_force_starts_over(
    full_run, tiny_shards, train_store, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    (out / "metrics.jsonl.0a1b2c3d.partial").write_text("half a file")  # what a kill mid-write leaves
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if not p.name.endswith(".partial")}
    args = ["train", "--from-store", str(train_store), "--shards", str(tiny_shards), "--out", str(out)]
    built = []
    monkeypatch.setattr(engine, "Trainer", lambda *a, **k: built.append(1))  # up to date: nothing is built
    res = CliRunner().invoke(cli, [*args, *(x for o in MICRO for x in ("--set", o))])
    assert res.exit_code == 0, res.output
    assert "up to date: all 2 epochs are done with the same config and inputs; nothing to do" in res.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before and not built  # nothing rewritten, nor left
    with monkeypatch.context() as m:  # the tars' hashes the run recorded serve while the tars are unchanged
        m.setattr(shards_module, "file_sha256", lambda path: pytest.fail(f"{path} was read again"))
        assert run(TrainStageConfig(str(tiny_shards), str(out), str(train_store), overrides=MICRO), CPU).nothing_to_do
    # shards that another run extracted into the store change nothing for this one
    grown = tmp_path / "grown.zarr"
    shutil.copytree(train_store, grown)
    other = tmp_path / "other"
    shard_stage(ShardConfig(sources=[str(make_tree(tmp_path / "more"))], out=str(other), prefix="more"))
    extract(ExtractConfig(shards=str(other), store=str(grown), clip="tiny-random", workers=0))
    assert run(TrainStageConfig(str(tiny_shards), str(out), str(grown), overrides=MICRO), CPU).nothing_to_do
    # a run fingerprinted by an earlier semspai (tar paths, sizes, mtimes) stays up to date while that holds
    old = Path(shutil.copytree(full_run, tmp_path / "old"))
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    tars = resolve_shards(str(tiny_shards))
    manifest["inputs"]["shards"] = fingerprint_paths(tars)
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert run(TrainStageConfig(str(tiny_shards), str(old), str(train_store), overrides=MICRO), CPU).nothing_to_do
    st = tars[0].stat()
    os.utime(tars[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # its fingerprint then changes (not the tar)
    try:
        with pytest.raises(StaleOutputError, match="its input shards changed"):
            run(TrainStageConfig(str(tiny_shards), str(old), str(train_store), overrides=MICRO), CPU)
    finally:
        os.utime(tars[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.undo()
    # started over, it is fingerprinted by content: the old way's fingerprint is not carried on
    run(TrainStageConfig(str(tiny_shards), str(old), str(train_store), overrides=MICRO, force=True), CPU)
    assert json.loads((old / MANIFEST_NAME).read_text())["inputs"]["shards"] != fingerprint_paths(tars)
    with pytest.raises(
        StaleOutputError,
        match=r"another configuration \(TRAIN.EPOCHS differ\). Rerun into another --out, or .*--force. to start over",
    ):
        _train(tiny_shards, train_store, out, ("TRAIN.EPOCHS=1",))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(ConfigError, match="pass one"):
        run(TrainStageConfig(str(tiny_shards), str(out), str(train_store), resume=True, force=True), CPU)
    cfg = TrainStageConfig(str(tiny_shards), str(out), str(train_store), overrides=[*MICRO, "TRAIN.EPOCHS=1"],
                           force=True)  # fmt: skip
    assert run(cfg, CPU).epochs_run == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch-0001.pt", "last.pt"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert load_config(out / "config.yaml").TRAIN.EPOCHS == 1
    (out / "checkpoints" / "mine.pt").write_bytes(b"a copy of my own")
    assert run(cfg, CPU).epochs_run == 1  # --force again: what training wrote goes, files of one's own stay
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch-0001.pt", "last.pt", "mine.pt"]
    shutil.rmtree(out / "checkpoints")  # metrics left without checkpoints: only --force can go on
    with pytest.raises(FileExistsError, match=r"no checkpoints/last.pt to go on from; run .*--force"):
        _train(tiny_shards, train_store, out, ("TRAIN.EPOCHS=1",))


def test_init_starts_a_fresh_run_from_a_checkpoints_weights(full_run, tiny_shards, train_store, tmp_path):
    source = full_run / "checkpoints" / "last.pt"
    trained = load_checkpoint(source)
    out = tmp_path / "tuned"
    still = ("TRAIN.BASE_LR=0", "TRAIN.MIN_LR=0", "TRAIN.EPOCHS=1")  # no step moves a weight: the run keeps the init's
    result = _train(tiny_shards, train_store, out, still, init=full_run)  # RUN -> its best.pt
    best = load_checkpoint(full_run)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["model"].keys() == best["model"].keys()
    for k in best["model"]:
        assert torch.equal(state["model"][k], best["model"][k]), k
    for k in best["loss_head"]:  # the semantic projection too: the store's encoder is the one it learnt on
        assert torch.equal(state["loss_head"][k], best["loss_head"][k]), k
    assert state["init"] == {"path": str((full_run / "checkpoints" / "best.pt").resolve()),
                             "sha256": file_sha256(full_run / "checkpoints" / "best.pt"), "epoch": best["epoch"]}  # fmt: skip
    assert result.history[0]["val_auc"] == best["val_metrics"]["val_auc"]  # val scored with the same weights
    # the same command is up to date; without --init, or from other weights, it is another run
    assert _train(tiny_shards, train_store, out, still, init=full_run).nothing_to_do
    with pytest.raises(StaleOutputError, match=r"started from the weights of a checkpoint \(--init\), this one starts "
                       "from scratch"):  # fmt: skip
        _train(tiny_shards, train_store, out, still)
    other = full_run / "checkpoints" / ("epoch-0001.pt" if best["epoch"] == 2 else "epoch-0002.pt")
    with pytest.raises(StaleOutputError, match=r"its input init changed"):
        _train(tiny_shards, train_store, out, still, init=other)
    # a fine-tune learns from there: 2 epochs with the run's learning rate, interrupted and resumed without --init
    tuned, resumed = tmp_path / "tuned2", tmp_path / "resumed"

    def stop(row: dict) -> None:
        raise Interrupted

    _train(tiny_shards, train_store, tuned, init=source)
    with pytest.raises(Interrupted):
        _train(tiny_shards, train_store, resumed, init=source, on_epoch_end=stop)
    run(TrainStageConfig(str(tiny_shards), str(resumed), str(train_store), resume=True), CPU)
    assert (resumed / "metrics.jsonl").read_bytes() == (tuned / "metrics.jsonl").read_bytes()
    a, b = load_checkpoint(resumed / "checkpoints" / "last.pt"), load_checkpoint(tuned / "checkpoints" / "last.pt")
    assert a["init"] == b["init"] and a["init"]["epoch"] == trained["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert any(not torch.equal(a["model"][k], trained["model"][k]) for k in a["model"])


def test_init_from_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(
    full_run, tiny_shards, train_store, tmp_path
):
    source = full_run / "checkpoints" / "last.pt"
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"does not fit this run's model \(.*\); it was trained with other "
                       r"MODEL.HIDDEN_DIM: set the MODEL keys"):  # fmt: skip
        _train(tiny_shards, train_store, out, ("MODEL.HIDDEN_DIM=64",), init=source)
    with pytest.raises(CheckpointError, match=r"other MODEL.SEMANTIC.MODE, MODEL.USE_SEMANTIC_CONTEXT"):
        _train(tiny_shards, None, out, ("MODEL.SEMANTIC.MODE=none", "LOSS.SEMANTIC_WEIGHT=0"), init=source)
    foreign = load_checkpoint(source)  # the same model, learnt on the vectors of another encoder
    foreign["clip_spec"] = {**foreign["clip_spec"], "sha256": "0" * 64, "arg": "ViT-B-32:other.safetensors"}
    torch.save(foreign, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"learnt on the CLIP vectors of ViT-B-32:other.safetensors, but feature "
                       r"store .* holds those of tiny-random"):  # fmt: skip
        _train(tiny_shards, train_store, out, init=tmp_path / "foreign.pt")
    assert not out.exists()
    # the spectral-only baseline reads no CLIP vector: a checkpoint of one starts a run with no store
    none = ("MODEL.SEMANTIC.MODE=none", "LOSS.SEMANTIC_WEIGHT=0", "TRAIN.EPOCHS=1")
    base = tmp_path / "base"
    _train(tiny_shards, None, base, none)
    res = CliRunner().invoke(cli, ["train", "--shards", str(tiny_shards), "--out", str(out), "--init", str(base),
                                   *(x for o in [*MICRO, *none] for x in ("--set", o))])  # fmt: skip
    assert res.exit_code == 0, res.output
    started = f"from the weights of {(base / 'checkpoints' / 'best.pt').resolve()} (epoch 1): "
    assert f"trained 1 epoch(s) into {out} {started}" in " ".join(res.output.split()), res.output
    assert load_checkpoint(out / "checkpoints" / "last.pt")["init"]["epoch"] == 1
    res = CliRunner().invoke(cli, ["train", "--shards", str(tiny_shards), "--out", str(tmp_path / "x"), "--init",
                                   str(tmp_path / "nowhere.pt")])  # fmt: skip
    assert res.exit_code == 2 and "nowhere.pt' does not exist" in res.output


def test_another_stages_output_is_never_a_run_dir_and_one_run_at_a_time(tiny_shards, train_store, tmp_path):
    before = {p: p.read_bytes() for p in tiny_shards.iterdir()}
    for force in (False, True):
        with pytest.raises(StaleOutputError, match="holds the output of `semspai shard`, not a training run"):
            run(TrainStageConfig(str(tiny_shards), str(tiny_shards), str(train_store), overrides=MICRO, force=force),
                CPU)  # fmt: skip
    assert {p: p.read_bytes() for p in tiny_shards.iterdir()} == before
    with pytest.raises(StaleOutputError, match="is a feature store, not a training run"):
        _train(tiny_shards, train_store, train_store)
    assert not (train_store / "checkpoints").exists()
    out = tmp_path / "r"
    with run_lock(tmp_path / "r.lock", RuntimeError):  # as another process training into it holds it
        with pytest.raises(FileExistsError, match=r"being trained into by another `semspai train` \(pid"):
            _train(tiny_shards, train_store, out)
    assert not out.exists()


@pytest.mark.parametrize("where,device,on_device", [("auto", "cpu", False), ("auto", "meta", True),
                                                     ("device", "cpu", True), ("loader", "meta", False)])  # fmt: skip
def test_where_augmentation_runs(tiny_shards, train_store, tmp_path, where, device, on_device):
    cfg = load_config(None, [*MICRO, f"AUG.WHERE={where}"])
    trainer = Trainer(cfg, str(tiny_shards), tmp_path / "t", str(train_store), torch.device(device), "fp32")
    assert trainer.train_stream.view.aug_on_device is on_device and trainer.val_stream.view.aug is None


def test_an_epoch_closes_its_loader_used_up_or_not(tiny_shards, train_store, tmp_path, monkeypatch):
    """A rank may take fewer batches than its stream makes (DDP keeps ranks in step); its loader thread and
    processes end with the epoch all the same. An interrupted epoch waits for them a bounded time only (a
    producer thread left inside torch at exit could abort the process)."""
    cfg = load_config(None, [*MICRO, "DATA.NUM_WORKERS=2"])
    trainer = Trainer(cfg, str(tiny_shards), tmp_path / "t", str(train_store), CPU, "fp32")
    assert trainer.steps_per_epoch == 2
    trainer.steps_per_epoch = 1  # one of the epoch's two batches is left unused
    assert math.isfinite(trainer._train_epoch(1, None))
    assert not [t for t in threading.enumerate() if t.name == "producer"] and not multiprocessing.active_children()
    closes, close = [], Background.close
    monkeypatch.setattr(
        Background, "close", lambda self, wait=True, timeout=None: (closes.append(timeout), close(self, wait, timeout))
    )

    def interrupted(batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer._train_epoch(2, None)
    assert closes == [INTERRUPT_WAIT_S] and not [t for t in threading.enumerate() if t.name == "producer"]


def test_augmenting_on_the_device_trains_the_same_run(full_run, tiny_shards, train_store, tmp_path):
    """AUG.WHERE=device on the CPU: the loader ships patches as cut with their draws, the trainer applies them to
    the whole batch, and the run is bit for bit the one augmented in the loader (AUG.WHERE=auto on the CPU)."""
    out = tmp_path / "device"
    _train(tiny_shards, train_store, out, ("AUG.WHERE=device",))
    assert (out / "metrics.jsonl").read_bytes() == (full_run / "metrics.jsonl").read_bytes()
    a, b = load_checkpoint(out / "checkpoints" / "last.pt"), load_checkpoint(full_run / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


def test_loader_processes_train_the_same_run(full_run, tiny_shards, train_store, tmp_path):
    """DATA.NUM_WORKERS is a speed setting: the loader draws its worker seeds from a generator of its own, so
    dropout (torch's global generator) draws the same numbers with loader processes as without."""
    out = tmp_path / "workers"
    _train(tiny_shards, train_store, out, ("DATA.NUM_WORKERS=1",))
    assert load_config(full_run / "config.yaml").MODEL.DROPOUT > 0
    assert (out / "metrics.jsonl").read_bytes() == (full_run / "metrics.jsonl").read_bytes()
    a, b = load_checkpoint(out / "checkpoints" / "last.pt"), load_checkpoint(full_run / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])


@pytest.mark.slow
def test_a_compiled_spectral_branch_trains_the_same_run(full_run, tiny_shards, train_store, tmp_path, monkeypatch):
    """TRAIN.COMPILE: inductor fuses the spectral branch's kernels; the run matches the eager one but for float
    rounding, and its checkpoints load into an uncompiled detector (same parameter names)."""
    import torch._inductor.config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # dropout from eager's generator, as eager
    out = tmp_path / "compiled"
    counters.clear()
    _train(tiny_shards, train_store, out, ("TRAIN.COMPILE=true",))
    assert counters["stats"]["unique_graphs"] >= 2  # it did compile: training and validation
    rows, ref = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, full_run))
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for r, e in zip(rows, ref, strict=True):
        assert r["loss"] == pytest.approx(e["loss"], rel=1e-3) and r["val_auc"] == pytest.approx(e["val_auc"], abs=0.1)
    a, b = load_checkpoint(out / "checkpoints" / "last.pt"), load_checkpoint(full_run / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-3) for k in b["model"])


def test_training_never_builds_clip(full_run, tiny_shards, train_store, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training built a CLIP model")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse)
    monkeypatch.setattr(open_clip.model.CLIP, "__init__", refuse)
    with pytest.raises(AssertionError, match="built a CLIP"):
        open_clip.create_model("tiny-random")  # the trap is armed
    out = tmp_path / "no-clip"
    _train(tiny_shards, train_store, out)
    assert (out / "metrics.jsonl").read_bytes() == (full_run / "metrics.jsonl").read_bytes()
    trainer = Trainer(load_config(None, MICRO), str(tiny_shards), tmp_path / "t", str(train_store), CPU, "fp32")
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    owners = {
        type(m).__module__
        for m in trainer.module.modules()
        if any(id(p) in optimised for p in m.parameters(recurse=False))
    }
    assert owners and not any(o.startswith("open_clip") for o in owners)
    assert optimised == {id(p) for p in trainer.module.parameters() if p.requires_grad}


def test_a_store_shared_with_other_data_sets_is_read_for_the_runs_own_shards_only(
    full_run, tiny_shards, train_store, tmp_path
):
    """One store for several data sets: train and eval read only the rows of their SPEC's shards, so another
    set's shards cost them no memory and their damage does not stop them; it does stop a run that reads them."""
    shared = tmp_path / "shared.zarr"
    shutil.copytree(train_store, shared)
    other = tmp_path / "other"
    shard_stage(ShardConfig(sources=[str(make_tree(tmp_path / "more"))], out=str(other), prefix="more"))
    extract(ExtractConfig(shards=str(other), store=str(shared), clip="tiny-random", workers=0))
    damaged = shard_name(resolve_shards(str(other))[0])
    shutil.rmtree(shared / "shards" / damaged / "global" / "c")
    opened = []
    real_open = FeatureStore.open.__func__

    def spy(cls, *args, **kwargs):
        opened.append(store := real_open(cls, *args, **kwargs))
        return store

    with pytest.MonkeyPatch.context() as m:
        m.setattr(FeatureStore, "open", classmethod(spy))
        out = tmp_path / "run"
        _train(tiny_shards, shared, out)
        evaluated = evaluate(EvalConfig(checkpoints=[str(out)], shards=str(tiny_shards), store=str(shared),
                                        out=str(tmp_path / "eval"), device="cpu", bootstrap=20, n_heatmaps=0))  # fmt: skip
    ours = {shard_name(p) for p in resolve_shards(str(tiny_shards))}
    assert len(opened) == 2 and set(opened[0].done_shards) == ours and set(opened[1].done_shards) < ours
    assert (out / "metrics.jsonl").read_bytes() == (full_run / "metrics.jsonl").read_bytes()
    alone = evaluate(EvalConfig(checkpoints=[str(out)], shards=str(tiny_shards), store=str(train_store),
                                out=str(tmp_path / "eval-alone"), device="cpu", bootstrap=20, n_heatmaps=0))  # fmt: skip
    assert np.array_equal(evaluated.runs[0].scores, alone.runs[0].scores)
    with pytest.raises(FeatureStoreError, match=rf"is damaged: shards/{damaged}/global: 1 of its 1 chunk files"):
        _train(other, shared, tmp_path / "other-run", extra=("LOSS.SEMANTIC_WEIGHT=0",))


def test_a_store_over_the_memory_limit_is_memory_mapped_with_the_same_result(
    full_run, tiny_shards, train_store, tmp_path
):
    over = ("DATA.STORE_MEMORY_GB=0",)  # every store is "larger than memory"
    trainer = Trainer(
        load_config(None, [*MICRO, *over]), str(tiny_shards), tmp_path / "t", str(train_store), CPU, "fp32"
    )
    assert trainer.store._local and all(isinstance(rows, np.memmap) for rows, _, _ in trainer.store._local.values())
    out = tmp_path / "mapped"
    cached: list[list[str]] = []

    def look(row: dict) -> None:  # while training: one .npy copy per store shard in the run dir
        cached.append(sorted(p.suffix for p in (out / STORE_CACHE_DIR).iterdir()))

    _train(tiny_shards, train_store, out, over, on_epoch_end=look)
    n_shards = len(FeatureStore.open(str(train_store)).done_shards)
    assert cached == [[".npy"] * n_shards] * 2
    assert not (out / STORE_CACHE_DIR).exists()  # removed when training ends
    assert (out / "metrics.jsonl").read_bytes() == (full_run / "metrics.jsonl").read_bytes()


def test_tensorboard_gets_train_and_val_scalars_when_installed(tiny_shards, train_store, tmp_path, monkeypatch):
    """TensorBoard is optional (not installed in CI): a stand-in SummaryWriter records what training logs."""
    writers: list = []

    class Writer:
        def __init__(self, logdir: str) -> None:
            self.logdir, self.scalars, self.closed = logdir, [], False
            writers.append(self)

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.append((tag, float(value), step))

        def close(self) -> None:
            self.closed = True

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    monkeypatch.setattr("semspai.pipeline.engine.TB_READ_EVERY", 3)  # read mid-epoch too, not only at its end
    out = tmp_path / "tb"
    _train(tiny_shards, train_store, out, ("TRAIN.BATCH_SIZE=1",))  # several steps an epoch
    (w,) = writers
    assert w.logdir == str(out / "tensorboard") and w.closed
    tags = {t for t, _, _ in w.scalars}
    assert {"train/loss", "train/bce", "train/semantic", "train/lr", "val/auc", "val/loss"} <= tags
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(v, st) for t, v, st in w.scalars if t == "val/auc"] == [(r["val_auc"], r["step"]) for r in rows]
    # one train/loss per step, every step once, averaging to each epoch's loss in metrics.jsonl
    losses = {st: v for t, v, st in w.scalars if t == "train/loss"}
    assert sorted(losses) == list(range(1, rows[-1]["step"] + 1)) and rows[0]["step"] > 3
    for prev, row in zip([{"step": 0}, *rows], rows, strict=False):
        epoch = [losses[st] for st in range(prev["step"] + 1, row["step"] + 1)]
        assert sum(epoch) / len(epoch) == pytest.approx(row["loss"], rel=1e-6)


def test_mode_none_trains_without_a_store(tiny_shards, tmp_path):
    none = ("MODEL.SEMANTIC.MODE=none", "MODEL.USE_SEMANTIC_CONTEXT=false", "LOSS.SEMANTIC_WEIGHT=0", "TRAIN.EPOCHS=1",
            "DATA.GENERATORS=gan_b")  # fmt: skip
    result = _train(tiny_shards, None, tmp_path / "none", none)
    assert len(result.history) == 1
    state = load_checkpoint(tmp_path / "none")
    assert state["clip_spec"] == {} and state["train_generators"] == {"gan_b": 2}


def test_cli_summary_names_the_best_epoch_that_eval_and_predict_use(tiny_shards, train_store, tmp_path):
    args = ["train", "--from-store", str(train_store), "--shards", str(tiny_shards), "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(cli, [*args, *(a for o in [*MICRO, "TRAIN.EPOCHS=3"] for a in ("--set", o))])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    best = load_checkpoint(tmp_path / "r")  # RUN -> best.pt
    (row,) = [r for r in rows if r["epoch"] == best["epoch"]]
    assert row["val_auc"] == max(r["val_auc"] for r in rows)
    assert (
        f"best.pt (what eval and predict take for RUN) is epoch {row['epoch']}: val AUC {row['val_auc']:.4f}, "
        f"AP {row['val_ap']:.4f}, threshold {best['threshold']:.3f}"
    ) in res.output
    assert f"last epoch val AUC {rows[-1]['val_auc']:.4f}" in res.output


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("TRAIN.EPOCHS=0", "Error: TRAIN.EPOCHS: 0 is out of range (expected >= 1)"),
        ("TRAIN.BATCH_SIZE=0", "Error: TRAIN.BATCH_SIZE: 0 is out of range (expected >= 1)"),
        ("MODEL.SPECTRAL.ENCODER=nosuch", "Error: MODEL.SPECTRAL.ENCODER: no model JSON 'nosuch'"),
    ],
)
def test_bad_values_are_one_line_errors_before_anything_is_written(
    tiny_shards, train_store, tmp_path, override, message
):
    args = ["train", "--from-store", str(train_store), "--shards", str(tiny_shards), "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(cli, [*args, "--set", override])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("extra", "store", "message"),
    [
        ((), False, "--from-store"),
        (("MODEL.CLIP.NAME=ViT-B-32",), True, "MODEL.CLIP.NAME=ViT-B-32 contradicts feature store"),
        (("MODEL.CLIP.WEIGHTS=openai",), True, "MODEL.CLIP.WEIGHTS=openai contradicts"),
    ],
)
def test_config_contradictions_are_errors(tiny_shards, train_store, tmp_path, extra, store, message):
    with pytest.raises(ConfigError, match=message):
        _train(tiny_shards, train_store if store else None, tmp_path / "x", extra)
    assert not (tmp_path / "x").exists()


def test_semantic_loss_needs_a_text_tower(tiny_shards, tmp_path):
    from semspai.stages.extract import ExtractConfig
    from semspai.stages.extract import run as extract

    store = tmp_path / "timm.zarr"
    extract(ExtractConfig(shards=str(tiny_shards), store=str(store), clip="timm/test_vit:random", workers=0))
    with pytest.raises(ConfigError, match="no text tower; set LOSS.SEMANTIC_WEIGHT=0"):
        _train(tiny_shards, store, tmp_path / "run")
    result = _train(tiny_shards, store, tmp_path / "run", ("LOSS.SEMANTIC_WEIGHT=0", "TRAIN.EPOCHS=1"))
    assert load_checkpoint(tmp_path / "run")["clip_dim"] == FeatureStore.open(str(store)).embed_dim
    assert len(result.history) == 1


def test_generator_filter_reaching_an_empty_class_is_an_error(tiny_shards, train_store, tmp_path):
    res = CliRunner().invoke(
        cli,
        [
            "train",
            "--from-store",
            str(train_store),
            "--shards",
            str(tiny_shards),
            "--out",
            str(tmp_path / "r"),
            "--set",
            "DATA.GENERATORS=nope",
        ],
    )
    assert res.exit_code == 1 and "DATA.GENERATORS: no fake image of the given shards comes from 'nope'" in res.output
    assert "(their generators: gan_a, gan_b)" in res.output  # a typo is named as one, with the names there are
    with pytest.raises(DataError):
        _train(tiny_shards, train_store, tmp_path / "r", ("DATA.GENERATORS=nope",))


def test_schedule_and_threshold():
    lrs = [lr_at(s, total=10, warmup=2, base_lr=1.0, min_lr=0.0) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.9]) == pytest.approx(0.35)


def test_best_epoch_ties_keep_the_earlier_even_through_float_noise():
    assert is_best([0.5]) and is_best([0.5, 0.52]) and not is_best([0.6, 0.52])
    assert not is_best([0.711111111111111, 0.5, 0.7111111111111111])  # 32/45 twice, as a run's metrics had it
    assert is_best([32 / 45, 0.5, 32 / 45 + 1 / (4000 * 4000)])  # the smallest true step of a large val set


DDP_SCRIPT = """
import json, logging, sys, torch, torch.distributed as dist
from semspai.pipeline.engine import Trainer
from semspai.pipeline.config import load_config
from semspai.stages.train import init_distributed
from semspai.store import shards as shards_module
shards, store, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
logging.basicConfig(level=logging.INFO)
init_distributed(torch.device("cpu"))
hashed = []  # the tars this rank read to hash them
hash_file = shards_module.file_sha256
shards_module.file_sha256 = lambda path: hashed.append(str(path)) or hash_file(path)
seen = []
trainer = Trainer(load_config(None, overrides), shards, out, store, torch.device("cpu"), "fp32")
stream = trainer.train_stream
for epoch in (1, 2):
    stream.set_epoch(epoch)
    seen.append(sorted(s.key for s in stream))
result = trainer.fit()
with open(f"{out}.rank{dist.get_rank()}.json", "w") as fh:
    json.dump({"seen": seen, "plan": sorted(stream.plan.labels), "steps": trainer.steps_per_epoch,
               "dropped": trainer.dropped_per_epoch, "history": result.history, "hashed": hashed}, fh)
dist.destroy_process_group()
"""


def test_ddp_two_cpu_processes_split_the_epoch(tiny_shards, train_store, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp-run"
    # batches of 2 over 2 ranks: with an odd split size one rank may hold one batch more, which it drops
    overrides = [*MICRO, "TRAIN.BATCH_SIZE=2", "DATA.GENERATORS=gan_a"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tiny_shards),
        str(train_store),
        str(out),
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"ddp-run.rank{r}.json").read_text()) for r in range(2)]
    plan = ranks[0]["plan"]
    for epoch in range(2):
        a, b = ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]
        assert not set(a) & set(b) and sorted(a + b) == plan
    sizes = [len(ranks[0]["seen"][0]), len(ranks[1]["seen"][0])]  # round-robin deal: differ by at most one
    assert sizes[0] - sizes[1] in (0, 1)
    batches = [math.ceil(n / 2) for n in sizes]
    assert ranks[0]["steps"] == ranks[1]["steps"] == min(batches)
    assert ranks[0]["dropped"] == sum(batches) - 2 * min(batches) <= 1
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert history == ranks[0]["history"] == ranks[1]["history"]  # validation gathered over both ranks
    assert len(load_checkpoint(out / "checkpoints" / "last.pt")["rng_ranks"]) == 2  # each rank resumes its own
    # the tars hashed once per start, by rank 0 alone (the run had recorded no hash yet)
    assert sorted(ranks[0]["hashed"]) == sorted(map(str, resolve_shards(str(tiny_shards)))) and ranks[1]["hashed"] == []
    for line in ("train: ", "epoch 2: loss", "epoch 2/2: done"):  # rank 0 reports for both (the rest: warnings)
        assert proc.stderr.count(line) == 1, (line, proc.stderr[-3000:])


@pytest.mark.parametrize("ran,line", [(3, "trained 3 epoch(s) into r: "), (1, "trained 1 epoch(s) into r (epoch 3 of 3, "
                                      "resumed): "), (2, "trained 2 epoch(s) into r (epochs 2-3 of 3, resumed): ")])  # fmt: skip
def test_the_summary_line_says_which_epochs_a_resumed_run_trained(monkeypatch, ran, line):
    rows = [{"epoch": e, "val_auc": 0.5, "val_ap": 0.5, "threshold": 0.5} for e in (1, 2, 3)]
    monkeypatch.setattr(train_stage, "run", lambda cfg, device: TrainResult(Path("r"), False, ran, rows))
    res = CliRunner().invoke(cli, ["train", "--shards", "s", "--out", "r", *(["--resume"] if ran < 3 else [])])
    assert res.exit_code == 0, res.output
    assert line in res.output


def test_a_run_fingerprinted_the_old_way_resumes(tiny_shards, train_store, tmp_path):
    """A run an earlier semspai started (its tars fingerprinted by path, size and mtime) resumes while that
    fingerprint still holds, and is refused as changed once it does not."""
    out = tmp_path / "old"

    def stop(row: dict) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        _train(tiny_shards, train_store, out, on_epoch_end=stop)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    tars = resolve_shards(str(tiny_shards))
    manifest["inputs"]["shards"] = fingerprint_paths(tars)
    del manifest["file_shas"]  # not written then
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    resume = TrainStageConfig(str(tiny_shards), str(out), str(train_store), overrides=MICRO, resume=True)
    st = tars[0].stat()
    os.utime(tars[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        with pytest.raises(StaleOutputError, match=r"--resume: the run's input shards changed since it started"):
            run(resume, CPU)
    finally:
        os.utime(tars[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run(resume, CPU).epochs_run == 1


@pytest.mark.parametrize("change,what", [("drop", "1 of rank 0's tars missing here"), ("grow", "1 tar(s) of another "
                         "size than rank 0's")])  # fmt: skip
def test_a_ddp_rank_that_sees_other_tars_than_rank_0_is_refused(tiny_shards, tmp_path, monkeypatch, change, what):
    """Rank 0 hashes the tars for every rank; a rank that resolves the SPEC to other tars (another node's copy
    short of one, or of another size) would deal out other samples, and says so instead of training."""
    tars = resolve_shards(str(tiny_shards))
    sent = shared_tar_shas(tars, tmp_path / "run", 0, 1)
    rank0 = [{shard_name(p): [p.stat().st_size, sent[str(p)]] for p in tars}]
    assert shared_tar_shas(tars, tmp_path / "run", 0, 1) == sent
    monkeypatch.setattr(engine.dist, "broadcast_object_list", lambda objs, src: objs.__setitem__(0, rank0[0]))
    monkeypatch.setattr(shards_module, "file_sha256", lambda path: pytest.fail(f"rank 1 read {path}"))
    assert shared_tar_shas(tars, tmp_path / "run", 1, 2) == sent  # rank 1 takes rank 0's hashes, reads nothing
    mine = tmp_path / "mine"
    shutil.copytree(tiny_shards, mine)
    copies = resolve_shards(str(mine))
    if change == "drop":
        copies = copies[1:]
    else:
        with open(copies[-1], "ab") as fh:
            fh.write(b"\0" * 512)
    with pytest.raises(DataError, match=re.escape(f"DDP rank 1 resolves --shards to other tars than rank 0 ({what}")):
        shared_tar_shas(copies, tmp_path / "run", 1, 2)


def test_each_ddp_rank_resumes_from_its_own_random_state(caplog):
    """Ranks draw apart (their batches hold other patch counts); a checkpoint keeps each rank's RNGs and a
    resumed rank goes on from its own. A checkpoint with one rank's state (an earlier semspai) warns."""
    states = []
    for draws in (3, 7):  # two ranks that drew differently
        torch.manual_seed(0)
        np.random.seed(0)
        torch.rand(draws)
        np.random.rand(draws)
        states.append(engine.rng_state(CPU))
    want = (torch.rand(4), np.random.rand(2))  # what rank 1 draws next
    torch.manual_seed(5)
    np.random.seed(5)
    engine.restore_rng_state({"rng": states[0], "rng_ranks": states}, 1, 2, CPU)
    got = (torch.rand(4), np.random.rand(2))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    engine.restore_rng_state({"rng": states[0]}, 1, 2, CPU)
    assert "random state of 1 rank(s), not 2" in caplog.text
    assert not torch.equal(torch.rand(4), want[0])  # rank 0's, not its own


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda(tiny_shards, train_store, tmp_path):
    """A run interrupted on the GPU resumes there (the checkpoint's RNG states are loaded onto the CPU, where
    the RNG setters take them) and ends with each rank's CUDA generator where the uninterrupted run left it."""
    cuda = torch.device("cuda", torch.cuda.current_device())

    def train(out: Path, resume: bool = False, on_epoch_end=None):
        cfg = TrainStageConfig(str(tiny_shards), str(out), str(train_store), overrides=MICRO, resume=resume)
        return run(cfg, cuda, on_epoch_end=on_epoch_end)

    def stop(row: dict) -> None:
        raise Interrupted

    train(tmp_path / "full")
    with pytest.raises(Interrupted):
        train(tmp_path / "r", on_epoch_end=stop)
    assert train(tmp_path / "r", resume=True).epochs_run == 1
    a, b = (load_checkpoint(tmp_path / n / "checkpoints" / "last.pt")["rng"] for n in ("full", "r"))
    assert torch.equal(a["cuda_device"], b["cuda_device"]) and torch.equal(a["torch"], b["torch"])


def test_each_rank_finds_its_own_gpu_or_says_why_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert train_stage.pick_device() == torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match="WORLD_SIZE is 8 but LOCAL_RANK is not set.*launch DDP with torchrun"):
        train_stage.pick_device()  # srun or mpirun alone: every rank would take GPU 0
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert train_stage.pick_device() == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK is 5 but this process sees 4 GPUs \(0-3\)"):
        train_stage.pick_device()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU a task, as SLURM may give
    assert train_stage.pick_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_stage.pick_device() == CPU


def test_an_epoch_whose_val_auc_is_at_most_chance_is_warned_about(tiny_shards, train_store, tmp_path, monkeypatch,
                                                                    caplog):  # fmt: skip
    real, calls = engine.validation_metrics, []

    def metrics(labels, probs, logits):  # the first epoch tells val's classes apart no better than chance
        calls.append(1)
        return real(labels, probs, logits) | (
            {"val_auc": 0.4, "threshold": 1.0} if len(calls) == 1 else {"val_auc": 0.8}
        )

    monkeypatch.setattr(engine, "validation_metrics", metrics)
    with caplog.at_level(logging.WARNING, logger="semspai"):
        _train(tiny_shards, train_store, tmp_path / "r")
    warned = [r.getMessage() for r in caplog.records if "val AUC" in r.getMessage()]
    assert warned == ["epoch 1: val AUC 0.400: the model does not (yet) tell val's fakes from its reals, so threshold "
                      "1.000 is no real choice"]  # fmt: skip


def _frozen_bn_encoder(root: Path, seed: int) -> tuple[Path, Path]:
    """A frozen encoder with BatchNorm (EfficientNet-Lite0's first two stages) and its weights, drawn from `seed`."""
    import timm
    from safetensors.torch import save_file

    spec = {"timm_model": "efficientnet_lite0", "feature_indices": [0, 1], "frozen": True, "srs_dim": 8,
            "context_dim": 8}  # fmt: skip
    encoder = root / "frozen-bn.json"
    encoder.write_text(json.dumps(spec))
    torch.manual_seed(seed)
    backbone = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    for m in backbone.modules():  # pretrained statistics, not the init's zeros and ones
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    weights = root / f"frozen-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    return encoder, weights


def test_a_frozen_encoder_run_records_its_encoder_and_weights(full_run, tiny_shards, tmp_path, caplog):
    from semspai.pipeline.inference import load_detector

    encoder, weights = _frozen_bn_encoder(tmp_path, seed=1)
    (tmp_path / "b").mkdir()
    _, other = _frozen_bn_encoder(tmp_path / "b", seed=2)
    none = ("MODEL.SEMANTIC.MODE=none", "LOSS.SEMANTIC_WEIGHT=0", "TRAIN.EPOCHS=1")
    frozen = (f"MODEL.SPECTRAL.ENCODER={encoder}", f"MODEL.SPECTRAL.ENCODER_WEIGHTS={weights}")
    out = tmp_path / "run"
    _train(tiny_shards, None, out, (*none, *frozen))
    state = load_checkpoint(out)
    assert state["spectral_encoder"]["config"] == {**json.loads(encoder.read_text()), "timm_kwargs": {},
                                                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    assert state["spectral_encoder"]["weights_sha256"] == file_sha256(weights)
    assert json.loads((out / MANIFEST_NAME).read_text())["inputs"]["encoder_weights"] == file_sha256(weights)
    images = [np.random.default_rng(i).integers(0, 256, (300, 260, 3), dtype=np.uint8) for i in range(3)]
    scores = [p.score for p in load_detector(out).predict(images)]
    # the checkpoint rebuilds its encoder from what it recorded: the model JSON may change or go
    encoder.write_text(json.dumps({"timm_model": "efficientnet_lite0", "feature_indices": [0], "frozen": True}))
    assert [p.score for p in load_detector(out).predict(images)] == scores
    encoder.unlink()
    moved = tmp_path / "moved.safetensors"
    weights.rename(moved)
    with pytest.raises(CheckpointError, match=r"needs the weights of its frozen spectral encoder efficientnet_lite0 "
                       r"\(sha256 [0-9a-f]{12}…\), which are not at .*frozen-1.safetensors: pass --encoder-weights"):  # fmt: skip
        load_detector(out)
    assert [p.score for p in load_detector(out, encoder_weights=str(moved)).predict(images)] == scores
    with pytest.raises(CheckpointError, match=r"--encoder-weights .*frozen-2.safetensors \(sha256 [0-9a-f]{12}…\) are "
                       r"not the weights checkpoint .* was trained with"):  # fmt: skip
        load_detector(out, encoder_weights=str(other))
    shutil.copyfile(other, weights)  # other weights at the path it was trained with
    with pytest.raises(CheckpointError, match=r"the frozen spectral encoder's weights at .*frozen-1.safetensors"):
        load_detector(out)
    # the CLI takes the option; a checkpoint that trained its encoder ignores it (eval may compare both kinds)
    png = tmp_path / "a.png"
    Image.fromarray(images[0]).save(png)
    res = CliRunner().invoke(cli, ["predict", str(png), "--checkpoint", str(out), "--encoder-weights", str(moved)])
    assert res.exit_code == 0, res.output
    row = next(csv.DictReader(io.StringIO(res.output[res.output.index("path,") :])))
    assert math.isclose(float(row["score"]), scores[0], abs_tol=1e-6), res.output
    with caplog.at_level(logging.WARNING):
        load_detector(full_run, encoder_weights=str(moved), encoder=False)
    assert (
        f"--encoder-weights {moved} is not used by" in caplog.text and "it trained its spectral encoder" in caplog.text
    )
    # training: other weights at the run's path are another input; --init with other weights is refused
    encoder.write_text(json.dumps({"timm_model": "efficientnet_lite0", "feature_indices": [0, 1], "frozen": True,
                                   "srs_dim": 8, "context_dim": 8}))  # fmt: skip
    with pytest.raises(StaleOutputError, match="its input encoder_weights changed"):
        _train(tiny_shards, None, out, (*none, *frozen))
    with pytest.raises(CheckpointError, match=r"--init .* learnt on the features of a frozen spectral encoder with "
                       r"weights of sha256 [0-9a-f]{12}…, but this run's MODEL.SPECTRAL.ENCODER_WEIGHTS is "
                       r".*frozen-1.safetensors \(sha256"):  # fmt: skip
        _train(tiny_shards, None, tmp_path / "tuned", (*none, *frozen), init=out)
    shutil.copyfile(moved, weights)
    assert _train(tiny_shards, None, out, (*none, *frozen)).nothing_to_do


def test_a_run_that_diverges_is_a_one_line_error_naming_the_epoch(tiny_shards, train_store, tmp_path):
    args = ["train", "--from-store", str(train_store), "--shards", str(tiny_shards), "--out", str(tmp_path / "r")]
    overrides = [*MICRO, "TRAIN.EPOCHS=1", "TRAIN.BASE_LR=1e6"]  # finite, and far too large
    res = CliRunner().invoke(cli, [*args, *(x for o in overrides for x in ("--set", o))])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert re.search(r"Error: epoch 1: (the training loss is nan|\d+ val logits are NaN or infinite): training "
                     r"diverged, .*start over \(--force\) with a lower TRAIN.BASE_LR \(now 1e\+06\)", res.output)  # fmt: skip
    assert not (tmp_path / "r" / "checkpoints").exists() or not any((tmp_path / "r" / "checkpoints").iterdir())
