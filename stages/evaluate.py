"""`semspai eval`: metrics per generator, robustness under perturbations, CLIP score, ablation, and a report."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from semspai import __version__
from semspai.pipeline.config import (
    BOOTSTRAP_ROUNDS,
    ConfigError,
    RunConfig,
    check_ranges,
    config_from_dict,
    parse_override,
    save_config,
)
from semspai.pipeline.grid import DEFAULT_RULE, grid_boxes, mostly_padding
from semspai.pipeline.progress import progress
from semspai.stages.common import resolve_device, user_errors
from semspai.store.atomic import clear_partials, write_json_atomic
from semspai.store.features import FeatureStore
from semspai.store.images import ImageDecodeError, decode_image, format_of
from semspai.store.locks import lock_beside, run_lock
from semspai.store.manifest import StaleOutputError, read_manifest
from semspai.store.progress import begin_progress, file_state, read_progress, row_line
from semspai.store.shards import (
    INDEX_NAME,
    SPLITS,
    ShardSample,
    file_sha256,
    iter_shard,
    resolve_shards,
    shard_name,
    shard_split,
)

if TYPE_CHECKING:  # the model's and the plots' modules are imported where they are used: `eval --help` is quick
    from semspai.pipeline.data import SplitPlan
    from semspai.pipeline.inference import Detector, PatchMaps, Prediction
    from semspai.pipeline.perturb import Perturbation
    from semspai.stages import report

log = logging.getLogger(__name__)

PROGRESS_DIR = "eval-progress"  # in --out: each checkpoint's scored rows, kept until the eval is written
PROGRESS_KIND = "eval progress"
ROW_FIELDS = ("key", "path", "label", "generator", "format", "score", "perturbed", "mostly_padding", "maps", "clip")
RESUME_KEYS = ("checkpoint_sha256", "tars", "store", "perturb", "report")  # a progress file's rows depend on these

# Keys `--set` may change at eval: which generators to score, and memory per step. The model itself comes
# from the checkpoint, so any other key would describe a model that was never trained.
EVAL_OVERRIDES = ("DATA.GENERATORS", "DATA.STORE_MEMORY_GB", "MODEL.SPECTRAL.CHUNK_SIZE")
HEADLINE = ("auc", "auc_ci", "ap", "acc_at_threshold", "tpr_at_5_fpr", "n_real", "n_fake", "threshold")


@dataclass
class EvalConfig:
    checkpoints: list[str]  # checkpoint files or run dirs; the first is the one the report details
    shards: str
    out: str
    store: str | None = None  # read clean CLIP vectors from here instead of computing them
    split: str = "test"
    perturb: list[str] = field(default_factory=list)  # e.g. ["jpeg:50,75,90", "blur:1.0"]
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, keys in EVAL_OVERRIDES only
    clip: str | None = None  # where the CLIP weights are now, when they moved since training
    encoder_weights: str | None = None  # where a frozen spectral encoder's weights are now (checkpoints that have one)
    device: str = "auto"
    n_heatmaps: int = 3  # images per heatmap group (most confident fakes, reals, worst errors)
    bootstrap: int = BOOTSTRAP_ROUNDS
    seed: int = 0  # of the bootstrap
    resume: bool = False  # take the rows an eval into `out` that stopped kept, and score only the rest


@dataclass
class CheckpointEval:
    """One checkpoint's scores on the split (clean and perturbed) and their metrics."""

    label: str
    checkpoint: str
    mode: str
    fusion: str
    config: RunConfig
    threshold: float
    clip: dict | None
    keys: list[str]
    paths: list[str]  # each image's source path as sharded
    labels: np.ndarray  # (N,) 0 real / 1 fake
    generators: list[str]
    scores: np.ndarray  # (N,) P(fake), clean
    perturbed: dict[str, np.ndarray]  # perturbation name -> (N,)
    metrics: dict  # DESIGN.md's metrics.json
    maps: dict[str, PatchMaps] = field(default_factory=dict)  # key -> maps (the report's checkpoint only)
    clip_score: dict | None = None
    clip_note: str = ""
    train_generators: dict[str, int] | None = None  # generator -> fakes it was trained on; None: not recorded
    n_mostly_padding: int = 0  # images of the split over half of whose patch pixels are padding
    per_format: dict[str, dict] = field(default_factory=dict)  # file format -> M of that format's images alone

    def degenerate(self) -> str:
        """What makes this checkpoint's figures on the split say little beyond the class shares: one score for
        every image, or a threshold that calls every image one class; empty when neither holds."""
        if self.scores.size and np.ptp(self.scores) == 0:
            return (f"every image got the same score ({self.scores[0]:.3f}): the checkpoint separates nothing here; "
                    "its AUC is 0.5 and its accuracies are the shares of the classes")  # fmt: skip
        called = self.scores >= self.threshold
        if called.all() or not called.any():
            kind = "fake" if called.all() else "real"
            why = " (training takes 1 when no threshold separated its val split)" if self.threshold >= 1 else ""
            return (f"at its threshold {self.threshold:.3f} every image is called {kind}: accuracy at the threshold "
                    f"is the share of {kind}s{why}")  # fmt: skip
        return ""

    def format_note(self) -> str:
        """Why the figures may measure the file format rather than generation ('' when they cannot)."""
        from semspai.pipeline.metrics import format_confound

        return format_confound(self.per_format)

    def padding_note(self) -> str:
        """Say how many images are mostly padding (smaller than a patch): their scores say little."""
        if not self.n_mostly_padding:
            return ""
        return (f"{self.n_mostly_padding} of {len(self.keys)} images are mostly padding in their {DEFAULT_RULE.size}-px "
                "patches (smaller than a patch, reflection-padded): their scores say little")  # fmt: skip


