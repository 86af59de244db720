"""`semspai predict`: score image files of any size and format with a checkpoint; CSV or JSON out, heatmaps."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from semspai.pipeline.config import ConfigError
from semspai.pipeline.progress import progress
from semspai.stages.common import refuse_foreign_output, resolve_device, user_errors
from semspai.store.atomic import clear_partials, write_text_atomic
from semspai.store.checkpoints import load_checkpoint, resolve_checkpoint
from semspai.store.images import IMAGE_EXTENSIONS
from semspai.store.locks import lock_beside, run_lock
from semspai.store.manifest import StaleOutputError
from semspai.store.progress import begin_progress, file_state, read_progress, row_line
from semspai.store.shards import file_sha256
from semspai.store.sources import printable

if TYPE_CHECKING:  # the model's modules are imported where they are used: `predict --help` answers at once
    from semspai.pipeline.inference import Prediction

log = logging.getLogger(__name__)

CSV_HEADER = ("path", "score", "label", "n_patches", "error")  # DESIGN.md's predict CSV header
PROGRESS_SUFFIX = ".progress"
PROGRESS_KIND = "predict progress"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


@dataclass
class PredictConfig:
    inputs: list[str]  # image files and directories (walked recursively)
    checkpoint: str  # checkpoint file or run dir (= RUN/checkpoints/best.pt)
    out: str | None = None  # .json -> JSON, anything else -> CSV; None -> CSV on stdout (by the command)
    heatmaps: str | None = None  # folder for one attention/gate heatmap PNG per scored image
    clip: str | None = None  # where the checkpoint's CLIP weights are now
    encoder_weights: str | None = None  # where a frozen spectral encoder's weights are now
    device: str = "auto"
    chunk_size: int | None = None  # patches per encoder step (memory); None = the checkpoint's
    threshold: float | None = None  # label = fake when score >= this; None = the checkpoint's (chosen on val)
    resume: bool = False  # go on from the rows an interrupted predict into `out` kept in OUT.progress
    threads: int | None = None  # CPU threads for the model and for decoding; None: torch's default (the cores)


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
        writer.writerow(csv_row(p))
    return buf.getvalue()


def csv_row(p: Prediction) -> dict:
    """A prediction's CSV fields: the score with 6 decimals, empty on error."""
    return p.row() | {"score": "" if p.score is None else f"{p.score:.6f}"}


def format_json(predictions: list[Prediction]) -> str:
    return json.dumps([p.row() for p in predictions], indent=1) + "\n"


def written_by_predict(path: Path) -> bool:
    """Whether `path` starts as `format_csv` or `format_json` output does."""
    with path.open("rb") as f:
        head = f.read(64)
    return head.startswith(",".join(CSV_HEADER).encode() + b"\n") or head.startswith(b'[\n {\n  "path": ')


def progress_path(out: Path) -> Path:
    """`OUT.progress`: the rows a predict into OUT has scored so far (see `ScoredSoFar`)."""
    return out.with_name(out.name + PROGRESS_SUFFIX)


