"""`semspai shard`: image folders and CSV manifests -> WebDataset tars of original bytes + index.json."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from semspai import __version__
from semspai.pipeline.grid import DEFAULT_RULE, mostly_padding
from semspai.pipeline.progress import progress
from semspai.stages.common import user_errors
from semspai.store.atomic import write_json_atomic
from semspai.store.images import DECODER_ID, DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, probe_image
from semspai.store.locks import lock_beside, run_lock
from semspai.store.manifest import (
    StageManifest,
    StaleOutputError,
    check_stage,
    fingerprint_paths,
    manifest_path,
    read_manifest,
    write_manifest,
)
from semspai.store.shards import (
    INDEX_NAME,
    PREVIOUS,
    SHARD_SCHEMA_VERSION,
    SPLITS,
    STAGING,
    ShardError,
    ShardWriter,
    damaged_tars,
    read_index,
)
from semspai.store.sources import (
    LABEL_NAMES,
    SourceError,
    SourceRecord,
    hash_split,
    parse_split_ratios,
    printable,
    read_manifest_csv,
    sample_key,
    scan_folder,
    split_ratios,
)

log = logging.getLogger(__name__)
STAGE = "shard"
TOO_LARGE = "too large"  # how a skipped image over --max-pixels is listed
MISSING = "missing: no such file"  # a manifest row naming a file that is not there
SHARD_FILE = re.compile(r"^([A-Za-z0-9_]+-)?(train|val|test)-\d{6}\.tar(\.partial)?$")
PREFIX = re.compile(r"^[A-Za-z0-9_]+$")  # dot-free and dash-free: the split stays the name's next-to-last part


@dataclass
class ShardConfig:
    sources: list[str]  # folders or CSV manifests
    out: str
    manifests: list[str] = field(default_factory=list)
    shard_size: int = 1000  # samples per tar: big enough for streaming, small enough to spread over workers
    split: str = "0.8,0.1,0.1"  # train,val,test ratios for samples whose manifest row names no split
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard
    skip_unlabeled: bool = False
    force: bool = False
    workers: int = 0  # decode threads; 0 = one per core
    prefix: str = ""  # tars named PREFIX-train-000000.tar: shards made apart (a later batch) can share one store

    def digest(self, split_as_given: bool = False) -> str:
        """Hash of what changes the output (not `force`, `workers` or where the sources are listed). The split
        counts as its ratios, not their spelling: `0,0,1` and `0,0,1.0` shard alike (`split_as_given`: as
        versions before this one hashed it; the default's digest is the same either way)."""
        keys = ("shard_size", "split", "max_pixels", "skip_unlabeled", "prefix")
        payload = {k: getattr(self, k) for k in keys} | {"schema": SHARD_SCHEMA_VERSION, "decoder": DECODER_ID}
        if not split_as_given:
            payload["split"] = ",".join(map(repr, split_ratios(self.split)))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class ShardResult:
    out: Path
    up_to_date: bool  # True: nothing was done, the output already matched inputs and config
    n_written: int = 0
    n_skipped: int = 0  # unreadable or too large
    n_too_large: int = 0  # of those, over --max-pixels
    n_missing: int = 0  # of those, named by a manifest but not there
    n_duplicates: int = 0
    n_conflicting: int = 0  # files whose bytes other files carry under the other label: none of them is kept
    n_unlabeled_skipped: int = 0
    shards: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    confounds: list[str] = field(default_factory=list)  # label_confounds: what else tells real from fake
    seconds: float = 0.0


@dataclass
class _Probed:
    record: SourceRecord
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""  # as PIL names it: JPEG, PNG, WEBP, ...
    error: str = ""


def collect_records(cfg: ShardConfig) -> list[SourceRecord]:
    records: list[SourceRecord] = []
    for src in [*cfg.sources, *cfg.manifests]:
        path = Path(src)
        if path.is_dir():
            records += scan_folder(path)
        elif path.is_file() and path.suffix.lower() == ".csv":
            records += read_manifest_csv(path)
        elif not path.exists():
            raise SourceError(f"source {src} does not exist")
        else:
            raise SourceError(f"source {src} is neither a folder nor a .csv manifest")
    if not cfg.sources and not cfg.manifests:
        raise SourceError("nothing to shard: give source folders or CSV manifests (as arguments or --manifest)")
    if not records:
        raise SourceError(f"no images (.jpg .png .webp .tif .bmp) found in {', '.join(cfg.sources + cfg.manifests)}")
    seen: dict[str, SourceRecord] = {}
    for r in records:
        if r.origin in seen and os.path.realpath(seen[r.origin].path) != os.path.realpath(r.path):
            name = r.origin.split("/")[0]
            raise SourceError(f"{seen[r.origin].path} and {r.path} would be one sample ({r.origin}): two sources are "
                              f"named {name}; rename one (a source's name is part of its images' keys)")  # fmt: skip
        if r.origin in seen:
            raise SourceError(f"{r.path} is listed twice (as {r.origin}); list each source once")
        seen[r.origin] = r
    return sorted(records, key=lambda r: r.origin)


def _probe(record: SourceRecord, max_pixels: int) -> _Probed:
    try:
        data = record.path.read_bytes()
    except FileNotFoundError:
        return _Probed(record, error=MISSING)
    except OSError as exc:
        return _Probed(record, error=f"unreadable file: {exc.strerror or exc}")
    probed = _Probed(record, sha256=hashlib.sha256(data).hexdigest())
    try:
        info = probe_image(data, max_pixels)
    except ImageTooLargeError as exc:
        probed.error = f"{TOO_LARGE}: {exc}; raise --max-pixels to accept it"
    except ImageDecodeError as exc:
        probed.error = str(exc)
    else:
        probed.width, probed.height, probed.format = info.width, info.height, info.format
    return probed


CONFOUND_MIN = 10  # images of each label before a difference between the labels is called out
FORMAT_GAP = 0.5  # total variation distance between the labels' shares of file formats
SIZE_RATIO = 2.0  # ratio of the labels' median pixel counts


def _differences(real: list[_Probed], fake: list[_Probed], what: str, name: str) -> dict[str, str]:
    """{"format": why, "size": why} for what tells `fake` (called `name`) from `real` besides generation."""
    found = {}
    shares = [{f: n / len(ps) for f, n in Counter(p.format or "?" for p in ps).items()} for ps in (real, fake)]
    gap = 0.5 * sum(abs(shares[0].get(f, 0) - shares[1].get(f, 0)) for f in shares[0].keys() | shares[1].keys())
    if gap >= FORMAT_GAP:
        said = ["; ".join(f"{f} {v:.0%}" for f, v in sorted(sh.items(), key=lambda kv: -kv[1])) for sh in shares]
        found["format"] = (f"file formats differ {what} (real: {said[0]}; {name}: {said[1]}): a detector can learn "
                           "the formats' compression instead of generation traces; re-encode both alike, or read "
                           "eval under --perturb jpeg:...")  # fmt: skip
    medians = [float(statistics.median(p.width * p.height for p in ps)) for ps in (real, fake)]
    ratio = max(medians) / max(min(medians), 1.0)
    if ratio >= SIZE_RATIO:
        found["size"] = (f"image sizes differ {what} (median real {medians[0] / 1e6:.2f} MP, {name} "
                         f"{medians[1] / 1e6:.2f} MP, {ratio:.1f}x): a detector can learn the size (patch counts, "
                         "resampling) instead; match the sizes, or read the results with that in mind")  # fmt: skip
    return found


def label_confounds(kept: list[_Probed]) -> list[str]:
    """What differs between the real and the fake images besides how they were made, which a detector can learn
    instead: the file format (JPEG reals and PNG fakes: compression alone tells them apart) and the size. All
    fakes against the reals first, then each generator's (with CONFOUND_MIN fakes or more) for what the whole
    did not show: one generator's PNGs among JPEGs would learn its format."""
    real = [p for p in kept if p.record.label == 0]
    fake = [p for p in kept if p.record.label == 1]
    if len(real) < CONFOUND_MIN:
        return []
    overall = _differences(real, fake, "by label", "fake") if len(fake) >= CONFOUND_MIN else {}
    found = list(overall.values())
    by_gen: dict[str, list[_Probed]] = {}
    for p in fake:
        by_gen.setdefault(p.record.generator, []).append(p)
    if len(by_gen) > 1:
        for gen, ps in sorted(by_gen.items()):
            if len(ps) >= CONFOUND_MIN:
                what = f"between the reals and the fakes of {gen or '(no generator)'}"
                found += [t for k, t in _differences(real, ps, what, gen or "fake").items() if k not in overall]
    return found


def _set_old_shards_aside(out: Path) -> None:
    """Move the previous run's tars into PREVIOUS (deleted once the new output is recorded complete), so a
    crash while the new tars move in still leaves the old ones on disk."""
    aside = out / PREVIOUS
    aside.mkdir(exist_ok=True)
    for p in out.iterdir():
        if SHARD_FILE.match(p.name):
            os.replace(p, aside / p.name)


def run(cfg: ShardConfig) -> ShardResult:
    """Shard the sources into `cfg.out`; a no-op (up_to_date) when inputs and config are unchanged. One run
    at a time per output folder: a second one fails at once (it would clear the first one's staging folder)."""
    lock = lock_beside(cfg.out)  # beside the folder, which a refused run must not create

    def busy(holder: str) -> SourceError:
        return SourceError(f"{cfg.out} is being written by another `semspai shard` ({holder}, lock {lock}); "
                           "wait for it to finish")  # fmt: skip

    with run_lock(lock, busy):
        return _run(cfg)


def _run(cfg: ShardConfig) -> ShardResult:
    start = time.perf_counter()
    ratios = parse_split_ratios(cfg.split)
    if cfg.shard_size < 1:
        raise SourceError(f"--shard-size must be at least 1, got {cfg.shard_size}")
    if cfg.prefix and not PREFIX.match(cfg.prefix):
        raise SourceError(f"--prefix {cfg.prefix!r}: use letters, digits and underscores only")
    records = collect_records(cfg)
    out = Path(cfg.out)
    input_files = [r.path for r in records if r.path.exists()] + [
        Path(m) for m in cfg.sources + cfg.manifests if Path(m).is_file()
    ]
    digest = cfg.digest()
    with contextlib.suppress(StaleOutputError):  # an unreadable manifest is check_stage's to report
        had = None if cfg.force else read_manifest(out)
        if had is not None and had.config_digest == cfg.digest(split_as_given=True):
            digest = had.config_digest  # made by an earlier version with this very config: not stale for its hash
    wanted = StageManifest(
        stage=STAGE,
        schema_version=SHARD_SCHEMA_VERSION,
        config_digest=digest,
        inputs={"sources": fingerprint_paths(input_files)},
        semspai_version=__version__,
        config={
            k: v for k, v in asdict(cfg).items() if k not in ("force", "workers", "out")
        },  # what the output is made of
    )
    hint = {"sources": f"`semspai shard ... --out {out} --force` to rebuild it"}
    if not check_stage(out, wanted, hint, cfg.force):
        try:
            index = read_index(out)
            damage = damaged_tars(out, index)
        except ShardError as exc:  # index.json gone or corrupt
            index, damage = {}, [str(exc)]
        kept = [d["duplicate_of"] for d in index.get("duplicates", []) if d.get("conflicting_label")]
        if kept:  # by a semspai that kept one copy of bytes labelled both ways; this one keeps none
            raise StaleOutputError(
                f"{out} is stale: it holds {len(kept)} image(s) labelled both real and fake (e.g. {kept[0]}), which "
                f"an earlier semspai kept once and this one leaves out. Rerun `semspai shard ... --out {out} --force` "
                "(the tars holding them change: extract them into a new --store)"
            )
        listed = {str(e.get("name")) for e in index.get("shards", [])}
        unlisted = sorted(p.name for p in out.iterdir() if SHARD_FILE.match(p.name) and p.name not in listed)
        if index and unlisted:  # put there since: the next stages would refuse the folder, so this says it first
            raise SourceError(
                f"{out} holds {unlisted[0]}{f' and {len(unlisted) - 1} more' if len(unlisted) > 1 else ''}, named "
                f"like its shards but not among the tars its {INDEX_NAME} lists (not made by `semspai shard` into "
                "it); move it out, or pass --force to rebuild the folder without it"
            )
        if not damage:
            return ShardResult(out=out, up_to_date=True, seconds=time.perf_counter() - start)
        # the same inputs and config give the same tars: rebuilding repairs, and stores of them stay valid
        more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
        log.warning("%s: %s%s; rebuilding its shards (the same tars as before)", out, damage[0], more)
    if (out / "zarr.json").exists():  # not even with --force: a store's own files would be mixed with tars
        raise SourceError(f"--out {out} is a Zarr store (a feature store?), not a shard folder; pick another folder")
    stray = sorted(p.name for p in out.iterdir() if p.suffix == ".tar" and not SHARD_FILE.match(p.name)) if (
        out.is_dir()) else []  # fmt: skip
    if stray:  # not even with --force, which replaces only tars of its own names
        raise SourceError(
            f"{out} holds {stray[0]}{f' and {len(stray) - 1} more' if len(stray) > 1 else ''}, not a tar `semspai "
            "shard` makes; a shard folder holds its own tars only (the next stages refuse others), so move it out "
            "or pick another --out"
        )
    if not cfg.force and read_manifest(out) is None:
        # a rebuild replaces shard-named files and index.json: never ones this stage did not record making (a
        # run of its own that died while swapping outputs left PREVIOUS behind: those are its own)
        names = [p.name for p in out.iterdir()] if out.is_dir() else []
        foreign = sorted(n for n in names if SHARD_FILE.match(n) or n == INDEX_NAME)
        if foreign and PREVIOUS not in names:
            raise SourceError(
                f"{out} already holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''} "
                "that `semspai shard` did not record making; pick an empty folder, or pass --force to replace them"
            )

    unlabeled = [r for r in records if r.label is None]
    if unlabeled and not cfg.skip_unlabeled:
        raise SourceError(
            f"{unlabeled[0].path}: no label can be derived (no real/fake folder, no manifest label); "
            f"{len(unlabeled)} such file(s) — fix the layout or pass --skip-unlabeled"
        )
    records = [r for r in records if r.label is not None]

    with ThreadPoolExecutor(cfg.workers or os.cpu_count() or 1) as pool:
        probed = list(
            progress(
                pool.map(lambda r: _probe(r, cfg.max_pixels), records),
                total=len(records),
                desc="decode check",
                unit="img",
            )
        )
    skipped = [{"path": printable(p.record.path), "reason": p.error} for p in probed if p.error]
    missing = [s["path"] for s in skipped if s["reason"] == MISSING]
    n_too_large = sum(1 for s in skipped if s["reason"].startswith(TOO_LARGE))
    if missing:  # a typo in a manifest, or files moved: said, not only counted
        log.warning("%d file(s) the manifests name do not exist, e.g. %s; skipped", len(missing), missing[0])
    by_sha: dict[str, list[_Probed]] = {}
    for p in probed:
        if not p.error:
            by_sha.setdefault(p.sha256, []).append(p)
    duplicates, conflicting = [], []
    kept: list[_Probed] = []
    for copies in by_sha.values():
        if len({c.record.label for c in copies}) > 1:
            # the same bytes called real and fake: the data has a mistake, and either label would teach (or
            # score) a detector something false, so no copy is kept
            conflicting.append({"sha256": copies[0].sha256, "files": [
                {"path": printable(c.record.path), "label": LABEL_NAMES[c.record.label]} for c in copies]})  # fmt: skip
            continue
        kept.append(copies[0])
        duplicates += [{"path": printable(c.record.path), "duplicate_of": printable(copies[0].record.path)}
                       for c in copies[1:]]  # fmt: skip
    n_conflicting = sum(len(c["files"]) for c in conflicting)
    if conflicting:
        example = {f["label"]: f["path"] for f in reversed(conflicting[0]["files"])}  # the first of each label
        log.warning(
            "%d image(s) are labelled both real and fake (%d files of the same bytes), e.g. %s (real) and %s (fake); "
            "no copy of them is sharded (see index.json conflicting)", len(conflicting), n_conflicting,
            example["real"], example["fake"],
        )  # fmt: skip

    by_split: dict[str, list[tuple[str, _Probed]]] = {s: [] for s in SPLITS}
    for p in kept:
        r = p.record
        split = r.split or hash_split(r.group or r.origin, ratios)
        by_split[split].append((sample_key(r.origin), p))

    if not kept:
        # refused before the output is touched: a failed run keeps the shards a previous run made
        why = [f"{n} {what}" for n, what in ((len(skipped) - n_too_large - len(missing), "unreadable"),
                                             (n_too_large, "too large (see --max-pixels)"), (len(missing), "missing"),
                                             (len(unlabeled), "unlabeled"),
                                             (n_conflicting, "labelled both real and fake")) if n]  # fmt: skip
        raise SourceError(f"no image could be sharded ({', '.join(why)} skipped); {out} is left as it was")

    out.mkdir(parents=True, exist_ok=True)
    # tars are written into a staging folder and moved out only when all are complete: a crash or an error
    # while writing leaves the previous output as it was, and never a folder of plausible tars that a
    # shard-folder SPEC would pick up
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        shards, counts = _write_tars(staging, by_split, cfg.shard_size, cfg.prefix)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the previous output, if any, stays untouched
        raise

    # the manifest and index go first: a crash below must not leave them vouching for missing tars; the old
    # tars are set aside (the disk holds old and new output at once) and deleted only after the new manifest
    manifest_path(out).unlink(missing_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)  # an index only ever describes complete tars
    _set_old_shards_aside(out)
    for entry in shards:
        os.replace(staging / entry["name"], out / entry["name"])
    staging.rmdir()
    confounds = label_confounds(kept)
    for text in confounds:
        log.warning("%s: %s", out, text)
    index = {
        "schema_version": SHARD_SCHEMA_VERSION,
        "decoder": DECODER_ID,
        "split_ratios": list(ratios),
        "shards": shards,
        "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
        "n_samples": len(kept),
        "skipped": skipped,
        "duplicates": duplicates,
        "conflicting": conflicting,
        "unlabeled_skipped": [printable(r.path) for r in unlabeled],
        "confounds": confounds,
    }
    write_json_atomic(out / INDEX_NAME, index)
    write_manifest(out, wanted)
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)
    return ShardResult(
        out=out,
        up_to_date=False,
        n_written=len(kept),
        n_skipped=len(skipped),
        n_too_large=n_too_large,
        n_missing=len(missing),
        n_duplicates=len(duplicates),
        n_conflicting=n_conflicting,
        n_unlabeled_skipped=len(unlabeled),
        shards=[s["name"] for s in shards],
        counts=index["counts"],
        confounds=confounds,
        seconds=time.perf_counter() - start,
    )