@dataclass
class EvalResult:
    out: Path
    metrics: dict  # metrics.json: the first checkpoint's
    report_md: Path
    report_html: Path
    runs: list[CheckpointEval]
    seconds: float

    @property
    def headline(self) -> dict:
        """AUC (with its 95% interval), AP, accuracy at the threshold, TPR at 5% FPR, counts."""
        return {k: self.metrics["overall"][k] for k in HEADLINE}


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """The checkpoint's resolved config with eval's allowed `--set` overrides applied. DATA.GENERATORS is not
    inherited: eval scores every generator of the split unless `--set DATA.GENERATORS` names some, so a model
    trained on some generators is measured on the ones it never saw too (leave-generators-out)."""
    data = cfg.to_dict()
    data["DATA"]["GENERATORS"] = []
    keys = []
    for text in overrides:
        key = text.partition("=")[0].strip()
        keys.append(key)
        if key not in EVAL_OVERRIDES:
            raise ConfigError(f"--set {key}: eval takes only {', '.join(EVAL_OVERRIDES)}; the model and its "
                              "training settings come from the checkpoint")  # fmt: skip
        node, value = data, parse_override(text)
        *parents, leaf = key.split(".")
        for k in parents:
            node, value = node[k], value[k]
        node[leaf] = value[leaf]
    return check_ranges(config_from_dict(data, saved=True), keys)  # the checkpoint's own values as they were


def split_shards(spec: str, split: str) -> list[Path]:
    """The tars of SPEC that may hold `split`: those named after it, and any not named after a split."""
    return [p for p in resolve_shards(spec) if shard_split(p) == split or shard_split(p) not in SPLITS]


def _samples(plan: SplitPlan, skip: set[str]) -> Iterator[tuple[tuple[Path, ShardSample], np.ndarray]]:
    """The plan's samples, decoded, in its order; those of `skip` (scored before a stop) are not decoded."""
    from semspai.pipeline.data import DataError

    wanted = {k for keys in plan.keys.values() for k in keys} - skip
    for path in sorted(plan.keys):
        if not wanted.intersection(plan.keys[path]):
            continue  # every sample of this tar was scored before: not even read
        for sample in iter_shard(path):
            if sample.key in wanted:
                try:
                    rgb = decode_image(sample.image)
                except ImageDecodeError as exc:
                    raise DataError(f"shard {shard_name(path)}: sample {sample.key} cannot be decoded ({exc}); "
                                    "rerun `semspai shard` for its source") from exc  # fmt: skip
                yield (path, sample), rgb


def progress_path(out: Path, index: int) -> Path:
    """Where an eval into `out` keeps the rows of its `index`-th checkpoint as they are scored."""
    return out / PROGRESS_DIR / f"checkpoint-{index}.jsonl"


def sample_row(sample: ShardSample, rgb: np.ndarray, pred: Prediction) -> dict:
    """What eval keeps of one scored image (a line of its progress file); perturbed scores and the CLIP score
    are filled in by the caller."""
    maps = pred.maps
    kept = None if maps is None else {"boxes": maps.boxes.tolist(), "attention": maps.attention.tolist(),
                                      "gates": None if maps.gates is None else maps.gates.tolist()}  # fmt: skip
    return {"key": sample.key, "path": str(sample.meta.get("path") or ""), "label": int(sample.meta["label"]),
            "generator": str(sample.meta.get("generator") or ""), "format": format_of(sample.ext),
            "score": pred.score, "perturbed": {},
            "mostly_padding": mostly_padding(*rgb.shape[:2]), "maps": kept, "clip": None}  # fmt: skip


def progress_header(cfg: EvalConfig, det: Detector, perturbations: list[Perturbation], plan: SplitPlan,
                    primary: bool) -> dict:  # fmt: skip
    """A progress file's first line: what its rows depend on (RESUME_KEYS; a resumed eval takes them only when
    all of these agree) and, to name it, the checkpoint's path."""
    store = cfg.store if not cfg.store or "://" in cfg.store else os.path.abspath(cfg.store)
    return {"semspai": PROGRESS_KIND, "checkpoint": det.checkpoint, "checkpoint_sha256": file_sha256(det.checkpoint),
            "tars": {os.path.realpath(p): file_state(p) for p in sorted(plan.keys)}, "store": store,
            "perturb": [p.name for p in perturbations], "report": primary}  # fmt: skip


def kept_rows(path: Path, header: dict, resume: bool) -> dict[str, dict]:
    """The rows (by key) an eval that stopped kept in `path`, for `resume` to take; {} when there are none. A
    file of other checkpoint, tars, store or perturbations is refused, naming what differs."""
    if not resume or not path.exists():
        return {}
    have, rows = read_progress(path, PROGRESS_KIND, ROW_FIELDS, "eval")
    if not rows:
        return {}
    differ = [k for k in RESUME_KEYS if have.get(k) != header[k]]
    if differ:
        names = {"checkpoint_sha256": f"checkpoint ({have.get('checkpoint')})",
                 "tars": "shards or --split (or tars changed since)", "store": "--store", "perturb": "--perturb",
                 "report": "checkpoint order"}  # fmt: skip
        raise StaleOutputError(f"--resume: {path} was scored with another {', '.join(names[k] for k in differ)}; "
                               f"resume with the same ones, or delete {path.parent} to start over")  # fmt: skip
    log.info("%s: resuming, %d image(s) scored before the stop", header["checkpoint"], len(rows))
    return {r["key"]: r for r in rows}