def heatmap_path(folder: Path, path: str | Path) -> Path:
    """Where `--heatmaps FOLDER` draws the map of the image at `path`: its name and a hash of its real path, so
    that files of one name in several folders get maps of their own, and a map's name does not depend on the
    image's place among the inputs (a file added before it, then --resume)."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:10]
    return folder / f"{Path(path).stem}-{digest}.png"


def progress_row(pred: Prediction, state: list[int] | None) -> dict:
    """A row of `OUT.progress`: the result's fields, the file's real path (what --resume matches, however the
    path is spelled then) and its state when it was read."""
    return pred.row() | {"realpath": os.path.realpath(pred.path), "file": state}


class ScoredSoFar:
    """The rows of a predict into OUT, kept in `OUT.progress` as they are scored: a header line naming the
    checkpoint (by sha256) and the threshold, then one JSON row a line (`progress_row`), flushed row by row, so
    a killed predict keeps its work for `--resume`. Removed once OUT is written."""

    def __init__(self, path: Path, header: dict, rows: dict[str, dict]) -> None:
        self.path, self.header, self.rows = path, header, rows  # rows by the real path of their file

    @classmethod
    def read(cls, path: Path) -> ScoredSoFar:
        """The header and rows of a progress file; a last line cut short by a kill is dropped."""
        header, rows = read_progress(path, PROGRESS_KIND, (*CSV_HEADER, "realpath", "file"), "predict")
        return cls(path, header, {row["realpath"]: row for row in rows})

    def reusable(self, paths: list[Path], heatmaps: Path | None) -> dict[str, Prediction]:
        """The rows this run can keep, by `str(path)` of `paths`: those of files that are as they were scored,
        with their heatmap in `heatmaps` when it is given. Scored again: a file changed since (size or mtime),
        an error row (the fault may lie outside the file: a permission, a mount), an image whose heatmap this
        run's folder lacks. Rows of files not among `paths` are logged."""
        from semspai.pipeline.inference import Prediction

        kept, again, matched = {}, Counter(), set()
        for p in paths:
            row = self.rows.get(os.path.realpath(p))
            if row is None:
                continue
            matched.add(row["realpath"])
            if row["error"] or row["file"] is None:
                again["error row(s)"] += 1
            elif row["file"] != file_state(p):
                again["changed since scored"] += 1
            elif heatmaps is not None and not heatmap_path(heatmaps, p).exists():
                again[f"without a heatmap in {heatmaps}"] += 1
            else:
                kept[str(p)] = Prediction(**{k: row[k] for k in CSV_HEADER} | {"path": str(p)})
        if again:
            log.info("%s: scored again: %s", self.path, ", ".join(f"{n} {why}" for why, n in again.items()))
        if gone := [r["path"] for key, r in self.rows.items() if key not in matched]:
            log.warning("%s: %d scored image(s) are not among this run's inputs (e.g. %s) and are left out of its "
                        "results", self.path, len(gone), gone[0])  # fmt: skip
        return kept


def _scored_so_far(out: Path, header: dict, resume: bool) -> ScoredSoFar | None:
    """With `resume`, the rows an interrupted predict into `out` kept (when it is the same checkpoint and
    threshold); without, None, and an error when such rows are there (they are not thrown away unasked)."""
    path = progress_path(out)
    if not path.exists():
        if resume:
            log.info("%s: no interrupted predict into %s to resume; scoring every image", path, out)
        return None
    have = ScoredSoFar.read(path)
    if not have.rows:  # nothing to lose, whatever it was scored with
        log.info("%s: an earlier predict into %s stopped before scoring any image; starting over", path, out)
        return None
    if not resume:
        raise StaleOutputError(f"{path} holds {len(have.rows)} image(s) that a predict into {out} scored before it "
                               "stopped: pass --resume to go on from there, or delete it to start over")  # fmt: skip
    if have.header.get("checkpoint_sha256") != header["checkpoint_sha256"]:
        raise StaleOutputError(f"--resume: {path} was scored with another checkpoint ({have.header.get('checkpoint')}); "
                               "resume with that one, or delete the file to start over")  # fmt: skip
    if have.header.get("threshold") != header["threshold"]:
        raise StaleOutputError(f"--resume: {path} was labelled at threshold {have.header.get('threshold')}, not "
                               f"{header['threshold']}; pass --threshold {have.header.get('threshold')}, or delete "
                               "the file to start over")  # fmt: skip
    return have


