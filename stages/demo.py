"""`semspai demo`: build a small offline demo set and run every stage on it."""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import click
from PIL import Image

from semspai.pipeline.config import shipped_config
from semspai.stages import evaluate, extract, predict, shard, train
from semspai.stages.common import user_errors
from semspai.store.features import FeatureStoreError
from semspai.store.manifest import StaleOutputError

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo-out"
    crops_per_photo: int = 12  # 7 photos -> 84 reals + 84 fakes: a few minutes on 2 CPU cores
    seed: int = 0
    force: bool = False


def write_demo_images(cfg: DemoConfig) -> Path:
    """Write the synthetic demo set as PNGs with a manifest CSV (captions and groups included)."""
    from semspai.pipeline.demodata import make_demo_set  # here: it needs torch, and `demo --help` should not wait

    root = Path(cfg.out) / "data"
    manifest = root / "manifest.csv"
    if manifest.exists():
        return manifest
    rows = []
    for i, img in enumerate(make_demo_set(cfg.crops_per_photo, cfg.seed)):
        rel = Path("fake" if img.label else "real") / img.generator / f"{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.rgb).save(root / rel)  # PNG for reals and fakes alike: only the trace differs
        rows.append(
            {
                "path": rel.as_posix(),
                "label": "fake" if img.label else "real",
                "generator": img.generator,
                "caption": img.caption,
                "group": img.group,
            }
        )
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def run(cfg: DemoConfig, echo=click.echo) -> evaluate.EvalResult:
    """shard -> extract-clip (tiny-random) -> train --from-store -> eval -> predict, in `cfg.out`."""
    out = Path(cfg.out)
    if cfg.force and out.exists():
        shutil.rmtree(out)
    shards, store, run_dir = out / "shards", out / "features.zarr", out / "run"
    manifest = write_demo_images(cfg)

    echo(f"[1/5] shard {manifest} -> {shards}")
    sharded = shard.run(shard.ShardConfig(sources=[], manifests=[str(manifest)], out=str(shards), shard_size=32))
    echo(
        "      up to date" if sharded.up_to_date else f"      {sharded.n_written} images in {len(sharded.shards)} tars"
    )

    echo(f"[2/5] extract-clip --clip tiny-random -> {store}  (random weights: the semantic vectors mean nothing)")
    extracted = extract.run(
        extract.ExtractConfig(shards=str(shards), store=str(store), clip="tiny-random", workers=1, batch_size=64)
    )
    echo(f"      {extracted.n_images} images extracted, {len(extracted.shards_already_done)} shard(s) already done")

    echo(f"[3/5] train --from-store {store} -> {run_dir}")
    trained = train.run(
        train.TrainStageConfig(
            shards=str(shards),
            out=str(run_dir),
            store=str(store),
            config_path=str(shipped_config("demo")),
            resume=(run_dir / "checkpoints" / "last.pt").exists(),
        )
    )
    if trained.history:
        last = trained.history[-1]
        echo(f"      epoch {last['epoch']}: val AUC {last['val_auc']:.3f}, val acc {last['val_acc']:.3f}")

    echo(f"[4/5] eval on the test split -> {out / 'eval'}")
    result = evaluate.run(
        evaluate.EvalConfig(
            checkpoints=[str(run_dir)],
            shards=str(shards),
            store=str(store),
            out=str(out / "eval"),
            perturb=["jpeg:75", "resize:0.5"],
        )
    )

    echo(f"[5/5] predict {manifest.parent / 'fake'} -> {out / 'predictions.csv'}")
    predicted = predict.run(
        predict.PredictConfig(
            inputs=[str(manifest.parent / "fake")], checkpoint=str(run_dir), out=str(out / "predictions.csv")
        )
    )
    flagged = sum(p.label == "fake" for p in predicted.predictions)
    echo(f"      {flagged}/{len(predicted.predictions)} demo fakes flagged (train and test images alike)")

    m = result.metrics["overall"]
    echo(f"\nreport: {result.report_html}  (and {result.report_md})")
    echo(
        f"test split: AUC {m['auc']:.3f}, AP {m['ap']:.3f}, accuracy at the val threshold "
        f"{m['acc_at_threshold']:.3f} ({m['n_real']} real, {m['n_fake']} fake)"
    )
    for gen, gm in sorted(result.metrics["per_generator"].items()):
        echo(f"  {gen:>10}: AUC {gm['auc']:.3f} ({gm['n_fake']} fakes vs all reals)")
    return result


@click.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Delete OUT first and redo every stage.")
@user_errors
def command(out: str, force: bool) -> None:
    """Make a small synthetic demo set (photos from scikit-image and generator-like re-syntheses of them)
    and run every stage on it, offline. A stand-in that shows the pipeline working, not a benchmark."""
    try:
        run(DemoConfig(out=out, force=force))
    except (StaleOutputError, FeatureStoreError) as exc:  # e.g. OUT made by another semspai version
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise click.ClickException(f"{first} (for the demo: `semspai demo --out {out} --force` redoes it all)") from exc