def unseen_generators(scored: Iterable[str], trained: dict[str, int] | None) -> list[str]:
    """The scored generators the checkpoint had no fake of in training (none when that was not recorded)."""
    return [] if trained is None else sorted(set(scored) - set(trained))


def log_generators(plan: SplitPlan, trained: dict[str, int] | None, checkpoint: str) -> None:
    from semspai.pipeline.data import count_text

    log.info("%s: scoring fakes of %s", checkpoint, count_text(plan.generators))
    if trained is None:
        log.info("%s: its training generators are not recorded (a checkpoint of an older semspai)", checkpoint)
    elif unseen := unseen_generators(plan.generators, trained):
        log.info("%s: never trained on %s (trained on %s)", checkpoint, ", ".join(unseen), count_text(trained))


def clip_score_blocker(store: FeatureStore | None, det: Detector) -> str:
    """Why no CLIP score can be computed ('' when it can): it needs an encoder with a text tower."""
    if store is not None:
        return "" if store.has_text else f"the store's encoder ({store.clip_spec['arg']}) has no text tower"
    if det.embedder is None:
        return "a spectral-only checkpoint and no --store: there is no CLIP encoder to score with"
    return "" if det.embedder.spec.has_text else f"encoder {det.embedder.spec.arg} has no text tower"


