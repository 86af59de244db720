"""`semspai store info|verify|export-h5`: inspect a feature store, check it against its shards, export to HDF5."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from semspai.pipeline.grid import PatchRule, grid_boxes
from semspai.stages.common import refuse_foreign_output, user_errors
from semspai.store.features import (
    FeatureStore,
    FeatureStoreError,
    changed_shards,
    damage_error,
    damaged_arrays,
    done_shard_attrs,
    drop_shards,
    export_h5,
    is_export,
    undecodable_arrays,
    verify_store,
)
from semspai.store.shards import resolve_shards, shard_name

SKIPPED_SHOWN = 10  # `info` lists this many unreadable images; --json lists them all


def summarize(store: FeatureStore) -> dict:
    """What `info` reports, as JSON-safe data."""
    clip = store.clip_spec
    labels = Counter({0: "real", 1: "fake"}.get(int(v), str(v)) for v in store.meta["label"])
    return {
        "images": store.n_images,
        "schema_version": store.attrs["schema_version"],
        "semspai_version": store.attrs.get("semspai_version", ""),
        "clip": clip,
        "meaningless": bool(clip.get("meaningless")),
        "has_text": store.has_text,
        "n_prompts": len(store.prompts()),
        "embed_dim": store.embed_dim,
        "decoder": store.attrs["decoder"],
        "patch_rule": store.attrs["patch_rule"]["id"],
        "by_split": dict(sorted(Counter(store.meta["split"].tolist()).items())),
        "by_label": dict(sorted(labels.items())),
        "by_generator": dict(sorted(Counter(store.meta["generator"].tolist()).items())),
        "done_shards": store.done_shards,
        "missing_shards": sorted(set(store.recorded_shards) - set(store.done_shards)),
        "unfinished_shards": store.unfinished_shards,
        "skipped": store.skipped,
    }


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def format_info(s: dict) -> list[str]:
    clip = s["clip"]
    lines = [
        f"images: {s['images']}",
        f"schema: {s['schema_version']} (semspai {s['semspai_version']})",
        f"clip: {clip['arg']} ({clip['kind']} {clip['model']}, weights {clip['weights_id']}, sha256 "
        f"{clip['sha256'][:16]}…, quick_gelu {clip['quick_gelu']}, {s['embed_dim']}-d, {clip['image_size']} px)",
    ]
    if s["meaningless"]:
        lines.append("!!! RANDOM WEIGHTS: these vectors carry NO MEANING (tests, demo, benchmarks only) !!!")
    if s["has_text"]:
        lines.append(f"text tower: yes ({s['n_prompts']} prompt vectors, caption vectors where captions exist)")
    else:
        lines.append("text tower: NONE: no caption or prompt vectors (semantic-consistency loss and CLIP score off)")
    gpu = s["decoder"].get("gpu")
    lines += [
        f"decoder: {s['decoder']['cpu']}" + (f" + GPU {gpu}" if gpu else ""),
        f"patch rule: {s['patch_rule']}",
        f"by split: {_counts(s['by_split'])}",
        f"by label: {_counts(s['by_label'])}",
        f"by generator: {_counts(s['by_generator'])}",
        f"shards: {len(s['done_shards'])} done, {len(s['missing_shards'])} missing"
        + (
            f" ({', '.join(s['missing_shards'])}: asked for, not done: an extract-clip running or stopped, or dropped)"
            if s["missing_shards"]
            else ""
        ),  # fmt: skip
        f"skipped images (unreadable): {len(s['skipped'])}",
    ]
    lines += [f"  {k['shard']}/{k['key']}: {k['reason']}" for k in s["skipped"][:SKIPPED_SHOWN]]
    if len(s["skipped"]) > SKIPPED_SHOWN:
        lines.append(f"  … and {len(s['skipped']) - SKIPPED_SHOWN} more (--json lists all)")
    return lines


@click.group("store")
def group() -> None:
    """Inspect, verify and export a feature store; drop shards for extract-clip to redo."""


@group.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (first key: images).")
@user_errors
def info(path: str, as_json: bool) -> None:
    """Counts, CLIP spec, shards and skipped images of the store at PATH (first line: `images: N`)."""
    damaged = damaged_arrays(path, done_shard_attrs(path))
    if damaged:  # counts read from a damaged store would include Zarr's fill values: only the damage is reported
        lines = [f"DAMAGED: {len(damaged)} array(s) of the store are gone or lack chunk files"]
        click.echo(json.dumps({"damaged": damaged}, indent=1) if as_json else "\n".join(lines + damaged))
        raise damage_error(path, damaged)
    summary = summarize(FeatureStore.open(path, check=False))  # just checked
    click.echo(json.dumps(summary, indent=1, ensure_ascii=False) if as_json else "\n".join(format_info(summary)))


@group.command("verify")
@click.argument("path")
@click.option("--shards", required=True, help="Shard SPEC the store was made from.")
@user_errors
def verify(path: str, shards: str) -> None:
    """Check every sample of SPEC is in the store exactly once, the tars are unchanged, vectors are sane."""
    done = done_shard_attrs(path)
    damaged = damaged_arrays(path, done) + undecodable_arrays(path, done)  # the latter reads every chunk
    for d in damaged:
        click.echo(f"problem: {d}", err=True)
    if damaged:  # nothing else is checked: where chunks are missing, Zarr reads fill values
        raise damage_error(path, damaged, "listed above")
    store = FeatureStore.open(path, check=False)  # just checked
    rule = PatchRule(**{k: v for k, v in store.attrs["patch_rule"].items() if k != "id"})
    paths = resolve_shards(shards)
    problems = verify_store(store, paths, lambda h, w: grid_boxes(h, w, rule))
    for p in problems:
        click.echo(f"problem: {p}", err=True)
    if problems:
        raise FeatureStoreError(f"{path}: {len(problems)} problem(s); first: {problems[0]}")
    names = {shard_name(p) for p in paths}
    images = sum(int(store.shard_info[n]["n_images"]) for n in names)
    skipped = sum(s["shard"] in names for s in store.skipped)
    others = len(store.done_shards) - len(names)
    click.echo(f"{path}: ok ({len(names)} shard(s) of the spec: {images} images, {skipped} unreadable skipped"
               + (f"; the store holds {others} more shard(s), not checked against tars" if others else "") + ")")  # fmt: skip


@group.command("export-h5")
@click.argument("path")
@click.argument("out")
@user_errors
def export(path: str, out: str) -> None:
    """Write the store's done shards (concatenated) to the HDF5 file OUT."""
    refuse_foreign_output(Path(out), is_export, "an earlier export-h5 file")
    store = FeatureStore.open(path)
    click.echo(f"{export_h5(store, out)}: {store.n_images} images")
    pending = sorted(set(store.recorded_shards) - set(store.done_shards))
    if pending:  # an extraction still running, or stopped: the export is of what is done
        click.echo(f"warning: {len(pending)} shard(s) asked for are not done (an extract-clip running or "
                   f"stopped, or dropped; e.g. {pending[0]}); the export holds the {len(store.done_shards)} done ones",
                   err=True)  # fmt: skip


@group.command("drop")
@click.argument("path")
@click.argument("names", nargs=-1)
@click.option("--changed", "spec", metavar="SPEC", default=None,
              help="Drop every shard of SPEC whose tar changed since it was extracted (a tar damaged since "
              "sharding, or another folder's tar of a name the store holds, is refused).")  # fmt: skip
@user_errors
def drop(path: str, names: tuple[str, ...], spec: str | None) -> None:
    """Drop shards (NAMES as `store info` lists them, or their tars) from the store at PATH, so that the next
    `extract-clip` extracts them again: after a tar changed, or to repair a damaged shard.
    """
    if not names and spec is None:
        raise click.UsageError("name the shards to drop, or pass --changed SPEC")
    wanted = [shard_name(n) if n.endswith(".tar") else n for n in names]
    if spec is not None:
        wanted += changed_shards(path, resolve_shards(spec))
    if not wanted:
        click.echo(f"{path}: nothing to drop (every shard of {spec} is as it was extracted)")
        return
    dropped = drop_shards(path, wanted)
    click.echo(f"{path}: dropped {len(dropped)} shard(s): {', '.join(dropped)}; rerun `semspai extract-clip "
               f"--store {path} --shards ...` to extract them again")  # fmt: skip
