"""The training loop: AdamW with warm-up and cosine decay, validation each epoch, checkpoints, resume, DDP."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, roc_curve
from torch import nn

from semspai import __version__
from semspai.pipeline.config import ConfigError, RunConfig, config_from_dict, save_config
from semspai.pipeline.data import (
    BATCHES_AHEAD,
    STORE_CACHE_DIR,
    DataError,
    ShardStream,
    SplitPlan,
    StoreJoin,
    TrainBatch,
    View,
    collate,
    count_text,
    loader_samples,
    local_spill_dir,
    plan_split,
)
from semspai.pipeline.detector import (
    DetectorBatch,
    create_detector,
    encoder_record,
    load_trainable_state,
    state_misfit,
    trainable_parameters,
    trainable_state_dict,
    unit_pixels,
)
from semspai.pipeline.iterate import Background, batched
from semspai.pipeline.losses import DetectionLoss, LossParts
from semspai.pipeline.progress import progress
from semspai.store.atomic import write_text_atomic
from semspai.store.checkpoints import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from semspai.store.features import FeatureStore, done_shard_attrs, read_store_attrs
from semspai.store.manifest import (
    MANIFEST_NAME,
    StageManifest,
    StaleOutputError,
    check_stage,
    fingerprint_paths,
    leaf_differences,
    read_manifest,
    write_manifest,
)
from semspai.store.shards import file_sha256, file_stats, resolve_shards, shard_name, tar_sha256s

log = logging.getLogger(__name__)

STAGE = "train"
TRAIN_SCHEMA_VERSION = 1
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
TIMM_PREFIX = "timm/"
# per-step TensorBoard scalars are read from the device this many steps at a time: a read every step would
# make the host wait for the device every step
TB_READ_EVERY = 100
INTERRUPT_WAIT_S = 10.0  # how long an interrupted epoch waits for its loader thread to stop


@dataclass
class TrainResult:
    out: Path
    nothing_to_do: bool  # a finished run, resumed or rerun with the same config and inputs
    epochs_run: int  # epochs trained by this call
    history: list[dict] = field(default_factory=list)  # one metrics.jsonl row per finished epoch
    threshold: float = 0.5
    dropped_batches: int = 0  # over all ranks and epochs of this call (DDP evening-out)
    init: dict = field(default_factory=dict)  # where the run started (--init: path, sha256, epoch); {} from scratch
    stopped_early: bool = False  # ended before TRAIN.EPOCHS by TRAIN.EARLY_STOP


class TrainModule(nn.Module):
    """Detector + loss in one module, so DistributedDataParallel averages the loss head's gradients too."""

    def __init__(self, detector: nn.Module, loss: DetectionLoss) -> None:
        super().__init__()
        self.detector = detector
        self.loss = loss

    def forward(self, batch: DetectorBatch, labels: torch.Tensor, text_vec: torch.Tensor | None):
        out = self.detector(batch)
        return self.loss(out.logits, out.embedding, labels, text_vec), out.logits


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast or nothing; `precision` was resolved once at the edge (the stage)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Linear warm-up to `base_lr` over `warmup` steps, then cosine decay to `min_lr` at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


def record_store_clip(cfg: RunConfig, spec: dict, store_path: str) -> RunConfig:
    """The config with the store's encoder in MODEL.CLIP; a MODEL.CLIP.* that names another one is an error."""
    model, _, weights = spec["arg"].partition(":")
    names = {model, spec["model"], TIMM_PREFIX + spec["model"]}
    want = cfg.MODEL.CLIP
    problem = ""
    if want.NAME and want.NAME not in names:
        problem = f"MODEL.CLIP.NAME={want.NAME}"
    elif want.WEIGHTS and not _same_weights(want.WEIGHTS, weights, spec):
        problem = f"MODEL.CLIP.WEIGHTS={want.WEIGHTS}"
    if problem:
        raise ConfigError(
            f"{problem} contradicts feature store {store_path}, made with --clip {spec['arg']}; training uses the "
            "store's encoder: leave MODEL.CLIP empty, or extract a store with the encoder you want"
        )
    resolved = copy.deepcopy(cfg)
    resolved.MODEL.CLIP.NAME, resolved.MODEL.CLIP.WEIGHTS = model, weights
    return resolved


def _same_weights(asked: str, stored_arg_weights: str, spec: dict) -> bool:
    if asked in (stored_arg_weights, spec["weights_id"]):
        return True
    if asked == "random":
        return spec["weights_id"].startswith("seed:")
    path = Path(asked)
    return path.name == spec["weights_id"] and (not path.is_file() or file_sha256(path) == spec["sha256"])


AUC_TIE = 1e-12  # far above float noise (1e-16), far below a true step of AUC (0.5 / (reals x fakes))


