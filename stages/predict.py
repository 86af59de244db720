"""`semspai predict`: score image files of any size and format with a checkpoint; CSV or JSON out, heatmaps."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from semspai.pipeline.clip import ClipLoadError
from semspai.pipeline.inference import Prediction, find_images, load_detector
from semspai.pipeline.progress import progress
from semspai.stages import report
from semspai.stages.common import refuse_foreign_output, register_user_error, resolve_device, user_errors

register_user_error(ClipLoadError)

CSV_HEADER = ("path", "score", "label", "n_patches", "error")  # DESIGN.md's predict CSV header


@dataclass
class PredictConfig:
    inputs: list[str]  # image files and directories (walked recursively)
    checkpoint: str  # checkpoint file or run dir (= RUN/checkpoints/best.pt)
    out: str | None = None  # .json -> JSON, anything else -> CSV; None -> CSV on stdout (by the command)
    heatmaps: str | None = None  # folder for one attention/gate heatmap PNG per scored image
    clip: str | None = None  # where the checkpoint's CLIP weights are now
    device: str = "auto"
    chunk_size: int | None = None  # patches per encoder step (memory); None = the checkpoint's
    threshold: float | None = None  # label = fake when score >= this; None = the checkpoint's (chosen on val)


@dataclass
class PredictResult:
    predictions: list[Prediction]
    out: Path | None
    n_failed: int
    seconds: float
    heatmaps: list[Path] = field(default_factory=list)


def format_csv(predictions: list[Prediction]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_HEADER, lineterminator="\n")
    writer.writeheader()
    for p in predictions:
        writer.writerow(p.row() | {"score": "" if p.score is None else f"{p.score:.6f}"})
    return buf.getvalue()


def format_json(predictions: list[Prediction]) -> str:
    return json.dumps([p.row() for p in predictions], indent=1) + "\n"


def written_by_predict(path: Path) -> bool:
    """Whether `path` starts as `format_csv` or `format_json` output does."""
    with path.open("rb") as f:
        head = f.read(64)
    return head.startswith(",".join(CSV_HEADER).encode() + b"\n") or head.startswith(b'[\n {\n  "path": ')


def write_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a killed run never leaves a results file that looks whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(cfg: PredictConfig) -> PredictResult:
    """Score every image of cfg.inputs; unreadable files get an error row and the rest go on."""
    start = time.perf_counter()
    if cfg.out:
        refuse_foreign_output(Path(cfg.out), written_by_predict, "an earlier predict result")
    paths = find_images(cfg.inputs)
    if not paths:
        raise FileNotFoundError(f"no image files (.jpg .png .webp .tif .bmp) in {', '.join(cfg.inputs)}")
    det = load_detector(cfg.checkpoint, clip=cfg.clip, device=resolve_device(cfg.device))
    if cfg.chunk_size is not None:
        det.chunk_size = cfg.chunk_size
    if cfg.threshold is not None:
        det.threshold = cfg.threshold
    folder = Path(cfg.heatmaps) if cfg.heatmaps else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    predictions, heatmaps = [], []
    items = progress(paths, total=len(paths), desc="predict", unit="img")
    for i, (pred, rgb) in enumerate(det.iter_predict(items, return_maps=folder is not None)):
        predictions.append(pred)
        if folder is not None and rgb is not None:
            title = f"{Path(pred.path).name}: {pred.label}, score {pred.score:.3f} ({pred.n_patches} patches)"
            heatmaps.append(report.plot_heatmap(rgb, pred.maps, title, folder / f"{i:05d}-{Path(pred.path).stem}.png"))
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        write_atomic(out, format_json(predictions) if out.suffix.lower() == ".json" else format_csv(predictions))
    return PredictResult(predictions=predictions, out=out, n_failed=sum(1 for p in predictions if p.error),
                         seconds=time.perf_counter() - start, heatmaps=heatmaps)  # fmt: skip


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint file or run dir (its best.pt).")
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Results file: .json for JSON, else CSV (path,score,label,n_patches,error). Default: CSV on stdout.",
)
@click.option(
    "--heatmaps",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder for one heatmap PNG per image (attention per patch, fusion gates).",
)
@click.option("--clip", default=None, help="Where the checkpoint's CLIP weights are now (MODEL:WEIGHTS).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option(
    "--chunk-size",
    default=None,
    type=click.IntRange(min=1),
    help="Patches per encoder step (bounds memory); default: the checkpoint's.",
)
@click.option(
    "--threshold",
    default=None,
    type=click.FloatRange(0, 1),
    help="Label an image fake when its score is at least this; default: the checkpoint's, chosen on val (Youden's J).",
)
@user_errors
def command(inputs, checkpoint, out, heatmaps, clip, device, chunk_size, threshold) -> None:
    """Score images (files, or directories walked recursively) of any size: score = P(fake).

    An unreadable file gets a row with its error and the others are still scored; the exit status is non-zero
    only when no file could be scored.
    """
    result = run(PredictConfig(inputs=list(inputs), checkpoint=checkpoint, out=out, heatmaps=heatmaps, clip=clip,
                               device=device, chunk_size=chunk_size, threshold=threshold))  # fmt: skip
    if result.out is None:
        sys.stdout.write(format_csv(result.predictions))
    n = len(result.predictions)
    n_fake = sum(1 for p in result.predictions if p.label == "fake")
    where = f" -> {result.out}" if result.out else ""
    click.echo(f"{n - result.n_failed} of {n} images scored ({n_fake} called fake) in {result.seconds:.1f} s{where}",
               err=True)  # fmt: skip
    if result.n_failed:
        click.echo(f"{result.n_failed} file(s) could not be read; see the error column", err=True)
    if result.n_failed == n:
        raise click.ClickException("no image could be scored")


__all__ = ["PredictConfig", "PredictResult", "run", "command", "CSV_HEADER"]