def _write_tars(staging: Path, by_split: dict[str, list[tuple[str, _Probed]]], shard_size: int, prefix: str = ""):
    """Each split's samples, in key order, into tars of `shard_size` in `staging`; their index entries and counts."""
    shards, counts = [], {"split": Counter(), "label": Counter(), "generator": Counter(), "split_label": Counter(),
                          "small": Counter()}  # fmt: skip
    for split in SPLITS:
        items = sorted(by_split[split], key=lambda kp: kp[0])
        for n, lo in enumerate(range(0, len(items), shard_size)):
            name = f"{prefix + '-' if prefix else ''}{split}-{n:06d}.tar"
            writer = ShardWriter(staging / name)
            try:
                for key, p in items[lo : lo + shard_size]:
                    _write_sample(writer, key, p, split)
            except BaseException:
                writer.abort()
                raise
            sha256 = writer.close()
            shards.append({"name": name, "split": split, "count": writer.count, "sha256": sha256,
                           "bytes": (staging / name).stat().st_size})  # fmt: skip
        for _, p in items:
            counts["split"][split] += 1
            label = LABEL_NAMES[p.record.label]
            counts["label"][label] += 1
            counts["generator"][p.record.generator] += 1
            counts["split_label"][f"{split}/{label}"] += 1
            if min(p.width, p.height) < DEFAULT_RULE.size:  # padded to a patch: `small` counts them by kind
                counts["small"]["under_patch"] += 1
                counts["small"]["mostly_padding"] += mostly_padding(p.height, p.width)
    return shards, counts