def clip_score_vectors(store: FeatureStore | None, det: Detector, samples: list[ShardSample],
                       rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Image (B, D) and caption (B, D) vectors (NaN rows without a caption): cached ones from the store, else
    computed by the checkpoint's encoder."""
    import torch

    if store is not None:
        rows = [store.index_of(s.key) for s in samples]
        caps = [store.caption_vector(i) for i in rows]
        nan = np.full(store.embed_dim, np.nan, np.float32)
        return (store.global_vectors()[rows].astype(np.float32),
                np.stack([nan if c is None else c.astype(np.float32) for c in caps]))  # fmt: skip
    emb = det.embedder
    image = emb.get_image_embedding(torch.stack([emb.preprocess_global(rgb) for rgb in rgbs])).cpu().numpy()
    captions = [str(s.meta.get("caption") or "") for s in samples]
    caption = np.full_like(image, np.nan)
    has = [i for i, c in enumerate(captions) if c]
    if has:
        caption[has] = emb.get_text_embedding([captions[i] for i in has]).cpu().numpy()
    return image, caption


def evaluate_checkpoint(cfg: EvalConfig, checkpoint: str, perturbations: list[Perturbation], primary: bool,
                        device: str, progress_file: Path) -> CheckpointEval:  # fmt: skip
    """Score one checkpoint on the split, clean and under each perturbation, and compute its metrics. Each batch's
    rows are kept in `progress_file` as they are scored; with cfg.resume, the rows kept there by an eval that
    stopped are taken and only the rest is scored."""
    import torch

    from semspai.pipeline.data import STORE_CACHE_DIR, StoreJoin, local_spill_dir, plan_split
    from semspai.pipeline.inference import PatchMaps, load_detector, patch_batches
    from semspai.pipeline.metrics import clip_score_groups, clip_score_per_image, evaluate_scores, per_format

    # with a store, the clean scores read every vector from it: the encoder is needed only for perturbed pixels
    encoder = not cfg.store or bool(perturbations)
    if cfg.clip and not encoder:
        log.warning("--clip %s is not used: every CLIP vector comes from the store (no --perturb)", cfg.clip)
    det = load_detector(checkpoint, clip=cfg.clip, device=device, encoder=encoder, encoder_weights=cfg.encoder_weights)
    run_cfg = apply_overrides(det.config, cfg.overrides)
    det.chunk_size = run_cfg.MODEL.SPECTRAL.CHUNK_SIZE
    mode = det.semantic_mode
    shards = split_shards(cfg.shards, cfg.split)
    store = None
    if cfg.store:
        expect = det.clip_spec.identity() if det.clip_spec is not None else None
        arg = det.clip_spec.arg if det.clip_spec is not None else ""
        store = FeatureStore.open(cfg.store, expect_clip=expect, expect_patch_rule=DEFAULT_RULE.id,
                                  advice=f"the checkpoint needs a store extracted with its own encoder ({arg}) and "
                                  "this semspai's patch rule, or no --store (CLIP then runs on the fly)",
                                  shards={shard_name(p) for p in shards})  # fmt: skip
    if store is not None:
        store.check_shards(shards)
    join = spill = None
    if store is not None and mode != "none":
        if mode == "global_local":
            spill = local_spill_dir(store, run_cfg.DATA.STORE_MEMORY_GB, Path(cfg.out) / STORE_CACHE_DIR)
        join = StoreJoin(store, need_global=True, need_local=mode == "global_local", need_text=False, spill_dir=spill)
    stack = contextlib.ExitStack()  # the progress file, once opened
    try:  # the memory-mapped copies go whatever happens: they can be as large as the store
        plan = plan_split(shards, cfg.split, run_cfg.DATA.GENERATORS, join, skip_missing=False,
                          missing_hint="or leave out --store (CLIP then runs on the fly)",
                          shards_are=f"the tars of {cfg.shards} that may hold split {cfg.split}")  # fmt: skip
        log_generators(plan, det.train_generators, checkpoint)
        clip_note = clip_score_blocker(store, det) if primary else "not the report's checkpoint"
        label = f"{mode}" if mode == "none" else f"{mode} ({run_cfg.MODEL.SEMANTIC.FUSION})"
        header = progress_header(cfg, det, perturbations, plan, primary)
        rows = kept_rows(progress_file, header, cfg.resume)  # key -> row, scored before a stop
        sink = None
        items = progress(_samples(plan, skip=set(rows)), total=len(plan) - len(rows), desc=f"eval {label}",
                         unit="img")  # fmt: skip
        for batch in patch_batches(items):
            samples = [s for (_, s), _ in batch]
            rgbs = [rgb for _, rgb in batch]
            global_vec = local_vec = None
            if join is not None:
                vectors = [join.vectors(f"shard {shard_name(p)}", s.key, grid_boxes(*rgb.shape[:2], DEFAULT_RULE),
                                        slice(None)) for (p, s), rgb in batch]  # fmt: skip
                global_vec = torch.from_numpy(np.stack([g for g, _, _ in vectors])).float()  # (B, D)
                if mode == "global_local":
                    local_vec = torch.from_numpy(np.concatenate([loc for _, loc, _ in vectors])).float()  # (N, D)
            preds = det.score(rgbs, global_vec, local_vec, return_maps=primary)
            new = [sample_row(sample, rgb, pred) for sample, rgb, pred in zip(samples, rgbs, preds, strict=True)]
            for p in perturbations:  # CLIP vectors of perturbed pixels are computed here: the store holds clean ones
                changed = [p.apply(rgb, sample.key) for sample, rgb in zip(samples, rgbs, strict=True)]
                for row, q in zip(new, det.score(changed), strict=True):
                    row["perturbed"][p.name] = q.score
            if not clip_note:
                for row, value in zip(new, clip_score_per_image(*clip_score_vectors(store, det, samples, rgbs)),
                                      strict=True):  # fmt: skip
                    row["clip"] = None if np.isnan(value) else float(value)
            if sink is None:  # the first new rows: the file gets the header and the rows kept from before
                sink = stack.enter_context(begin_progress(progress_file, header, rows.values()))
            sink.write("".join(row_line(r) for r in new))
            sink.flush()  # a stop loses at most the batch being scored
            rows.update((r["key"], r) for r in new)
    finally:
        stack.close()
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    ordered = [rows[k] for path in sorted(plan.keys) for k in plan.keys[path]]  # the split's order, resumed or not
    keys = [r["key"] for r in ordered]
    paths, gens = [r["path"] for r in ordered], [r["generator"] for r in ordered]
    y, clean = np.asarray([r["label"] for r in ordered]), np.asarray([r["score"] for r in ordered])
    perturbed = {p.name: [r["perturbed"][p.name] for r in ordered] for p in perturbations}
    maps = {r["key"]: PatchMaps(np.asarray(r["maps"]["boxes"], np.int32), np.asarray(r["maps"]["attention"], np.float32),
                                None if r["maps"]["gates"] is None else np.asarray(r["maps"]["gates"], np.float32))
            for r in ordered if primary}  # fmt: skip
    n_padding = sum(r["mostly_padding"] for r in ordered)
    metrics = evaluate_scores(y, clean, gens, det.threshold, cfg.bootstrap, cfg.seed)
    metrics["perturbations"] = {
        name: evaluate_scores(y, np.asarray(v), gens, det.threshold, cfg.bootstrap, cfg.seed)
        for name, v in perturbed.items()
    }
    result = CheckpointEval(
        label=label, checkpoint=det.checkpoint, mode=mode, fusion=run_cfg.MODEL.SEMANTIC.FUSION, config=run_cfg,
        threshold=det.threshold, clip=det.clip_spec.to_dict() if det.clip_spec else None, keys=keys, paths=paths, labels=y,
        generators=gens, scores=clean, perturbed={k: np.asarray(v) for k, v in perturbed.items()}, metrics=metrics,
        maps=maps, train_generators=det.train_generators, n_mostly_padding=n_padding,
        per_format=per_format([r["label"] for r in ordered], clean, [r["format"] for r in ordered], det.threshold,
                              cfg.bootstrap, cfg.seed),
    )  # fmt: skip
    if not clip_note:
        values = np.asarray([np.nan if r["clip"] is None else r["clip"] for r in ordered], dtype=np.float64)
        result.clip_score = clip_score_groups(values, y, gens) or None
        clip_note = "" if result.clip_score else f"no image of split {cfg.split} has a caption"
    result.clip_note = clip_note
    return result


def pick_examples(run: CheckpointEval, k: int) -> dict[str, list[int]]:
    """Indices of the k most confident fakes and reals, and the k worst errors (most confidently wrong at the
    checkpoint's threshold)."""
    y, s, t = run.labels, run.scores, run.threshold
    fakes, reals = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    wrongness = np.where(y == 1, t - s, s - t)  # > 0: on the wrong side of the threshold
    wrong = np.flatnonzero((s >= t).astype(int) != y)
    return {
        "most confident fakes": fakes[np.argsort(-s[fakes], kind="stable")][:k].tolist(),
        "most confident reals": reals[np.argsort(s[reals], kind="stable")][:k].tolist(),
        "worst errors": wrong[np.argsort(-wrongness[wrong], kind="stable")][:k].tolist(),
    }


def render_heatmaps(run: CheckpointEval, plan_shards: list[Path], picks: dict[str, list[int]],
                    folder: Path) -> dict[str, list[tuple[Path, str]]]:  # fmt: skip
    """Draw each picked image with its attention (and gate) map; re-reads only the shards that hold them."""
    from semspai.stages import report

    folder.mkdir(parents=True, exist_ok=True)
    wanted = {run.keys[i]: i for idx in picks.values() for i in idx}
    images: dict[str, np.ndarray] = {}
    for path in plan_shards:
        for sample in iter_shard(path):
            if sample.key in wanted:
                images[sample.key] = decode_image(sample.image)
        if len(images) == len(wanted):
            break
    out: dict[str, list[tuple[Path, str]]] = {}
    for group, idx in picks.items():
        slug = group.split()[-1]
        for rank, i in enumerate(idx, 1):
            key = run.keys[i]
            truth = f"fake, {run.generators[i]}" if run.labels[i] else "real"
            caption = f"{truth}: score {run.scores[i]:.3f}"
            png = report.plot_heatmap(images[key], run.maps[key], f"{group} #{rank} — {caption}",
                                      folder / f"{slug}-{rank}-{key[:10]}.png")  # fmt: skip
            out.setdefault(group, []).append((png, caption))
    return out


# a class this small gives the bootstrap few distinct resamples (one fake: every resample holds only that fake,
# so the interval says nothing of how another fake would score): such intervals are marked, as understating the
# uncertainty
FEW_FOR_CI = 10


def few_for_ci(m: dict) -> bool:
    """Whether metrics block `m` has too few reals or fakes for its bootstrap interval to be read as one."""
    return min(m["n_real"], m["n_fake"]) < FEW_FOR_CI


def _auc_text(m: dict) -> str:
    if m["auc"] is None:
        return "–"
    lo, hi = m["auc_ci"]
    return f"{m['auc']:.3f} [{lo:.3f}, {hi:.3f}]{'†' if few_for_ci(m) else ''}"


METRIC_HEADER = ["AUC [95% CI]", "AP", "acc @0.5", "acc @threshold", "TPR @1% FPR", "TPR @5% FPR", "reals", "fakes"]


def _metric_row(m: dict) -> list:
    return [_auc_text(m), m["ap"], m["acc_at_0_5"], m["acc_at_threshold"], m["tpr_at_1_fpr"], m["tpr_at_5_fpr"],
            m["n_real"], m["n_fake"]]  # fmt: skip


def _curves(run: CheckpointEval) -> list[report.Curve]:
    from semspai.stages import report

    y, s, g = run.labels, run.scores, np.asarray(run.generators, dtype=object)
    m = run.metrics
    curves = [report.Curve("all generators", y, s, m["overall"]["auc"], m["overall"]["ap"], bold=True)]
    for gen, gm in m["per_generator"].items():
        keep = (y == 0) | (g == gen)
        curves.append(report.Curve(gen, y[keep], s[keep], gm["auc"], gm["ap"]))
    return curves


def write_report(cfg: EvalConfig, runs: list[CheckpointEval], out: Path, store_used: bool,
                 heatmaps: dict[str, list[tuple[Path, str]]]) -> tuple[Path, Path]:  # fmt: skip
    """report.md and report.html (same content) with their PNGs under out/plots and out/heatmaps."""
    from semspai.pipeline.data import count_text
    from semspai.stages import report

    run = runs[0]
    m = run.metrics
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    doc = report.Document(f"semspai evaluation — {cfg.split} split")
    clip = run.clip
    encoder = "none (spectral only)" if clip is None else f"`{clip['arg']}` ({clip['model']}, {clip['weights_id']})"
    doc.text(f"Checkpoint `{run.checkpoint}`: semantic mode **{run.mode}**, fusion {run.fusion}, CLIP encoder "
             f"{encoder}. Shards `{cfg.shards}`, split `{cfg.split}`: {m['overall']['n_real']} real and "
             f"{m['overall']['n_fake']} fake images. Decision threshold {run.threshold:.3f} (chosen on val by "
             f"training). semspai {__version__}.")  # fmt: skip
    if cfg.split in SPLIT_CAVEATS:
        doc.text(f"**Note:** {SPLIT_CAVEATS[cfg.split][0].upper()}{SPLIT_CAVEATS[cfg.split][1:]}.")
    if run.padding_note():
        doc.text(f"**Note:** {run.padding_note()}.")
    if run.format_note():
        doc.text(f"**Note:** {run.format_note()}.")
    for r in runs:
        if r.degenerate():
            doc.text(f"**Note:** {r.label}: {r.degenerate()}.")
    if clip is not None and clip.get("meaningless"):
        doc.text("**Warning:** this checkpoint's CLIP encoder has random weights: its semantic vectors carry no "
                 "meaning (fine for the demo and tests, never for results).")  # fmt: skip
    source = f"read from the feature store `{cfg.store}`" if store_used else "computed on the fly by the encoder"
    if run.mode != "none":
        doc.text(f"Clean images: CLIP vectors {source}.")
    doc.text("AUC intervals are 95% stratified bootstrap intervals "
             f"({cfg.bootstrap} rounds, seed {cfg.seed}); test sets here are small, so read them before the digits. "
             f"† marks an interval from fewer than {FEW_FOR_CI} reals or fakes: it understates the uncertainty "
             "(with one fake, every resample holds that fake; with one of each, the interval has no width).")  # fmt: skip

    doc.heading("Overall")
    doc.table(["", *METRIC_HEADER], [["all generators", *_metric_row(m["overall"])]])
    curves = _curves(run)
    doc.images([report.plot_roc(curves, plots / "roc.png", "ROC (each generator vs all reals)"),
                report.plot_pr(curves, plots / "pr.png", "Precision-recall"),
                report.plot_scores(run.labels, run.scores, run.threshold, plots / "scores.png")], out)  # fmt: skip

    doc.heading("Per generator")
    trained = run.train_generators
    doc.text("Each generator's fakes against all reals of the split (SPAI's protocol). " + (
        "This checkpoint does not record which generators it was trained on." if trained is None else
        f"Trained on fakes of {count_text(trained)}; a generator marked "
        "unseen had no fake in training (generalisation, not fit)."))  # fmt: skip
    seen = {g: "–" if trained is None else ("trained on" if g in trained else "unseen") for g in m["per_generator"]}
    doc.table(["generator", "in training", *METRIC_HEADER],
              [[g, seen[g], *_metric_row(gm)] for g, gm in m["per_generator"].items()])  # fmt: skip

    if len(run.per_format) > 1:
        doc.heading("Per file format")
        doc.text("Each file format's images alone, reals against fakes: a score that follows the format (and its "
                 "compression) rather than generation is high overall and near chance within a format.")  # fmt: skip
        doc.table(["format", *METRIC_HEADER], [[f, *_metric_row(fm)] for f, fm in run.per_format.items()])

    if m["perturbations"]:
        doc.heading("Robustness")
        doc.text("Perturbations are applied to the decoded pixels of every test image; "
                 + ("CLIP vectors of perturbed images are computed on the fly (the store holds clean ones)."
                    if run.mode != "none" else "this checkpoint uses no CLIP vectors."))  # fmt: skip
        gens = list(m["per_generator"])
        rows = [["clean", _auc_text(m["overall"]), "", m["overall"]["ap"], m["overall"]["acc_at_threshold"],
                 *[m["per_generator"][g]["auc"] for g in gens]]]  # fmt: skip
        for name, pm in m["perturbations"].items():
            o = pm["overall"]
            delta = (
                None if o["auc"] is None or m["overall"]["auc"] is None else f"{o['auc'] - m['overall']['auc']:+.3f}"
            )
            rows.append([name, _auc_text(o), delta, o["ap"], o["acc_at_threshold"],
                         *[pm["per_generator"][g]["auc"] for g in gens]])  # fmt: skip
        doc.table(["perturbation", "AUC [95% CI]", "ΔAUC", "AP", "acc @threshold", *[f"AUC {g}" for g in gens]], rows)
        names = ["clean", *m["perturbations"]]
        series = {r.label: [r.metrics["overall"]["auc"]] + [p["overall"]["auc"] for p in r.metrics["perturbations"].values()]
                  for r in runs}  # fmt: skip
        doc.images([report.plot_robustness(names, series, plots / "robustness.png")], out)

    doc.heading("CLIP score")
    if run.clip_score:
        doc.text("100 × cosine of each image's CLIP vector and its caption's, averaged per class and generator: "
                 "how well the images follow their prompts (only images with a caption count).")  # fmt: skip
        doc.table(["group", "CLIP score", "images"], [[k, v["clip_score"], v["n"]] for k, v in run.clip_score.items()])
    else:
        doc.text(f"Not computed: {run.clip_note}.")

    if len(runs) > 1:
        doc.heading("Ablation")
        doc.text("Every checkpoint on the same images; the report above details the first.")
        has_p = bool(m["perturbations"])
        header = ["checkpoint", "mode", "AUC [95% CI]", "AP", "acc @threshold", "TPR @5% FPR"]
        header += ["mean AUC perturbed"] if has_p else []
        rows = []
        for r in runs:
            o = r.metrics["overall"]
            row = [r.label, r.mode, _auc_text(o), o["ap"], o["acc_at_threshold"], o["tpr_at_5_fpr"]]
            if has_p:
                aucs = [
                    p["overall"]["auc"] for p in r.metrics["perturbations"].values() if p["overall"]["auc"] is not None
                ]
                row.append(float(np.mean(aucs)) if aucs else None)
            rows.append(row)
        doc.table(header, rows)
        doc.table(["checkpoint", "file"], [[r.label, r.checkpoint] for r in runs])
        abl = [report.Curve(r.label, r.labels, r.scores, r.metrics["overall"]["auc"], r.metrics["overall"]["ap"])
               for r in runs]  # fmt: skip
        doc.images([report.plot_roc(abl, plots / "roc_ablation.png", "ROC per checkpoint")], out)

    doc.heading("Where the detector looked")
    if cfg.n_heatmaps:
        doc.text("Attention weight of each 224-px patch in the pooling (× number of patches, so 1 is an even share)"
                 + (" and the fusion gate per patch" if any(mp.gates is not None for mp in run.maps.values()) else "")
                 + ", overlaid on the image as the detector saw it (small images padded).")  # fmt: skip
    else:
        doc.text("No heatmaps were drawn (`--heatmaps 0`).")
    for group, items in heatmaps.items() if cfg.n_heatmaps else ():
        doc.text(f"**{group}**" if items else f"**{group}**: none")
        if items:
            doc.images([p for p, _ in items], out, [c for _, c in items])
    if not np.any((run.scores >= run.threshold).astype(int) != run.labels):
        doc.text(f"No image is on the wrong side of the threshold {run.threshold:.3f}.")

    doc.heading("Files")
    doc.text("`metrics.json` (all numbers above), `predictions.csv` (every image's scores, by every checkpoint), `eval.json` (settings "
             "and every checkpoint's metrics), `config.yaml` (the resolved config).")  # fmt: skip
    return doc.write(out)


def write_predictions(runs: list[CheckpointEval], path: Path) -> None:
    """Every image the first checkpoint scored: its scores as `score` and one column per perturbation, then each
    other checkpoint's as `score@LABEL` and `PERTURBATION@LABEL` (an ablation's per-image scores side by side,
    joined by key; empty where a checkpoint did not score the image)."""
    run, others = runs[0], runs[1:]
    rows = [{k: i for i, k in enumerate(r.keys)} for r in others]  # joined by key, whatever each one's order
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "path", "label", "generator", "score", *run.perturbed,
                         *[f"{name}@{r.label}" for r in others for name in ("score", *r.perturbed)]])  # fmt: skip
        for i, key in enumerate(run.keys):
            extra = [f"{v[row[key]]:.6f}" if key in row else "" for r, row in zip(others, rows, strict=True)
                     for v in (r.scores, *r.perturbed.values())]  # fmt: skip
            writer.writerow([key, run.paths[i], "fake" if run.labels[i] else "real", run.generators[i],
                             f"{run.scores[i]:.6f}", *[f"{v[i]:.6f}" for v in run.perturbed.values()],
                             *extra])  # fmt: skip