def is_best(aucs: list[float]) -> bool:
    """Whether the last epoch's val AUC beats every earlier one's. Ties keep the earlier epoch, float noise
    included: sklearn's trapezoids give one AUC as 0.711111111111111 and 0.7111111111111111, while two AUCs that
    truly differ are at least 0.5 / (reals x fakes) apart (a half for a tied score)."""
    return len(aucs) == 1 or aucs[-1] > max(aucs[:-1]) + AUC_TIE


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The P(fake) threshold maximising TPR - FPR on val (Youden's J): balanced between the classes whatever
    their ratio, unlike best accuracy, which follows the val set's class balance."""
    fpr, tpr, thresholds = roc_curve(labels, probs)
    return float(min(1.0, thresholds[int(np.argmax(tpr - fpr))]))  # roc_curve's first threshold is +inf


def validation_metrics(labels: np.ndarray, probs: np.ndarray, logits: np.ndarray) -> dict:
    """AUC, AP, accuracy at 0.5 (the threshold is chosen on these same images, so accuracy at it would flatter),
    BCE loss and the chosen threshold."""
    bce = nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(labels).float())
    return {
        "val_loss": float(bce),
        "val_auc": float(roc_auc_score(labels, probs)),
        "val_ap": float(average_precision_score(labels, probs)),
        "val_acc": float(accuracy_score(labels, probs >= 0.5)),
        "threshold": youden_threshold(labels, probs),
    }


def rng_state(device: torch.device) -> dict:
    """Every RNG this process's loop draws from, as tensors, lists and numbers (loadable with weights_only); of
    the CUDA generators, the one of `device` only (under DDP each rank draws on its own)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` saved (the tensors on the CPU, as the RNG setters need them)."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda":
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"].cpu(), device)
        elif state.get("cuda"):  # earlier semspai saved every visible device's
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def gather_rng_states(device: torch.device, world: int) -> list[dict]:
    """Every rank's `rng_state`, by rank (a collective under DDP: every rank calls it)."""
    mine = rng_state(device)
    if world == 1:
        return [mine]
    states: list = [None] * world
    dist.all_gather_object(states, mine)
    return states


def restore_rng_state(state: dict, rank: int, world: int, device: torch.device) -> None:
    """Put this rank's RNGs where the checkpoint `state` left them: its own, when the checkpoint holds every
    rank's (DDP ranks draw apart: patch counts, and so the random numbers drawn, differ by batch)."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) != world:
        if world > 1:
            log.warning("the checkpoint holds the random state of %d rank(s), not %d: the ranks' random draws will "
                        "not continue exactly as in an uninterrupted run", len(ranks), world)  # fmt: skip
        set_rng_state(ranks[0], device)
        return
    set_rng_state(ranks[rank], device)


@contextlib.contextmanager
def _closing(batches: Background[TrainBatch]) -> Iterator[Background[TrainBatch]]:
    """Close the loader after use. After an exception (Ctrl-C, say) it still waits, but at most INTERRUPT_WAIT_S
    (the DataLoader's status check can take 5 s): a producer thread left inside torch while the interpreter
    exits can abort the process ("terminate called without an active exception")."""
    try:
        yield batches
    except BaseException:
        batches.close(timeout=INTERRUPT_WAIT_S)
        raise
    batches.close()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shared_tar_shas(paths: list[Path], out: Path, rank: int, world: int) -> dict[str, str]:
    """str(tar path) -> sha256, as `tar_sha256s` gives them (reusing the hashes the run in `out` recorded). Under
    DDP, rank 0 alone reads the tars and sends their hashes to the others (one read of each tar per start, not
    one per rank); every rank must see the same shard names and sizes, or ranks would deal out different
    samples: otherwise a DataError names what differs."""
    if world == 1:
        return tar_sha256s(paths, known_shas(out))
    mine = {shard_name(p): os.stat(p).st_size for p in paths}
    sent: list = [None]
    if rank == 0:
        shas = tar_sha256s(paths, known_shas(out))
        sent = [{shard_name(p): [mine[shard_name(p)], shas[str(p)]] for p in paths}]
    dist.broadcast_object_list(sent, src=0)
    theirs = {name: size for name, (size, _) in sent[0].items()}
    if theirs != mine:
        missing, extra = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
        resized = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
        what = (f"{len(missing)} of rank 0's tars missing here, e.g. {missing[0]}" if missing else
                f"{len(extra)} tar(s) rank 0 lacks, e.g. {extra[0]}" if extra else
                f"{len(resized)} tar(s) of another size than rank 0's, e.g. {resized[0]}")  # fmt: skip
        raise DataError(f"DDP rank {rank} resolves --shards to other tars than rank 0 ({what}); every rank must "
                        "read the same shards (on every node, the same copies)")  # fmt: skip
    return {str(p): sent[0][shard_name(p)][1] for p in paths}


def run_inputs(paths: list[Path], clip_sha: str | None = None, shard_shas: dict[str, str] | None = None,
               tar_shas: dict[str, str] | None = None, init: Path | None = None,
               encoder_weights: str = "") -> dict:  # fmt: skip
    """A run's input fingerprints: its shard tars' names and contents (sha256: `tar_shas` by str(path), hashed
    here when not given), so that tars moved, copied or rebuilt the same are the same input; with a store,
    also the store's CLIP weights and what it extracted from these tars (shards added to the store for other
    runs change nothing); with an `init` checkpoint (--init), its contents; with a frozen spectral encoder
    (MODEL.SPECTRAL.ENCODER_WEIGHTS), its weights' contents."""
    tar_shas = tar_shas if tar_shas is not None else tar_sha256s(paths)
    contents = sorted({(shard_name(p), tar_shas[str(p)]) for p in paths})
    inputs = {"shards": hashlib.sha256(json.dumps(contents).encode()).hexdigest()}
    if init is not None:
        inputs["init"] = file_sha256(init)
    if encoder_weights and Path(encoder_weights).is_file():  # a missing file: building the model says so
        inputs["encoder_weights"] = file_sha256(encoder_weights)
    if clip_sha is not None:
        names = {shard_name(p) for p in paths}
        done = {n: sha for n, sha in (shard_shas or {}).items() if n in names}
        inputs["store"] = hashlib.sha256(
            json.dumps({"clip": clip_sha, "shards": done}, sort_keys=True).encode()
        ).hexdigest()
    return inputs