def _write_sample(writer: ShardWriter, key: str, p: _Probed, split: str) -> None:
    r = p.record
    data = r.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != p.sha256:
        raise SourceError(f"{r.path} changed while sharding; rerun `semspai shard`")
    meta = {
        "label": r.label,
        "generator": r.generator,
        "caption": r.caption,
        "split": split,
        "group": r.group or r.origin,
        "width": p.width,
        "height": p.height,
        "path": r.origin,
        "sha256": p.sha256,
    }
    writer.write(key, data, r.path.suffix.lower().lstrip("."), meta)


@click.command("shard")
@click.argument("sources", nargs=-1, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for tars + index.json.")
@click.option(
    "--manifest",
    "manifests",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="CSV: path,label[,generator][,caption][,split][,group] or SPAI's image,class,split (repeatable).",
)
@click.option("--shard-size", default=1000, show_default=True, help="Samples per tar.")
@click.option(
    "--split",
    default="0.8,0.1,0.1",
    show_default=True,
    help="train,val,test ratios for samples whose manifest gives no split (by group hash).",
)
@click.option(
    "--max-pixels",
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    type=click.IntRange(min=1),
    help="Refuse images with more pixels (decompression-bomb guard).",
)
@click.option("--skip-unlabeled", is_flag=True, help="Skip and count files with no derivable label instead of failing.")
@click.option("--workers", default=0, type=click.IntRange(min=0), help="Decode threads (0 = one per core).")
@click.option("--force", is_flag=True, help="Rebuild even if the output is up to date or stale.")
@click.option(
    "--prefix",
    default="",
    help="Name the tars PREFIX-train-000000.tar, so a batch of images sharded later into its own folder can be "
    "extracted into the same feature store (letters, digits, underscores).",
)
@user_errors
def command(sources, out, manifests, shard_size, split, max_pixels, skip_unlabeled, workers, force, prefix) -> None:
    """Pack images (folders with real/fake label folders, or CSV manifests) into WebDataset tars.

    Original bytes are stored, never re-encoded; the same input gives byte-identical tars.
    """
    cfg = ShardConfig(
        sources=list(sources),
        out=out,
        manifests=list(manifests),
        shard_size=shard_size,
        split=split,
        max_pixels=max_pixels,
        skip_unlabeled=skip_unlabeled,
        force=force,
        workers=workers,
        prefix=prefix,
    )
    result = run(cfg)
    if result.up_to_date:
        click.echo(f"{out}: up to date (same inputs and config); nothing to do. Pass --force to rebuild.")
        return
    rate = result.n_written / max(result.seconds, 1e-9)
    click.echo(
        f"{result.n_written} images in {len(result.shards)} shards at {out} ({result.seconds:.1f} s, {rate:.0f} img/s)"
    )
    click.echo("splits: " + ", ".join(f"{k}={v}" for k, v in result.counts["split"].items()))
    click.echo("labels: " + ", ".join(f"{k}={v}" for k, v in result.counts["label"].items()))
    small = result.counts.get("small", {})  # an index of an older semspai has none
    if small.get("under_patch"):
        click.echo(f"small: {small['under_patch']} image(s) under {DEFAULT_RULE.size} px on a side, reflection-padded "
                   f"to a patch; {small.get('mostly_padding', 0)} of them mostly padding (their scores say little)")  # fmt: skip
    if result.n_skipped or result.n_duplicates or result.n_conflicting or result.n_unlabeled_skipped:
        click.echo(
            f"skipped {result.n_skipped - result.n_too_large - result.n_missing} unreadable, "
            + (f"{result.n_too_large} too large (--max-pixels), " if result.n_too_large else "")
            + (f"{result.n_missing} missing (named by a manifest), " if result.n_missing else "")
            + f"{result.n_duplicates} duplicate, "
            + (f"{result.n_conflicting} labelled both real and fake, " if result.n_conflicting else "")
            + f"{result.n_unlabeled_skipped} unlabeled file(s); see {Path(out) / INDEX_NAME}"
        )


__all__ = ["ShardConfig", "ShardResult", "run", "command"]