# a split training itself used: its figures flatter the model when these are that run's own images
SPLIT_CAVEATS = {
    "val": "training chose the decision threshold and the best epoch on its val split: if these are that run's "
    "val images, its figures (accuracy at the threshold above all) are optimistic; report the test split",
    "train": "if these are the images the checkpoint was trained on, every figure is optimistic; report the test split",
}


def run(cfg: EvalConfig) -> EvalResult:
    """Evaluate every checkpoint on the split and write metrics.json, the report and its figures to cfg.out."""
    from semspai.pipeline.perturb import parse_perturbations

    start = time.perf_counter()
    if not cfg.checkpoints:
        raise ConfigError("eval needs at least one --checkpoint")
    if cfg.split in SPLIT_CAVEATS:
        log.warning("split %s: %s", cfg.split, SPLIT_CAVEATS[cfg.split])
    perturbations = parse_perturbations(cfg.perturb)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    refuse_other_stage(out)

    def busy(holder: str) -> FileExistsError:
        return FileExistsError(f"{out} is being written by another `semspai eval` ({holder})")

    with run_lock(lock_beside(out), busy):
        clear_partials([out / name for name in ("metrics.json", "eval.json")])  # what an eval killed mid-write left
        return _run(cfg, out, perturbations, device, start)


def refuse_other_stage(out: Path) -> None:
    """An eval's --out is no other stage's output: its config.yaml would replace a run's (which --resume trains
    on), and its report files would lie among a store's arrays or a shard folder's tars."""
    have = read_manifest(out) if out.is_dir() else None  # eval writes none: any is another stage's
    what = (f"the output of `semspai {have.stage}`" if have is not None else
            "a feature store" if (out / "zarr.json").exists() else
            "a shard folder" if (out / INDEX_NAME).exists() else "")  # fmt: skip
    if what:
        inside = f" (e.g. {out / 'eval'})" if have is not None and have.stage == "train" else ""
        raise FileExistsError(f"--out {out} is {what}, not an eval's output folder: choose another --out{inside}")