def legacy_inputs(out: Path, inputs: dict[str, str], paths: list[Path]) -> dict[str, str]:
    """`inputs`, as earlier semspai wrote them when the run in `out` was made so, so that such runs stay up to date
    and resumable: the shards' fingerprint by tar paths, sizes and mtimes where it still matches, and no
    fingerprint of a frozen encoder's weights where the run recorded none."""
    have = read_manifest(out) if holds_run(out) else None
    if have is not None and "encoder_weights" not in have.inputs:
        inputs = {k: v for k, v in inputs.items() if k != "encoder_weights"}
    legacy = have.inputs.get("shards") if have is not None else None
    if legacy is not None and legacy != inputs["shards"] and legacy == fingerprint_paths(paths):
        return inputs | {"shards": legacy}
    return inputs


def run_manifest(cfg: RunConfig, inputs: dict[str, str], file_shas: dict[str, list] | None = None) -> StageManifest:
    return StageManifest(stage=STAGE, schema_version=TRAIN_SCHEMA_VERSION, config_digest=cfg.digest(), inputs=inputs,
                         semspai_version=__version__, config=cfg.identity(), file_shas=file_shas or {})  # fmt: skip


def known_shas(out: Path) -> dict[str, list]:
    """The tar hashes the run in `out` recorded (real path -> [size, mtime_ns, sha256]); {} when none."""
    try:
        have = read_manifest(out)
    except StaleOutputError:  # unreadable: the checks that read it say so
        return {}
    return have.file_shas if have is not None else {}


def holds_run(out: Path) -> bool:
    return (out / CHECKPOINT_DIR / "last.pt").exists() or (out / METRICS_NAME).exists()


def _aucs(history: list[dict]) -> list[float]:
    return [math.nan if row["val_auc"] is None else float(row["val_auc"]) for row in history]


def best_epoch(history: list[dict]) -> int:
    """The epoch best.pt holds: the last that beat every epoch before it (`is_best`)."""
    aucs = _aucs(history)
    return max((row["epoch"] for i, row in enumerate(history) if is_best(aucs[: i + 1])), default=0)


def last_epoch(history: list[dict], epochs: int, patience: int) -> int:
    """The epoch a run ends with: `epochs`, or with `patience` (TRAIN.EARLY_STOP) the first epoch that closes
    `patience` epochs in a row none of which beat the best before them (`is_best`, as best.pt is chosen). A
    function of the history alone, so a resumed or rerun run ends where the uninterrupted one did."""
    if patience <= 0:
        return epochs
    aucs, best = _aucs(history), 0
    for i, row in enumerate(history):
        if is_best(aucs[: i + 1]):
            best = row["epoch"]
        elif row["epoch"] - best >= patience:
            return min(row["epoch"], epochs)
    return epochs


def existing_run(out: Path, wanted: StageManifest, epochs: int, patience: int = 0) -> tuple[int, list[dict]]:
    """A rerun without --resume or --force into a run dir that holds a run: (past the last epoch, history)
    when that run is finished with the same config and inputs (nothing to do); else an error saying why."""
    again = f"`semspai train ... --out {out} --force` to start over (its checkpoints are deleted)"
    have = read_manifest(out)
    if have is None:
        raise FileExistsError(f"{out} already holds a training run with no stage manifest; pass --resume to "
                              f"continue it, run {again}, or choose another --out")  # fmt: skip
    if "init" in have.inputs and "init" not in wanted.inputs:  # check_stage compares the inputs asked for only
        raise StaleOutputError(f"{out} holds a run that started from the weights of a checkpoint (--init), this one "
                               f"starts from scratch: pass the same --init, train into another --out, or run {again}")  # fmt: skip
    # raises when stale: a changed config is better trained into another --out, keeping this run to compare
    check_stage(out, wanted, {n: again for n in wanted.inputs}, False, f"into another --out, or {again}")
    last = out / CHECKPOINT_DIR / "last.pt"
    if not last.exists():
        raise FileExistsError(f"{out} holds this run's metrics but no {CHECKPOINT_DIR}/last.pt to go on from; run "
                              f"{again}, or choose another --out")  # fmt: skip
    state = load_checkpoint(last, map_location="cpu")
    if int(state["epoch"]) < last_epoch(list(state["history"]), epochs, patience):
        raise FileExistsError(f"{out} holds this run (same config and inputs) stopped after epoch {state['epoch']} "
                              f"of {epochs}; pass --resume to continue it, or run {again}")  # fmt: skip
    return int(state["epoch"]) + 1, list(state["history"])


def refuse_foreign(out: Path) -> None:
    """A run dir must not be another stage's output: a shard folder or a feature store would get checkpoints
    and a manifest of a training run, and (with --force) lose its own."""
    have = read_manifest(out)
    if have is not None and have.stage != STAGE:
        raise StaleOutputError(f"{out} holds the output of `semspai {have.stage}`, not a training run: choose "
                               "another --out")  # fmt: skip
    if read_store_attrs(str(out)):
        raise StaleOutputError(f"{out} is a feature store, not a training run: choose another --out")


