"""`semspai train`: spectral encoder + fusion head trained on shard pixels and cached CLIP vectors."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from semspai.pipeline.config import ConfigError, load_config
from semspai.pipeline.progress import quiet_progress
from semspai.stages.common import config_options, user_errors
from semspai.store.atomic import clear_partials
from semspai.store.locks import lock_beside, run_lock
from semspai.store.manifest import MANIFEST_NAME

if TYPE_CHECKING:  # torch and the engine are imported where they are used: `train --help` answers at once
    import torch

    from semspai.pipeline.engine import TrainResult

log = logging.getLogger(__name__)


@dataclass
class TrainStageConfig:
    shards: str  # SPEC: folder, glob or brace pattern
    out: str  # the run directory
    store: str | None = None  # the feature store; None only for MODEL.SEMANTIC.MODE none
    config_path: str | None = None
    overrides: list[str] = field(default_factory=list)
    resume: bool = False
    force: bool = False  # start over in a run dir that holds a run (its checkpoints are deleted)
    init: str | None = None  # a fresh run starts from this checkpoint's weights (a .pt, or a run dir: its best.pt)


def pick_device() -> torch.device:
    """The device, decided once here: this rank's GPU under torchrun (GPU LOCAL_RANK; GPU 0 when the launcher
    gave each process one GPU of its own), else the first GPU, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" not in os.environ:
        raise ConfigError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but LOCAL_RANK is not set, so this process "
                          "cannot tell which GPU is its own: launch DDP with torchrun, which sets both")  # fmt: skip
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local < count:
        return torch.device("cuda", local)
    if count == 1:  # e.g. SLURM with one GPU a task: the process sees only its own
        return torch.device("cuda", 0)
    raise ConfigError(f"LOCAL_RANK is {local} but this process sees {count} GPUs (0-{count - 1}); start at most "
                      f"{count} processes per node, or give each one GPU of its own")  # fmt: skip


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group when launched by torchrun with more than one process."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if dist.get_rank() != 0:  # rank 0 reports for all: the others log warnings and errors only, and no bars
            logging.getLogger("semspai").setLevel(logging.WARNING)
            quiet_progress()


def run(cfg: TrainStageConfig, device: torch.device | None = None, on_epoch_end=None) -> TrainResult:
    """Train (or, with `resume`, continue) the run in `cfg.out`; returns its metrics history."""
    import torch.distributed as dist

    from semspai.pipeline.clip import resolve_precision
    from semspai.pipeline.engine import CONFIG_NAME, METRICS_NAME, Trainer, finished_run

    if cfg.resume and cfg.force:
        raise ConfigError("--resume continues the run in --out and --force starts it over: pass one")
    config_path = cfg.config_path
    saved = Path(cfg.out) / CONFIG_NAME
    own = cfg.resume and config_path is None and saved.exists()
    if own:  # resuming means the run's own resolved config (--set may change NOT_IDENTITY), checked when it began
        config_path = str(saved)
    run_cfg = load_config(config_path, cfg.overrides, saved=own)
    lock = lock_beside(cfg.out)  # rank 0 holds it for all ranks

    def busy(holder: str) -> FileExistsError:
        return FileExistsError(f"{cfg.out} is being trained into by another `semspai train` ({holder}, lock {lock})")

    rank = dist.get_rank() if dist.is_initialized() else 0
    with run_lock(lock, busy) if rank == 0 else contextlib.nullcontext():
        if rank == 0:  # what a run killed while writing its metrics log or manifest left
            clear_partials([Path(cfg.out) / name for name in (METRICS_NAME, MANIFEST_NAME)])
        if (
            not cfg.resume
            and not cfg.force
            and (done := finished_run(run_cfg, cfg.shards, cfg.out, cfg.store, cfg.init))
        ):
            return done  # up to date, told without reading the store's vectors or building the model
        device = device or pick_device()
        precision = resolve_precision(run_cfg.TRAIN.PRECISION, device)
        trainer = Trainer(run_cfg, cfg.shards, cfg.out, cfg.store, device, precision, cfg.init)
        return trainer.fit(resume=cfg.resume, on_epoch_end=on_epoch_end, force=cfg.force)


@click.command("train")
@click.option(
    "--from-store",
    "store",
    type=click.Path(),
    default=None,
    help="Feature store of CLIP vectors (required unless MODEL.SEMANTIC.MODE is none and LOSS.SEMANTIC_WEIGHT is 0).",
)
@click.option("--shards", required=True, help="Shard SPEC: folder, glob or brace pattern.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@config_options
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch checkpoint.")
@click.option(
    "--force", is_flag=True, help="Start over in an --out that holds a run (deletes its checkpoints and metrics)."
)
@click.option(
    "--init",
    "init",
    type=click.Path(exists=True),
    default=None,
    help="Start from the weights of this checkpoint (a .pt, or a run dir: its best.pt), with a fresh optimiser and "
    "schedule: fine-tune on new data, or train a finished run further. The MODEL keys must build its model.",
)
@user_errors
def command(store, shards, out, config_path, overrides, resume, force, init) -> None:
    """Train the spectral encoder and fusion head; CLIP vectors come from the store, never from CLIP.

    Learns on the `train` split, selects on `val`; writes OUT/config.yaml, OUT/metrics.jsonl and
    OUT/checkpoints/{epoch-NNNN,last,best}.pt. Under torchrun, runs DistributedDataParallel.
    """
    import torch.distributed as dist

    device = pick_device()
    init_distributed(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        cfg = TrainStageConfig(
            shards=shards,
            out=out,
            store=store,
            config_path=config_path,
            overrides=list(overrides),
            resume=resume,
            force=force,
            init=init,
        )
        result = run(cfg, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:  # rank 0 reports for all
        return
    from semspai.pipeline.engine import best_epoch

    if result.nothing_to_do:
        same = "" if resume else " with the same config and inputs"
        done = (f"it stopped early after epoch {result.history[-1]['epoch']} (TRAIN.EARLY_STOP)" if result.stopped_early
                else f"all {len(result.history)} epochs are done")  # fmt: skip
        click.echo(f"{out}: up to date: {done}{same}; nothing to do"
                   + ("" if resume else ". Pass --force to train again."))  # fmt: skip
        return
    last = result.history[-1]
    kept = best_epoch(result.history)
    best = next(h for h in result.history if h["epoch"] == kept)  # what best.pt holds
    click.echo(
        f"trained {result.epochs_run} epoch(s) into {out}"
        + (
            f" ({_epochs(last['epoch'] - result.epochs_run + 1, last['epoch'])} of {last['epoch']}, resumed)"
            if len(result.history) > result.epochs_run
            else ""
        )
        + (f" from the weights of {result.init['path']} (epoch {result.init['epoch']})" if result.init else "")
        + f": last epoch val AUC {last['val_auc']:.4f}, "
        f"AP {last['val_ap']:.4f}; best.pt (what eval and predict take for RUN) is epoch {best['epoch']}: "
        f"val AUC {best['val_auc']:.4f}, AP {best['val_ap']:.4f}, threshold {best['threshold']:.3f}"
        + ("; stopped early (TRAIN.EARLY_STOP: no better val AUC in as many epochs)" if result.stopped_early else "")
    )
    if result.dropped_batches:
        click.echo(f"dropped {result.dropped_batches} batch(es) to keep the DDP ranks in step")


def _epochs(first: int, last: int) -> str:
    return f"epoch {last}" if first == last else f"epochs {first}-{last}"


__all__ = ["TrainStageConfig", "run", "command"]