def stopped_rows(out: Path) -> int:
    """How many rows the progress files of an eval into `out` that stopped hold."""
    folder = out / PROGRESS_DIR
    files = sorted(folder.glob("checkpoint-*.jsonl")) if folder.is_dir() else []
    return sum(len(read_progress(f, PROGRESS_KIND, ROW_FIELDS, "eval")[1]) for f in files)


def _run(cfg: EvalConfig, out: Path, perturbations: list[Perturbation], device: str, start: float) -> EvalResult:
    if not cfg.resume:
        if kept := stopped_rows(out):
            raise StaleOutputError(f"{out / PROGRESS_DIR} holds {kept} image score(s) of an eval into {out} that "
                                   "stopped: pass --resume to go on from there, or delete that folder to start over")  # fmt: skip
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # rows of no use: none, or a header alone
    elif not (out / PROGRESS_DIR).is_dir():  # with one, each checkpoint's file is read once, by kept_rows
        log.info("%s: no stopped eval to resume; scoring every image", out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        runs = [evaluate_checkpoint(cfg, ck, perturbations, i == 0, device, progress_path(out, i))
                for i, ck in enumerate(cfg.checkpoints)]  # fmt: skip
    except BaseException:
        if made:  # a failed eval leaves no empty --out behind (one that kept rows for --resume is not empty)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise  # and an earlier eval's outputs there whole: they are replaced only once this one has its numbers
    (out / "metrics.json").unlink(missing_ok=True)  # written last: its presence means the eval finished
    for old in ("plots", "heatmaps"):  # figures of an earlier eval must not mix with this one's
        shutil.rmtree(out / old, ignore_errors=True)
    seen: dict[str, int] = {}
    for r in runs:  # two checkpoints of one mode stay apart in the tables
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} #{seen[r.label]}"
    primary = runs[0]
    shards = sorted(split_shards(cfg.shards, cfg.split))
    heatmaps = render_heatmaps(primary, shards, pick_examples(primary, cfg.n_heatmaps), out / "heatmaps")
    save_config(primary.config, out / "config.yaml")
    write_predictions(runs, out / "predictions.csv")
    md, page = write_report(cfg, runs, out, cfg.store is not None, heatmaps)
    settings = {k: getattr(cfg, k) for k in ("checkpoints", "shards", "store", "split", "perturb", "overrides", "clip",
                                             "bootstrap", "seed")}  # fmt: skip
    write_json_atomic(out / "eval.json", {
        "settings": settings | {"device": device, "semspai_version": __version__},
        "checkpoints": [{"label": r.label, "checkpoint": r.checkpoint, "mode": r.mode, "fusion": r.fusion,
                         "threshold": r.threshold, "clip": r.clip, "train_generators": r.train_generators,
                         "metrics": r.metrics, "per_format": r.per_format} for r in runs],
        "clip_score": primary.clip_score, "clip_score_note": primary.clip_note,
        "n_mostly_padding": primary.n_mostly_padding,
    })  # fmt: skip
    write_json_atomic(out / "metrics.json", primary.metrics)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # the eval is written: nothing left to resume
    return EvalResult(out=out, metrics=primary.metrics, report_md=md, report_html=page, runs=runs,
                      seconds=time.perf_counter() - start)  # fmt: skip