def clear_run(out: Path) -> None:
    """--force: remove what a training run writes in its run dir, and nothing else there (files of one's own in
    checkpoints/ stay)."""
    refuse_foreign(out)
    ckpts = out / CHECKPOINT_DIR
    if ckpts.is_dir():
        for p in ckpts.iterdir():
            if re.fullmatch(r"(epoch-\d{4,}|last|best)\.pt(\.partial)?", p.name):  # what `_save` writes
                p.unlink()
        with contextlib.suppress(OSError):
            ckpts.rmdir()  # when empty
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)
    for name in (METRICS_NAME, CONFIG_NAME, MANIFEST_NAME):
        (out / name).unlink(missing_ok=True)


def finished_run(cfg: RunConfig, shards: str, out: str | Path, store_path: str | None,
                 init: str | Path | None = None) -> TrainResult | None:  # fmt: skip
    """The result of the run in `out` when it is this run, finished (same config and inputs), found without
    building anything: the store's attributes and the tars' hashes only (those the run recorded, for tars of
    unchanged size and mtime). None when `out` holds no run or
    when the full setup must say what is wrong; raises when the run there is stale or unfinished."""
    out = Path(out)
    if not holds_run(out):
        return None
    attrs = read_store_attrs(store_path) if store_path else None
    no_store = attrs is None or "clip" not in attrs
    if no_store and (store_path or cfg.MODEL.SEMANTIC.MODE != "none" or cfg.LOSS.SEMANTIC_WEIGHT > 0):
        return None  # no such store, or one is needed: the trainer's own checks say so
    paths = resolve_shards(shards)
    tar_shas = tar_sha256s(paths, known_shas(out))  # unchanged tars are not read again
    init_file = resolve_checkpoint(init) if init else None
    weights = cfg.MODEL.SPECTRAL.ENCODER_WEIGHTS
    if no_store:
        inputs = run_inputs(paths, tar_shas=tar_shas, init=init_file, encoder_weights=weights)
    else:
        cfg = record_store_clip(cfg, attrs["clip"], store_path)
        shas = {n: a["sha256"] for n, a in done_shard_attrs(store_path).items()}
        inputs = run_inputs(paths, attrs["clip"]["sha256"], shas, tar_shas, init_file, weights)
    inputs = legacy_inputs(out, inputs, paths)
    _, history = existing_run(out, run_manifest(cfg, inputs), cfg.TRAIN.EPOCHS, cfg.TRAIN.EARLY_STOP)
    return TrainResult(out, nothing_to_do=True, epochs_run=0, history=history, threshold=history[-1]["threshold"],
                       stopped_early=history[-1]["epoch"] < cfg.TRAIN.EPOCHS)  # fmt: skip


def warm_start(module: TrainModule, file: Path, sha256: str, cfg: RunConfig, store: FeatureStore | None) -> dict:
    """--init: put the trainable weights of checkpoint `file` (of contents `sha256`) into a fresh run's `module` (its
    optimiser, schedule and random state start fresh). The checkpoint must fit the run's model and, where both read CLIP vectors,
    have learnt on those of the store's encoder; its loss head is taken when it fits too. Returns what the run's
    checkpoints record of it."""
    state = load_checkpoint(file)
    if "model" not in state or "config" not in state:
        raise CheckpointError(
            f"--init {file}: the checkpoint has no model weights; it was not written by `semspai train`"
        )
    theirs = state["config"].get("MODEL", {})
    differ = [k for k, _, _ in leaf_differences(theirs, cfg.to_dict()["MODEL"], "MODEL.", shared=True)
              if not k.startswith("MODEL.CLIP.")]  # fmt: skip  # the encoder is compared by its spec below
    their_clip = state.get("clip_spec") or {}
    identity = store.attrs["clip_identity"] if store is not None else None
    same_clip = identity is not None and {k: their_clip.get(k) for k in identity} == identity
    if cfg.MODEL.SEMANTIC.MODE != "none" and theirs.get("SEMANTIC", {}).get("MODE", "none") != "none" and not same_clip:
        raise CheckpointError(
            f"--init {file} learnt on the CLIP vectors of {their_clip.get('arg', 'another encoder')}, but feature store "
            f"{store.path} holds those of {store.clip_spec['arg']}: its fusion weights would read vectors of another "
            "encoder. Start from a checkpoint trained on a store of this encoder, or without --init"
        )
    theirs_sha = (state.get("spectral_encoder") or {}).get("weights_sha256")
    mine_sha = module.detector.spectral.encoder.weights_sha256
    if theirs_sha and theirs_sha != mine_sha:
        raise CheckpointError(
            f"--init {file} learnt on the features of a frozen spectral encoder with weights of sha256 "
            f"{theirs_sha[:12]}…, but this run's MODEL.SPECTRAL.ENCODER_WEIGHTS is "
            f"{cfg.MODEL.SPECTRAL.ENCODER_WEIGHTS or '(none)'}{f' (sha256 {mine_sha[:12]}…)' if mine_sha else ''}: "
            "set it to the weights that checkpoint was trained with"
        )
    misfit = state_misfit(module.detector, state["model"])
    if misfit:
        shown = f"; it was trained with other {', '.join(differ[:3])}{' and more' if len(differ) > 3 else ''}"
        raise CheckpointError(f"--init {file} does not fit this run's model ({misfit}){shown if differ else ''}: "
                              "set the MODEL keys as it was trained with them")  # fmt: skip
    load_trainable_state(module.detector, state["model"])
    head = state.get("loss_head") or {}
    took_head = same_clip and bool(head) and not state_misfit(module.loss, head)
    if took_head:
        module.loss.load_state_dict(head)
    epoch, auc = state.get("epoch"), state.get("val_metrics", {}).get("val_auc")
    log.info("--init: the weights of %s (epoch %s%s)%s%s; the optimiser, the schedule and the random state start "
             "fresh", file, epoch, f", val AUC {auc:.4f}" if auc is not None else "",
             ", its semantic projection too" if took_head else "",
             f"; it was trained with other {', '.join(differ)}" if differ else "")  # fmt: skip
    return {"path": str(file.resolve()), "sha256": sha256, "epoch": int(epoch or 0)}