def run(cfg: PredictConfig, on_row: Callable[[Prediction], None] | None = None) -> PredictResult:
    """Score every image of cfg.inputs; unreadable files get an error row and the rest go on. `on_row` gets
    each prediction as it is made (the command streams CSV to stdout with it)."""
    from semspai.pipeline.host import torch_threads

    start = time.perf_counter()
    out = Path(cfg.out) if cfg.out else None
    if cfg.resume and out is None:
        raise ConfigError("--resume continues a predict into --out FILE: give the --out of the run to continue")

    def busy(holder: str) -> FileExistsError:
        return FileExistsError(f"{out} is being written by another `semspai predict` ({holder})")

    with torch_threads(cfg.threads):
        if out is None:
            return _predict(cfg, None, on_row, start)
        refuse_foreign_output(out, written_by_predict, "an earlier predict result",
                              "without --out, the rows go to stdout as CSV")  # fmt: skip
        with run_lock(lock_beside(out), busy):
            clear_partials([out, progress_path(out)])  # what a predict killed mid-write left
            return _predict(cfg, out, on_row, start)


def _predict(cfg: PredictConfig, out: Path | None, on_row: Callable[[Prediction], None] | None,
             start: float) -> PredictResult:  # fmt: skip
    from semspai.pipeline.inference import find_images, load_detector
    from semspai.stages import report

    paths = find_images(cfg.inputs)
    if not paths:
        raise FileNotFoundError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in {', '.join(cfg.inputs)}")
    file = resolve_checkpoint(cfg.checkpoint)
    header: dict = {"semspai": PROGRESS_KIND, "checkpoint": str(file.resolve())}
    have = None
    if out is not None:
        header["checkpoint_sha256"] = file_sha256(file)
    if out is not None and (progress_path(out).exists() or cfg.resume):
        threshold = cfg.threshold if cfg.threshold is not None else float(load_checkpoint(file)["threshold"])
        have = _scored_so_far(out, header | {"threshold": threshold}, cfg.resume)
    det = load_detector(file, clip=cfg.clip, device=resolve_device(cfg.device), encoder_weights=cfg.encoder_weights)
    if cfg.chunk_size is not None:
        det.chunk_size = cfg.chunk_size
    if cfg.threads is not None:
        det.decode_workers = min(det.decode_workers, cfg.threads)
    if cfg.threshold is not None:
        det.threshold = cfg.threshold
    header["threshold"] = det.threshold
    folder = Path(cfg.heatmaps) if cfg.heatmaps else None
    done = {} if have is None else have.reusable(paths, folder)
    if have is not None:
        log.info("resuming: %d of %d image(s) scored before, %d to go", len(done), len(paths), len(paths) - len(done))
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    todo = [p for p in paths if str(p) not in done]
    # taken before reading: a change while scoring is seen by a later --resume
    states = {str(p): file_state(p) for p in todo} if out is not None else {}
    heatmaps = []
    with contextlib.ExitStack() as stack:
        sink = None
        if out is not None:  # rows kept as they come: a killed run loses at most the row being written
            out.parent.mkdir(parents=True, exist_ok=True)
            kept = [progress_row(p, have.rows[os.path.realpath(p.path)]["file"]) for p in done.values()]
            sink = stack.enter_context(begin_progress(progress_path(out), header, kept))
        scored = det.iter_predict(todo, return_maps=folder is not None)
        for pred, rgb in progress(scored, total=len(todo), desc="predict", unit="img"):
            if folder is not None and rgb is not None:  # drawn before the row is kept: a kept row has its map
                name = printable(Path(pred.path).name)  # matplotlib takes no name that is not UTF-8
                title = f"{name}: {pred.label}, score {pred.score:.3f} ({pred.n_patches} patches)"
                heatmaps.append(report.plot_heatmap(rgb, pred.maps, title, heatmap_path(folder, pred.path)))
            pred.maps = None  # drawn: a long run keeps rows, not maps
            if sink is not None:
                sink.write(row_line(progress_row(pred, states[str(pred.path)])))
                sink.flush()
            if on_row is not None:
                on_row(pred)
            done[str(pred.path)] = pred
    predictions = [done[str(p)] for p in paths]
    if out is not None:
        # a path that is no UTF-8 (a Latin-1 name on Linux, say) goes out as its bytes on disk: a reader can open it
        text = format_json(predictions) if out.suffix.lower() == ".json" else format_csv(predictions)
        write_text_atomic(out, text, errors="surrogateescape")
        progress_path(out).unlink()
    return PredictResult(predictions=predictions, out=out, n_failed=sum(1 for p in predictions if p.error),
                         seconds=time.perf_counter() - start, heatmaps=heatmaps)  # fmt: skip


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):  # nan passes FloatRange: every comparison with it is false
        raise click.BadParameter(f"{value} is not a number within [0, 1]")
    return value


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--checkpoint", required=True, type=click.Path(), help="Checkpoint file or run dir (its best.pt).")
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Results file: .json for JSON, else CSV (path,score,label,n_patches,error). Default (or -): CSV on stdout.",
)
@click.option(
    "--heatmaps",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder for one heatmap PNG per image (attention per patch, fusion gates).",
)
@click.option("--clip", default=None, help="Where the checkpoint's CLIP weights are now (MODEL:WEIGHTS).")
@click.option(
    "--encoder-weights",
    default=None,
    type=click.Path(dir_okay=False),
    help="Where the weights of the checkpoint's frozen spectral encoder are now (checked by sha256).",
)
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
    callback=lambda ctx, param, v: _finite(v),
    help="Label an image fake when its score is at least this; default: the checkpoint's, chosen on val (Youden's J).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Go on from the images an interrupted predict into --out scored (kept in OUT.progress).",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="CPU threads for the model and for decoding images; default: torch's (one per core).",
)
@user_errors
def command(inputs, checkpoint, out, heatmaps, clip, encoder_weights, device, chunk_size, threshold, resume,
            threads) -> None:  # fmt: skip
    """Score images (files, or directories walked recursively) of any size: score = P(fake).

    In a directory, files ending .jpg .jpeg .png .webp .tif .tiff .bmp (any case) are scored and hidden ones
    are left out; a file named on the command line is scored whatever its name.

    An unreadable file gets a row with its error and the others are still scored; the exit status is non-zero
    only when no file could be scored. Rows go to stdout as they are scored when there is no --out; with one,
    they are kept in OUT.progress until OUT is written, so a stopped run goes on with --resume.
    """
    out = None if out == "-" else out  # `--out -`: stdout, as for other tools (not a file named "-")
    with contextlib.suppress(AttributeError, ValueError):  # paths that are no UTF-8 go out as their bytes on disk
        sys.stdout.reconfigure(errors="surrogateescape")
    stream = csv.DictWriter(sys.stdout, fieldnames=CSV_HEADER, lineterminator="\n")
    started = []

    def on_row(pred: Prediction) -> None:  # stdout gets rows as they come: `predict ... | head` needs no wait
        if not started:
            stream.writeheader()
            started.append(True)
        stream.writerow(csv_row(pred))
        sys.stdout.flush()

    cfg = PredictConfig(inputs=list(inputs), checkpoint=checkpoint, out=out, heatmaps=heatmaps, clip=clip,
                        encoder_weights=encoder_weights, device=device, chunk_size=chunk_size, threshold=threshold,
                        resume=resume, threads=threads)  # fmt: skip
    try:
        result = run(cfg, on_row=on_row if out is None else None)
    except BrokenPipeError:  # the reader of stdout stopped (`| head`): so does predict, quietly, as `cat` would
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        sys.exit(EXIT_BROKEN_PIPE)
    n = len(result.predictions)
    n_fake = sum(1 for p in result.predictions if p.label == "fake")
    where = f" -> {result.out}" if result.out else ""
    click.echo(f"{n - result.n_failed} of {n} images scored ({n_fake} called fake) in {result.seconds:.1f} s{where}",
               err=True)  # fmt: skip
    if result.n_failed:
        click.echo(f"{result.n_failed} file(s) could not be read; see their rows' error", err=True)
    if result.n_failed == n:
        raise click.ClickException("no image could be scored")


__all__ = ["PredictConfig", "PredictResult", "run", "command", "CSV_HEADER"]