@click.command("eval")
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    required=True,
    type=click.Path(),
    help="Checkpoint file or run dir (= RUN/checkpoints/best.pt); repeat for an ablation table.",
)
@click.option("--shards", required=True, help="Shard spec: folder, glob or brace pattern.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for metrics and report.")
@click.option(
    "--store",
    default=None,
    type=click.Path(),
    help="Feature store with the clean CLIP vectors (else CLIP runs on the fly).",
)
@click.option("--split", default="test", show_default=True, type=click.Choice(SPLITS))
@click.option(
    "--perturb",
    multiple=True,
    metavar="KIND:V[,V...]",
    help="jpeg:50,75,90 | resize:0.5,0.75 | blur:1.0 | noise:0.02 (repeatable).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help=f"Override {' or '.join(EVAL_OVERRIDES)} (e.g. DATA.GENERATORS=a,b).",
)
@click.option("--clip", default=None, help="Where the checkpoint's CLIP weights are now (MODEL:WEIGHTS).")
@click.option(
    "--encoder-weights",
    default=None,
    type=click.Path(dir_okay=False),
    help="Where the weights of the checkpoints' frozen spectral encoder are now (checked by sha256).",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option(
    "--heatmaps",
    "n_heatmaps",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Images per heatmap group.",
)
@click.option(
    "--resume",
    is_flag=True,
    help=f"Go on from the images an eval into --out that stopped scored (kept in OUT/{PROGRESS_DIR}).",
)
@user_errors
def command(checkpoints, shards, out, store, split, perturb, overrides, clip, encoder_weights, device, n_heatmaps,
            resume) -> None:  # fmt: skip
    """Score a split with one or more checkpoints: metrics per generator, robustness, plots and a report.

    Scores are kept as they are made (in OUT/eval-progress until the report is written), so an eval that
    stopped goes on with --resume."""
    result = run(EvalConfig(checkpoints=list(checkpoints), shards=shards, out=out, store=store, split=split,
                            perturb=list(perturb), overrides=list(overrides), clip=clip,
                            encoder_weights=encoder_weights, device=device,
                            n_heatmaps=n_heatmaps, resume=resume))  # fmt: skip
    for r in result.runs:
        o = r.metrics["overall"]
        unseen = unseen_generators(r.metrics["per_generator"], r.train_generators)
        click.echo(f"{r.label}: AUC {_auc_text(o)}, AP {_fmt(o['ap'])}, acc@threshold {_fmt(o['acc_at_threshold'])} "
                   f"({o['n_real']} real, {o['n_fake']} fake"
                   + (f"; unseen in training: {', '.join(unseen)}" if unseen else "") + ")")  # fmt: skip
        if r.degenerate():
            click.echo(f"  note: {r.degenerate()}")
    for note in (result.runs[0].padding_note(), result.runs[0].format_note()):
        if note:
            click.echo(f"note: {note}")
    if any(few_for_ci(r.metrics["overall"]) for r in result.runs):
        click.echo(f"†: fewer than {FEW_FOR_CI} reals or fakes; the bootstrap interval understates the uncertainty")
    click.echo(f"report: {result.report_html} (and report.md); metrics: {result.out / 'metrics.json'} "
               f"({result.seconds:.0f} s)")  # fmt: skip


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


__all__ = ["EvalConfig", "EvalResult", "CheckpointEval", "run", "command"]