class TrainingDiverged(RuntimeError):
    """The loss or the scores became NaN or infinite: the run cannot go on with its config."""


class Trainer:
    """One training run in `out`; `fit` trains (or resumes) to TRAIN.EPOCHS; a fresh run starts from the weights
    of `init` (a checkpoint, or a run dir meaning its best.pt) when given."""

    def __init__(
        self,
        cfg: RunConfig,
        shards: str,
        out: str | Path,
        store_path: str | None,
        device: torch.device,
        precision: str,
        init: str | Path | None = None,
    ) -> None:
        self.rank, self.world = _world()
        self.device, self.precision = device, precision
        self.out = Path(out)
        self.init = resolve_checkpoint(init) if init else None
        self.init_info: dict = {}  # what the run's checkpoints record of `init`
        sem = cfg.MODEL.SEMANTIC
        weight = cfg.LOSS.SEMANTIC_WEIGHT
        paths = resolve_shards(shards)
        # only the run's own shards: a store may hold other data sets, whose state is none of this run's business
        self.store = FeatureStore.open(store_path, shards={shard_name(p) for p in paths}) if store_path else None
        if self.store is None:
            if sem.MODE != "none":
                raise ConfigError(
                    f"MODEL.SEMANTIC.MODE={sem.MODE} reads CLIP vectors from a feature store: pass "
                    "--from-store PATH (only MODE none trains without one)"
                )
            if weight > 0:
                raise ConfigError(
                    "LOSS.SEMANTIC_WEIGHT > 0 aligns with the store's text vectors: pass --from-store "
                    "PATH, or set LOSS.SEMANTIC_WEIGHT=0"
                )
        else:
            cfg = record_store_clip(cfg, self.store.clip_spec, store_path)
            if weight > 0 and not self.store.has_text:
                raise ConfigError(
                    f"LOSS.SEMANTIC_WEIGHT={weight} needs caption or prompt vectors, but feature store {store_path} was "
                    f"made with {self.store.clip_spec['arg']}, an image-only encoder with no text tower; set "
                    "LOSS.SEMANTIC_WEIGHT=0 or extract with an open_clip model"
                )
        self.cfg = cfg
        self.clip_dim = self.store.embed_dim if self.store is not None else 0
        need = (sem.MODE != "none", sem.MODE == "global_local", weight > 0)
        self.spill_dir: Path | None = None
        if self.store is not None and need[1]:
            where = self.out / f"{STORE_CACHE_DIR}-rank{self.rank}" if self.world > 1 else self.out / STORE_CACHE_DIR
            self.spill_dir = local_spill_dir(self.store, cfg.DATA.STORE_MEMORY_GB, where)
        join = StoreJoin(self.store, *need, spill_dir=self.spill_dir) if self.store is not None and any(need) else None
        # each tar read once, for the store's check and the run's fingerprint; not at all when the run recorded
        # its hash and it is unchanged since (same size and mtime)
        tar_shas = shared_tar_shas(paths, self.out, self.rank, self.world)
        weights = cfg.MODEL.SPECTRAL.ENCODER_WEIGHTS
        if self.store is None:
            self.inputs = run_inputs(paths, tar_shas=tar_shas, init=self.init, encoder_weights=weights)
        else:
            self.store.check_shards(paths, tar_shas)
            shas = {n: i["sha256"] for n, i in self.store.shard_info.items()}
            self.inputs = run_inputs(paths, self.store.clip_spec["sha256"], shas, tar_shas, self.init, weights)
        self.paths, self.file_shas = paths, file_stats(paths, tar_shas)
        data = cfg.DATA
        plans = {s: plan_split(paths, s, data.GENERATORS, join, data.SKIP_MISSING) for s in ("train", "val")}
        self.train_generators = plans["train"].generators  # kept in checkpoints: eval tells seen from unseen
        log.info("train fakes by generator: %s", count_text(self.train_generators))
        on_device = cfg.AUG.WHERE == "device" or (cfg.AUG.WHERE == "auto" and device.type != "cpu")
        log.info("augmentation (AUG.WHERE=%s): %s", cfg.AUG.WHERE, f"on {device}" if on_device else "in the loader")
        view = View(data.MAX_PATCHES, cfg.AUG, data.SHUFFLE_BUFFER, aug_on_device=on_device)
        self.train_stream = self._stream(plans["train"], join, view)
        self.val_stream = self._stream(plans["val"], join, View())
        sizes = self.train_stream.rank_sizes()
        batch = cfg.TRAIN.BATCH_SIZE
        # every rank takes the same number of steps (the smallest rank's); the others drop their last batch
        self.steps_per_epoch = math.ceil(sizes[-1] / batch)
        self.dropped_per_epoch = sum(math.ceil(n / batch) for n in sizes) - self.world * self.steps_per_epoch
        log.info(
            "train: %d samples (%d per rank), %d steps per epoch; val: %d samples",
            len(plans["train"]),
            sizes[0],
            self.steps_per_epoch,
            len(plans["val"]),
        )
        if self.dropped_per_epoch:
            log.info("DDP: %d batch(es) per epoch dropped to keep %d ranks in step", self.dropped_per_epoch, self.world)

        torch.manual_seed(cfg.TRAIN.SEED)  # same initial weights on every rank and in every rerun
        detector = create_detector(cfg.MODEL, self.clip_dim, device=device)
        if cfg.TRAIN.COMPILE:  # the method, not the module: parameter names (and checkpoints) stay as they are
            # dynamic: the patch count changes every batch (a static graph would recompile when it first does,
            # each DDP rank at its own step while the others wait); it still compiles a few graphs (1 patch,
            # validation) on first use
            detector.spectral.forward = torch.compile(detector.spectral.forward, dynamic=True)
        hidden = cfg.MODEL.HIDDEN_DIM
        loss = DetectionLoss(hidden, self.clip_dim, weight, cfg.LOSS.TEMPERATURE).to(device)
        self.module = TrainModule(detector, loss)
        params = trainable_parameters(detector) + list(loss.parameters())
        # no weight decay on biases and norm scales (1-D): decaying them only fights the normalisation
        groups = [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.TRAIN.WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
        # fused: one kernel updates every parameter (the per-tensor loop is hundreds of launches a step)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.TRAIN.BASE_LR, fused=True)
        total = cfg.TRAIN.EPOCHS * self.steps_per_epoch
        warmup = round(cfg.TRAIN.WARMUP_EPOCHS * self.steps_per_epoch)
        t = cfg.TRAIN
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # BASE_LR 0 (MIN_LR is then 0 too): every step is lr 0
            self.optimizer,
            lambda step: lr_at(step, total, warmup, t.BASE_LR, t.MIN_LR) / t.BASE_LR if t.BASE_LR else 0.0,
        )
        self.ddp = self.module
        if self.world > 1:
            # no device_ids: the trainer places each input itself, and DDP would move the host-side counts and
            # text targets to the device, making every step wait for it to read them back
            self.ddp = nn.parallel.DistributedDataParallel(self.module)

    def _stream(self, plan: SplitPlan, join: StoreJoin | None, view: View) -> ShardStream:
        return ShardStream(plan, join, view, self.cfg.TRAIN.SEED, self.rank, self.world)

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def _detector_batch(self, batch: TrainBatch) -> DetectorBatch:
        def put(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(self.device, non_blocking=True)

        patches = put(batch.patches)
        if batch.aug is not None:  # before autocast: the transforms keep their own precision (JPEG is exact)
            patches = batch.aug.apply(patches)
        # counts stay on the host: nothing in a step then waits for the device, which can run a step behind
        return DetectorBatch(unit_pixels(patches), batch.counts, put(batch.global_vec), put(batch.local_vec))

    def _loader(self, stream: ShardStream, epoch: int) -> Background[TrainBatch]:
        """The epoch's batches, collated in a thread (with DATA.NUM_WORKERS=0 its samples are made there too):
        packing a batch's patches (38 MB at batch 64) in the step's own thread would hold up the launches that
        keep the device busy. Use it through `_closing`."""
        stream.set_epoch(epoch)  # read by the producer: the stream's previous loader is closed by now
        # the DataLoader processes start here, in this thread: the generator's first iterable is made at once
        samples = loader_samples(stream, self.cfg.DATA.NUM_WORKERS)
        pin = self.device.type == "cuda"  # the copy to the device then overlaps the host's next step
        return Background((collate(group, pin) for group in batched(samples, self.cfg.TRAIN.BATCH_SIZE)), BATCHES_AHEAD)

    def _start(self, resume: bool, force: bool) -> tuple[int, list[dict]]:
        """(first epoch to train, history so far): a fresh run dir, the state of the last checkpoint, or (for a
        finished run rerun with the same config and inputs) past its last epoch."""
        last = self.checkpoints / "last.pt"
        # a run fingerprinted the old way is still itself; one started over (--force) gets the new fingerprint
        inputs = self.inputs if force else legacy_inputs(self.out, self.inputs, self.paths)
        manifest = run_manifest(self.cfg, inputs, self.file_shas)
        if not resume:
            if holds_run(self.out) and not force:
                return existing_run(self.out, manifest, self.cfg.TRAIN.EPOCHS, self.cfg.TRAIN.EARLY_STOP)
            refuse_foreign(self.out)
            if self.init is not None:  # before anything is written: a checkpoint that does not fit changes nothing
                self.init_info = warm_start(self.module, self.init, self.inputs["init"], self.cfg, self.store)
            if self.rank == 0:
                if force:
                    clear_run(self.out)
                self.out.mkdir(parents=True, exist_ok=True)
                save_config(self.cfg, self.out / CONFIG_NAME)
                write_manifest(self.out, manifest)
            return 1, []
        if not last.exists():
            raise FileNotFoundError(f"{self.out} has no checkpoints/last.pt to resume from; run without --resume")
        state = load_checkpoint(last, map_location="cpu")  # RNG states must stay on the CPU
        saved = config_from_dict(state["config"], saved=True)
        if saved.digest() != self.cfg.digest():
            keys = [k for k, _, _ in leaf_differences(saved.identity(), self.cfg.identity())]
            raise ConfigError(
                f"--resume: the config differs from the one {self.out} was trained with ({', '.join(keys[:3])}"
                f"{' and more' if len(keys) > 3 else ''}; see {self.out / CONFIG_NAME}); resume without --config/--set"
            )
        have = read_manifest(self.out)
        changed = [n for n in inputs if have is not None and have.inputs.get(n) != inputs[n]]
        if changed:  # the epochs left would learn from other data than the ones before
            raise StaleOutputError(
                f"--resume: the run's input {changed[0]} changed since it started at {have.created}; run "
                f"`semspai train ... --out {self.out} --force` to start over, or train into another --out"
            )
        try:
            load_trainable_state(self.module.detector, state["model"])
        except ValueError as exc:
            raise CheckpointError(f"{last} does not fit the run's model ({exc})") from exc
        self.module.loss.load_state_dict(state["loss_head"])
        self.init_info = dict(state.get("init", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state, self.rank, self.world, self.device)
        return int(state["epoch"]) + 1, list(state["history"])

    def _train_epoch(self, epoch: int, tb) -> float:
        self.ddp.train()
        # summed on the device and read once at the end: a per-step read would make the host wait for every step
        total, n = torch.zeros((), dtype=torch.float64, device=self.device), 0
        scalars = StepScalars(tb) if tb is not None else None
        desc = f"epoch {epoch}/{self.cfg.TRAIN.EPOCHS}"
        with _closing(self._loader(self.train_stream, epoch)) as batches:  # a rank may leave one batch unused
            for _, batch in progress(
                zip(range(self.steps_per_epoch), batches, strict=False),
                total=self.steps_per_epoch,
                desc=desc,
                unit="step",
            ):
                parts = self.step(batch)
                total += parts.total.detach().double()
                n += 1
                if scalars is not None:
                    scalars.add(self.scheduler.last_epoch, parts, self.scheduler.get_last_lr()[0])
        if scalars is not None:
            scalars.read()
        if n != self.steps_per_epoch:
            raise RuntimeError(f"epoch {epoch}: the train stream gave {n} batches, {self.steps_per_epoch} planned")
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return total.item() / n

    def step(self, batch: TrainBatch) -> LossParts:
        """One optimiser step on one batch (the loss of that batch before the step)."""
        labels = batch.labels.to(self.device, non_blocking=True)
        inputs = self._detector_batch(batch)
        with autocast(self.precision, self.device):  # text targets stay on the host: the loss groups them there
            parts, _ = self.ddp(inputs, labels, batch.text_vec)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        if self.cfg.TRAIN.CLIP_GRAD > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.TRAIN.CLIP_GRAD)
        self.optimizer.step()
        self.scheduler.step()
        return parts

    @torch.no_grad()
    def validate(self, epoch: int) -> dict:
        """Scores of the whole val split (each rank scores its share; rank 0 gets all), then its metrics."""
        self.module.eval()
        rows = []
        with _closing(self._loader(self.val_stream, epoch)) as batches:
            for batch in batches:
                inputs = self._detector_batch(batch)
                with autocast(self.precision, self.device):
                    logits = self.module.detector(inputs).logits.float().cpu()
                rows += zip(batch.keys, batch.labels.tolist(), logits.tolist(), strict=True)
        if self.world > 1:
            gathered: list[list] = [[] for _ in range(self.world)]
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        rows.sort()  # by key: the same metrics whatever the number of ranks
        labels = np.asarray([r[1] for r in rows], dtype=np.int64)
        logits = np.asarray([r[2] for r in rows], dtype=np.float32)
        if not np.isfinite(logits).all():  # every rank has every row
            raise self._diverged(epoch, f"{int((~np.isfinite(logits)).sum())} val logits are NaN or infinite")
        return validation_metrics(labels, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), logits)

    def _diverged(self, epoch: int, what: str) -> TrainingDiverged:
        lr = self.cfg.TRAIN.BASE_LR
        return TrainingDiverged(f"epoch {epoch}: {what}: training diverged, and nothing of this epoch is saved; start "
                                f"over (--force) with a lower TRAIN.BASE_LR (now {lr:g}) or a longer "
                                "TRAIN.WARMUP_EPOCHS")  # fmt: skip

    def _checkpoint(self, epoch: int, history: list[dict], rngs: list[dict]) -> dict:
        return {
            "model": trainable_state_dict(self.module.detector),
            "spectral_encoder": encoder_record(self.module.detector),
            "loss_head": self.module.loss.state_dict(),
            "config": self.cfg.to_dict(),
            "clip_spec": dict(self.store.clip_spec) if self.store is not None else {},
            "clip_dim": self.clip_dim,
            "train_generators": dict(self.train_generators),
            "threshold": history[-1]["threshold"],
            "epoch": epoch,
            "step": self.scheduler.last_epoch,
            "val_metrics": {k: v for k, v in history[-1].items() if k.startswith("val_")},
            "history": history,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs[0],
            **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
            **({"init": self.init_info} if self.init_info else {}),
        }

    def _save(self, epoch: int, history: list[dict], rngs: list[dict]) -> None:
        state = self._checkpoint(epoch, history, rngs)
        save_checkpoint(self.checkpoints / f"epoch-{epoch:04d}.pt", state)
        if is_best([h["val_auc"] for h in history]):
            save_checkpoint(self.checkpoints / "best.pt", state)
        save_checkpoint(self.checkpoints / "last.pt", state)  # last: it is what --resume trusts
        write_metrics(self.out / METRICS_NAME, history)

    def release_store_cache(self) -> None:
        """Delete the memory-mapped copies of the store's local vectors, if this run made any."""
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def fit(self, resume: bool = False, on_epoch_end: Callable[[dict], None] | None = None,
            force: bool = False) -> TrainResult:  # fmt: skip
        """Train to TRAIN.EPOCHS: a fresh run, `resume` the one in the run dir, or `force` a fresh one over it.
        Rerun on a finished run with the same config and inputs, it does nothing (`nothing_to_do`)."""
        try:
            return self._fit(resume, on_epoch_end, force)
        finally:
            self.release_store_cache()

    def _fit(self, resume: bool, on_epoch_end: Callable[[dict], None] | None, force: bool) -> TrainResult:
        first, history = self._start(resume, force)
        epochs, patience = self.cfg.TRAIN.EPOCHS, self.cfg.TRAIN.EARLY_STOP
        if first > last_epoch(history, epochs, patience):
            if first <= epochs:
                log.info("%s: stopped early after epoch %d (TRAIN.EARLY_STOP=%d); nothing to do", self.out,
                         first - 1, patience)  # fmt: skip
            else:
                log.info("%s: all %d epochs are done; nothing to do", self.out, epochs)
            return TrainResult(self.out, nothing_to_do=True, epochs_run=0, history=history,
                               threshold=history[-1]["threshold"], stopped_early=first <= epochs)  # fmt: skip
        tb = open_tensorboard(self.out) if self.rank == 0 else None
        try:
            for epoch in range(first, epochs + 1):
                loss = self._train_epoch(epoch, tb)
                if not math.isfinite(loss):  # the same on every rank: it is reduced over them
                    raise self._diverged(epoch, f"the training loss is {loss}")
                row = {
                    "epoch": epoch,
                    "step": self.scheduler.last_epoch,
                    "loss": loss,
                    **self.validate(epoch),
                    "lr": self.scheduler.get_last_lr()[0],
                }
                history.append(row)
                rngs = gather_rng_states(self.device, self.world)  # every rank's: each goes on from its own
                if self.rank == 0:
                    self._save(epoch, history, rngs)
                    if tb is not None:
                        for k in ("val_loss", "val_auc", "val_ap", "val_acc"):
                            tb.add_scalar(k.replace("_", "/", 1), row[k], row["step"])
                log.info(
                    "epoch %d: loss %.4f, val AUC %.4f, AP %.4f, acc@0.5 %.4f, threshold %.3f",
                    epoch,
                    loss,
                    row["val_auc"],
                    row["val_ap"],
                    row["val_acc"],
                    row["threshold"],
                )
                if row["val_auc"] <= 0.5 and self.rank == 0:
                    log.warning("epoch %d: val AUC %.3f: the model does not (yet) tell val's fakes from its reals, "
                                "so threshold %.3f is no real choice", epoch, row["val_auc"], row["threshold"])  # fmt: skip
                if self.world > 1:
                    dist.barrier()  # no rank starts the next epoch before rank 0 has written this one
                if on_epoch_end is not None:
                    on_epoch_end(row)
                if last_epoch(history, epochs, patience) == epoch < epochs:  # every rank: the same history
                    log.info("epoch %d: %d epochs without a better val AUC (TRAIN.EARLY_STOP): stopping early; "
                             "best.pt is epoch %d", epoch, patience, best_epoch(history))  # fmt: skip
                    break
        finally:
            if tb is not None:
                tb.close()
        ran = history[-1]["epoch"] + 1 - first
        return TrainResult(
            self.out,
            nothing_to_do=False,
            epochs_run=ran,
            history=history,
            threshold=history[-1]["threshold"],
            dropped_batches=self.dropped_per_epoch * ran,
            init=self.init_info,
            stopped_early=history[-1]["epoch"] < epochs,
        )


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl rewritten whole from the checkpoint's history (atomically), so a run killed between the
    checkpoint and the log never leaves them disagreeing."""
    write_text_atomic(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


class StepScalars:
    """Per-step training scalars for TensorBoard, kept on the device and read TB_READ_EVERY steps at a time."""

    def __init__(self, tb) -> None:
        self.tb = tb
        self.rows: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, losses on the device)

    def add(self, step: int, parts: LossParts, lr: float) -> None:
        losses = [parts.total, parts.bce] + ([parts.semantic] if parts.semantic is not None else [])
        self.rows.append((step, lr, torch.stack([v.detach().float() for v in losses])))
        if len(self.rows) >= TB_READ_EVERY:
            self.read()

    def read(self) -> None:
        """Write the scalars kept so far (one wait for the device)."""
        if not self.rows:
            return
        values = torch.stack([r[2] for r in self.rows]).tolist()
        for (step, lr, _), losses in zip(self.rows, values, strict=True):
            for tag, value in zip(("train/loss", "train/bce", "train/semantic"), losses, strict=False):
                self.tb.add_scalar(tag, value, step)
            self.tb.add_scalar("train/lr", lr, step)
        self.rows.clear()


def open_tensorboard(out: Path):
    """A SummaryWriter under RUN/tensorboard when TensorBoard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard is not installed; metrics go to %s only", out / METRICS_NAME)
        return None
    return SummaryWriter(str(out / TENSORBOARD_DIR))
