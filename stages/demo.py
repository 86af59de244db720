"""`semspai demo`: build a small offline demo set and run every stage on it."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import click
from PIL import Image

from semspai.pipeline.demodata import make_demo_set
from semspai.stages import shard
from semspai.stages.common import user_errors

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "demo-out"
    crops_per_photo: int = 6  # 7 photos -> 42 reals + 42 fakes: minutes on 2 CPU cores
    seed: int = 0
    force: bool = False


def write_demo_images(cfg: DemoConfig) -> Path:
    """Write the synthetic demo set as PNGs with a manifest CSV (captions and groups included)."""
    root = Path(cfg.out) / "data"
    manifest = root / "manifest.csv"
    if manifest.exists() and not cfg.force:
        return manifest
    rows = []
    for i, img in enumerate(make_demo_set(cfg.crops_per_photo, cfg.seed)):
        rel = Path("fake" if img.label else "real") / img.generator / f"{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.rgb).save(root / rel)  # PNG for reals and fakes alike: only the trace differs
        rows.append({"path": rel.as_posix(), "label": "fake" if img.label else "real", "generator": img.generator,
                     "caption": img.caption, "group": img.group})
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def run(cfg: DemoConfig, echo=click.echo) -> dict:
    out = Path(cfg.out)
    manifest = write_demo_images(cfg)
    echo(f"[1/1] shard: {manifest}")
    sharded = shard.run(shard.ShardConfig(sources=[], manifests=[str(manifest)], out=str(out / "shards"),
                                          shard_size=32, force=cfg.force))
    echo(f"      {'up to date' if sharded.up_to_date else f'{sharded.n_written} images'} in {out / 'shards'}")
    return {"shards": out / "shards"}


@click.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Redo every stage.")
@user_errors
def command(out: str, force: bool) -> None:
    """Make a small synthetic demo set (photos from scikit-image and generator-like re-syntheses of them)
    and run every stage on it, offline. A stand-in that shows the pipeline working, not a benchmark."""
    run(DemoConfig(out=out, force=force))
