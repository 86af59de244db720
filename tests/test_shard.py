"""`semspai shard` and the shard format: round trip, determinism, splits, bad input, crashes, reruns."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from semspai.stages.cli import cli
from semspai.stages.shard import ShardConfig, run
from semspai.store.images import decode_image
from semspai.store.manifest import MANIFEST_NAME, StaleOutputError, read_manifest
from semspai.store.shards import (
    INDEX_NAME,
    ShardError,
    ShardWriter,
    file_sha256,
    indexed_sha256,
    iter_shard,
    read_index,
    resolve_shards,
    shard_name,
    shard_sidecars,
    shard_split,
    tar_members,
)
from semspai.store.sources import SourceError, sample_key
from tests.conftest import TREE, encode, make_tree, random_photo, write_image
from tests.store_data import make_shards

CNN_RANKING = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cnndetection-ranking"


@pytest.fixture(scope="module")
def pristine_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("pristine") / "data")


@pytest.fixture
def image_tree(pristine_tree: Path, tmp_path: Path) -> Path:
    """conftest's tree, copied (mtimes kept) from one made per module: tests may change their copy."""
    return Path(shutil.copytree(pristine_tree, tmp_path / "data"))


def shard(sources: Path | list[Path], out: Path, **kw):
    srcs = [str(s) for s in (sources if isinstance(sources, list) else [sources])]
    kw.setdefault("workers", 2)
    return run(ShardConfig(sources=srcs, out=str(out), **kw))


def samples(out: Path) -> dict[str, tuple[str, object]]:
    """key -> (tar name, ShardSample) over every tar of `out`."""
    found = {}
    for tar in resolve_shards(out):
        for s in iter_shard(tar):
            assert s.key not in found, f"key {s.key} stored twice"
            found[s.key] = (tar.name, s)
    return found


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())}


def small_tree(root: Path, n: int, start: int = 0) -> Path:
    """`n` small images split over two generators and the reals, seeds from `start` (so trees can grow)."""
    for i in range(start, start + n):
        label, gen = (("real", "cam"), ("fake", "g1"), ("fake", "g2"))[i % 3]
        write_image(root / label / gen / f"{i:04d}.png", 24 + i % 5, 20 + i % 3, seed=1000 + i)
    return root


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_bytes_and_metadata(image_tree, tmp_path):
    out = tmp_path / "shards"
    result = shard(image_tree, out, shard_size=3)
    n_total = sum(c for _, _, c in TREE)
    assert not result.up_to_date and result.n_written == n_total
    assert result.n_skipped == result.n_duplicates == result.n_unlabeled_skipped == 0

    found = samples(out)
    assert len(found) == n_total
    seen_origins = set()
    for key, (tar_name, s) in found.items():
        meta = s.meta
        src = image_tree.parent / meta["path"]  # origins are "<source folder name>/<relative path>"
        seen_origins.add(meta["path"])
        data = src.read_bytes()
        assert s.image == data  # original bytes, never re-encoded
        assert s.ext == src.suffix.lower().lstrip(".")
        assert "." not in key and key == sample_key(meta["path"])
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        label_dir, gen = src.parent.parent.name, src.parent.name
        assert meta["label"] == s.label == {"real": 0, "fake": 1}[label_dir]
        assert meta["generator"] == gen
        assert meta["group"] == meta["path"] and meta["caption"] == ""
        h, w = decode_image(data).shape[:2]
        assert (meta["width"], meta["height"]) == (w, h)
        assert meta["split"] == shard_split(tar_name) in ("train", "val", "test")
        assert set(meta) == {"label", "generator", "caption", "split", "group", "width", "height", "path", "sha256"}
    assert seen_origins == {f"data/{p.relative_to(image_tree).as_posix()}" for p in image_tree.rglob("*.*")}

    index = read_index(out)
    assert index["n_samples"] == n_total
    assert index["counts"]["label"] == {"real": 8, "fake": 8}
    assert index["counts"]["generator"] == {"camera": 8, "gan_a": 4, "gan_b": 4}
    split_counts = Counter(s.meta["split"] for _, s in found.values())
    assert index["counts"]["split"] == dict(split_counts)
    assert sum(index["counts"]["split_label"].values()) == n_total
    assert index["skipped"] == index["duplicates"] == index["unlabeled_skipped"] == []
    assert [s["name"] for s in index["shards"]] == result.shards
    assert sorted(result.shards) == sorted(p.name for p in out.glob("*.tar"))
    for entry in index["shards"]:
        assert entry["sha256"] == file_sha256(out / entry["name"])
        assert entry["count"] == sum(1 for _ in iter_shard(out / entry["name"])) <= 3
        assert entry["split"] == shard_split(entry["name"])
    assert not list(out.glob("*.partial"))
    assert read_manifest(out).stage == "shard"


def test_tar_members_have_fixed_metadata_and_sorted_keys(image_tree, tmp_path):
    out = tmp_path / "s"
    shard(image_tree, out, shard_size=100)
    for tar_path in resolve_shards(out):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        assert all((m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644) for m in members)
        keys = [m.name.split(".")[0] for m in members]
        assert keys[::2] == keys[1::2] == sorted(keys[::2])  # image then sidecar, by key
        assert all(m.name.endswith(".json") for m in members[1::2])


def test_width_height_after_exif_orientation(tmp_path):
    rgb = random_photo(40, 24, seed=2)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    path = tmp_path / "src" / "real" / "cam" / "rotated.jpg"
    path.parent.mkdir(parents=True)
    path.write_bytes(buf.getvalue())
    shard(tmp_path / "src", tmp_path / "out", split="1,0,0")
    ((_, s),) = samples(tmp_path / "out").values()
    assert (s.meta["width"], s.meta["height"]) == (24, 40)
    assert s.image == buf.getvalue()


def test_formats_and_extensions(tmp_path):
    src = tmp_path / "src"
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
    for i, name in enumerate(["a.jpg", "b.JPEG", "c.png", "d.webp", "e.tif", "f.tiff", "g.bmp"]):
        path = src / "fake" / "gen" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(random_photo(30, 20, i), fmt.get(path.suffix.lower(), "BMP")))
    shard(src, tmp_path / "out")
    exts = sorted(s.ext for _, s in samples(tmp_path / "out").values())
    assert exts == ["bmp", "jpeg", "jpg", "png", "tif", "tiff", "webp"]


# --------------------------------------------------------------------------------------------- determinism


def test_byte_identical_tars_across_runs_and_force(image_tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shard(image_tree, a, shard_size=4, workers=1)
    shard(image_tree, b, shard_size=4, workers=3)  # the thread count must not change the bytes
    first = tar_bytes(a)
    assert first and first == tar_bytes(b)
    assert read_index(a) == read_index(b)
    assert not shard(image_tree, a, shard_size=4, force=True).up_to_date
    assert tar_bytes(a) == first


def test_split_stability_when_files_are_added(tmp_path):
    src = small_tree(tmp_path / "src", 45)
    shard(src, tmp_path / "before")
    before = {k: s.meta["split"] for k, (_, s) in samples(tmp_path / "before").items()}
    assert set(before.values()) == {"train", "val", "test"}
    small_tree(src, 30, start=45)
    shard(src, tmp_path / "after")
    after = {k: s.meta["split"] for k, (_, s) in samples(tmp_path / "after").items()}
    assert len(after) == 75
    assert {k: after[k] for k in before} == before


def test_split_ratios_not_summing_to_one_are_normalised_and_said(caplog):
    from semspai.store.sources import parse_split_ratios

    with caplog.at_level("WARNING", logger="semspai"):
        assert parse_split_ratios("8,1,1") == pytest.approx((0.8, 0.1, 0.1))
        assert parse_split_ratios("0.8,0.1,0.1") == pytest.approx((0.8, 0.1, 0.1))
    assert [r.getMessage() for r in caplog.records] == ["--split 8,1,1 sums to 10: taken as 0.8,0.1,0.1"]


def test_split_option_changes_ratios(tmp_path):
    src = small_tree(tmp_path / "src", 30)
    shard(src, tmp_path / "out", split="0,0,1")
    assert {s.meta["split"] for _, s in samples(tmp_path / "out").values()} == {"test"}
    assert [p.name for p in resolve_shards(tmp_path / "out")] == ["test-000000.tar"]


def test_groups_never_straddle_splits(tmp_path):
    src = tmp_path / "src"
    rows = ["path,label,generator,group"]
    for g in range(30):
        for j in range(3):  # a source photo and two fakes made from it share a group
            rel = f"img/{g:02d}_{j}.png"
            write_image(src / rel, 20, 20, seed=g * 10 + j)
            rows.append(f"{rel},{'real' if j == 0 else 'fake'},{'cam' if j == 0 else 'gen'},photo{g}")
    (src / "m.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    run(ShardConfig(sources=[], manifests=[str(src / "m.csv")], out=str(out), workers=2))
    by_group = defaultdict(set)
    for _, s in samples(out).values():
        by_group[s.meta["group"]].add(s.meta["split"])
    assert len(by_group) == 30
    assert all(len(splits) == 1 for splits in by_group.values())
    assert len(set.union(*by_group.values())) >= 2  # the hash does spread groups over splits


def test_manifest_split_and_caption_win(tmp_path):
    src = tmp_path / "src"
    rows = ["path,label,split,caption"]
    for i in range(6):
        write_image(src / f"{i}.png", 20, 20, seed=i)
        rows.append(f"{i}.png,{i % 2},{('train', 'val', 'test')[i % 3]},caption {i}")
    (src / "m.csv").write_text("\n".join(rows) + "\n")
    run(ShardConfig(sources=[str(src / "m.csv")], out=str(tmp_path / "out"), split="1,0,0"))
    got = {s.meta["path"]: (s.meta["split"], s.meta["caption"], s.label) for _, s in samples(tmp_path / "out").values()}
    assert got == {f"m/{i}.png": (("train", "val", "test")[i % 3], f"caption {i}", i % 2) for i in range(6)}
    # the CLI takes a manifest as --manifest alone, with no positional source, and gives the same tars
    res = CliRunner().invoke(
        cli, ["shard", "--manifest", str(src / "m.csv"), "--out", str(tmp_path / "cli"), "--split", "1,0,0"]
    )
    assert res.exit_code == 0, res.output
    assert tar_bytes(tmp_path / "cli") == tar_bytes(tmp_path / "out")
    res = CliRunner().invoke(cli, ["shard", "--out", str(tmp_path / "none")])
    assert res.exit_code != 0 and "nothing to shard" in res.output


def test_tiny_shards_fixture(tiny_shards):
    index = read_index(tiny_shards)
    assert index["n_samples"] == 16
    assert all(
        index["counts"]["split_label"].get(f"{sp}/{lb}", 0) > 0
        for sp in ("train", "val", "test")
        for lb in ("real", "fake")
    )
    assert all(s.meta["caption"].startswith("a photo number") for _, s in samples(tiny_shards).values())


# ---------------------------------------------------------------------------------------------- bad input


def test_unreadable_images_are_skipped_and_listed(image_tree, tmp_path):
    bad_dir = image_tree / "fake" / "gan_a"
    good = (bad_dir / "000.jpg").read_bytes()
    (bad_dir / "zero.png").write_bytes(b"")
    (bad_dir / "half.jpg").write_bytes(good[: len(good) // 2])
    png = encode(random_photo(64, 64, seed=9), "PNG")
    (bad_dir / "half.png").write_bytes(png[: len(png) // 2])
    (bad_dir / "junk.webp").write_bytes(b"not an image at all" * 10)
    out = tmp_path / "out"
    result = shard(image_tree, out)
    assert result.n_skipped == 4 and result.n_written == 16
    index = read_index(out)
    reasons = {Path(s["path"]).name: s["reason"] for s in index["skipped"]}
    assert set(reasons) == {"zero.png", "half.jpg", "half.png", "junk.webp"}
    assert "empty file" in reasons["zero.png"]
    assert "truncated" in reasons["half.png"]
    assert all("truncated" in r or "not a readable image" in r for n, r in reasons.items() if n != "zero.png")
    stored = {Path(s.meta["path"]).name for _, s in samples(out).values()}
    assert not stored & set(reasons)


def test_unlabeled_file_is_an_error_naming_it(image_tree, tmp_path):
    write_image(image_tree / "misc" / "stray.png", 20, 20, seed=1)
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=r"stray\.png.*--skip-unlabeled"):
        shard(image_tree, out)
    assert not out.exists() or not list(out.glob("*.tar"))
    result = shard(image_tree, out, skip_unlabeled=True)
    assert result.n_unlabeled_skipped == 1 and result.n_written == 16
    assert [Path(p).name for p in read_index(out)["unlabeled_skipped"]] == ["stray.png"]


def test_duplicates_kept_once_and_conflicting_labels_dropped(image_tree, tmp_path, caplog):
    # a same-label duplicate is kept once
    kept = image_tree / "real" / "camera" / "002.jpg"
    (image_tree / "real" / "camera" / "again.jpg").write_bytes(kept.read_bytes())
    # one file's bytes under both labels (twice under fake): no copy is sharded
    original = image_tree / "real" / "camera" / "000.jpg"
    for name in ("copy.jpg", "copy2.jpg"):
        (image_tree / "fake" / "gan_b" / name).write_bytes(original.read_bytes())
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="semspai"):
        result = shard(image_tree, out)
    assert result.n_duplicates == 1 and result.n_conflicting == 3 and result.n_written == 15
    index = read_index(out)
    assert [(Path(d["path"]).name, Path(d["duplicate_of"]).name) for d in index["duplicates"]] == [
        ("again.jpg", "002.jpg")
    ]
    (group,) = index["conflicting"]
    assert sorted((Path(f["path"]).name, f["label"]) for f in group["files"]) == [
        ("000.jpg", "real"), ("copy.jpg", "fake"), ("copy2.jpg", "fake")]  # fmt: skip
    (warning,) = [r.getMessage() for r in caplog.records if "both real and fake" in r.getMessage()]
    assert "1 image(s) are labelled both real and fake (3 files of the same bytes)" in warning and "000.jpg" in warning
    sharded = Counter(s.meta["sha256"] for _, s in samples(out).values())
    assert max(sharded.values()) == 1 and group["sha256"] not in sharded
    assert index["counts"]["label"] == {"fake": 8, "real": 7}


def test_an_earlier_output_that_kept_conflicting_labels_is_stale(image_tree, tmp_path):
    out = tmp_path / "out"
    shard(image_tree, out)
    index = read_index(out)  # as an earlier semspai wrote it: one copy kept, the other listed
    index["duplicates"] = [{"path": str(image_tree / "fake" / "gan_b" / "copy.jpg"), "duplicate_of":
                            str(image_tree / "real" / "camera" / "000.jpg"), "conflicting_label": True}]  # fmt: skip
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(StaleOutputError, match=r"holds 1 image\(s\) labelled both real and fake \(e.g. .*000.jpg\)"):
        shard(image_tree, out)
    assert not shard(image_tree, out, force=True).up_to_date


def test_shard_command_counts_conflicting_labels(image_tree, tmp_path):
    original = image_tree / "real" / "camera" / "000.jpg"
    (image_tree / "fake" / "gan_b" / "copy.jpg").write_bytes(original.read_bytes())
    res = CliRunner().invoke(cli, ["shard", str(image_tree), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "0 duplicate, 2 labelled both real and fake, 0 unlabeled" in res.output


def test_images_under_a_patch_are_counted_and_said(image_tree, tmp_path):
    for i in range(2):  # thumbnails, 60 x 40: 95% padding; the tree's 200 x 180 images are under a patch too
        write_image(image_tree / "fake" / "gan_a" / f"thumb{i}.png", 60, 40, seed=100 + i)
    res = CliRunner().invoke(cli, ["shard", str(image_tree), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (
        "small: 6 image(s) under 224 px on a side, reflection-padded to a patch; 2 of them mostly padding" in res.output
    )
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["counts"]["small"] == {"mostly_padding": 2, "under_patch": 6}
    for thumb in image_tree.rglob("thumb*"):
        thumb.unlink()
    res = CliRunner().invoke(cli, ["shard", str(image_tree), "--out", str(tmp_path / "photos"), "--split", "1,0,0"])
    assert "small: 4 image(s)" in res.output and "; 0 of them mostly padding" in res.output


def test_formats_or_sizes_that_tell_the_labels_apart_are_warned_of(tmp_path, caplog):
    def tree(name: str, real: tuple[str, int], fake: tuple[str, int], n: int = 10) -> Path:
        for label, (suffix, side) in (("real", real), ("fake", fake)):
            for i in range(n):
                write_image(
                    tmp_path / name / label / "g" / f"{i}.{suffix}", side, side, seed=i + 100 * (label == "fake")
                )
        return tmp_path / name

    cases = {
        "alike": (("jpg", 64), ("jpg", 64), []),
        "formats": (("jpg", 64), ("png", 64), ["file formats differ by label (real: JPEG 100%; fake: PNG 100%)"]),
        "sizes": (("png", 64), ("png", 96), ["image sizes differ by label (median real 0.00 MP, fake 0.01 MP, 2.2x)"]),
    }
    for name, (real, fake, want) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="semspai.stages.shard"):
            result = run(ShardConfig(sources=[str(tree(name, real, fake))], out=str(tmp_path / f"{name}-out")))
        assert [c.split(":")[0] for c in result.confounds] == [w.split(":")[0] for w in want], result.confounds
        assert all(c.startswith(w) for c, w in zip(result.confounds, want, strict=True)), result.confounds
        assert json.loads((tmp_path / f"{name}-out" / INDEX_NAME).read_text())["confounds"] == result.confounds
        assert [r.getMessage() for r in caplog.records if "differ by label" in r.getMessage()] == [
            f"{tmp_path / f'{name}-out'}: {c}" for c in result.confounds
        ]
    few = run(ShardConfig(sources=[str(tree("few", ("jpg", 64), ("png", 64), n=9))], out=str(tmp_path / "few-out")))
    assert few.confounds == []  # nine of each: too few to call a difference


def test_one_generator_whose_format_or_size_differs_from_the_reals_is_warned_of(tmp_path):
    root = tmp_path / "data"
    kinds = {"real/cam": ("jpg", 64), "fake/a": ("jpg", 64), "fake/b": ("jpg", 64), "fake/c": ("png", 64),
             "fake/d": ("jpg", 96), "fake/e": ("png", 96)}  # fmt: skip
    for seed, (folder, (suffix, side)) in enumerate(kinds.items()):
        for i in range(10 if folder != "fake/e" else 9):  # e: too few of its own to be called out
            write_image(root / folder / f"{i}.{suffix}", side, side, seed=100 * seed + i)
    result = run(ShardConfig(sources=[str(root)], out=str(tmp_path / "out")))
    # all fakes against the reals: PNG 19 of 49 and a median size alike, so nothing overall; c and d alone differ
    assert [c.split(" (")[0] for c in result.confounds] == [
        "file formats differ between the reals and the fakes of c",
        "image sizes differ between the reals and the fakes of d",
    ]
    assert "(real: JPEG 100%; c: PNG 100%)" in result.confounds[0]
    for folder in ("fake/a", "fake/b", "fake/d", "fake/e"):
        shutil.rmtree(root / folder)
    write_image(root / "fake" / "c2" / "0.png", 64, 64, seed=999)
    for i in range(10):
        write_image(root / "fake" / "f" / f"{i}.png", 64, 64, seed=900 + i)
    result = run(ShardConfig(sources=[str(root)], out=str(tmp_path / "out"), force=True))
    # every fake a PNG: said once, for all fakes, not again for each generator
    assert [c.split(" (")[0] for c in result.confounds] == ["file formats differ by label"]


def test_nothing_left_but_conflicting_labels_is_an_error(tmp_path):
    photo = tmp_path / "one.png"
    write_image(photo, 32, 32, seed=1)
    for label in ("real", "fake"):
        (tmp_path / "data" / label).mkdir(parents=True)
        shutil.copy(photo, tmp_path / "data" / label / "x.png")
    with pytest.raises(SourceError, match="2 labelled both real and fake skipped"):
        shard(tmp_path / "data", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_large_images_refused_naming_the_option(image_tree, tmp_path):
    write_image(image_tree / "fake" / "gan_a" / "huge.png", 500, 500, seed=3)
    out = tmp_path / "out"
    result = shard(image_tree, out, max_pixels=480 * 460)
    assert result.n_skipped == 1
    (skipped,) = read_index(out)["skipped"]
    assert Path(skipped["path"]).name == "huge.png"
    assert "too large" in skipped["reason"] and "--max-pixels" in skipped["reason"] and "500x500" in skipped["reason"]
    res = CliRunner().invoke(cli, ["shard", str(image_tree), "--out", str(tmp_path / "cli"), "--max-pixels", "220800"])
    assert res.exit_code == 0 and "skipped 0 unreadable, 1 too large (--max-pixels), 0 duplicate" in res.output
    res = CliRunner().invoke(cli, ["shard", str(image_tree), "--out", str(tmp_path / "zero"), "--max-pixels", "0"])
    assert res.exit_code == 2 and "--max-pixels" in res.output
    res = CliRunner().invoke(cli, ["shard", str(image_tree), "--out", str(tmp_path / "none"), "--max-pixels", "10"])
    assert (
        res.exit_code == 1
        and f"no image could be sharded ({result.n_written + 1} too large (see --max-pixels) skipped)" in res.output
    ), res.output


def test_missing_manifest_target_is_skipped(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.png", 20, 20, seed=0)
    (src / "m.csv").write_text("path,label\na.png,real\nmissing.png,fake\n")
    result = run(ShardConfig(sources=[str(src / "m.csv")], out=str(tmp_path / "out")))
    assert result.n_written == 1 and result.n_skipped == 1 and result.n_missing == 1
    assert read_index(tmp_path / "out")["skipped"][0]["reason"] == "missing: no such file"
    res = CliRunner().invoke(cli, ["shard", str(src / "m.csv"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0 and "skipped 0 unreadable, 1 missing (named by a manifest), 0 duplicate" in res.output


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"split": "1,1"}, "--split"),
        ({"shard_size": 0}, "--shard-size"),
    ],
)
def test_bad_options(image_tree, tmp_path, kw, match):
    with pytest.raises(SourceError, match=match):
        shard(image_tree, tmp_path / "out", **kw)


def test_bad_sources(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        shard(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        shard(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(SourceError, match="neither a folder nor a .csv"):
        shard(tmp_path / "x.txt", tmp_path / "out")
    src = small_tree(tmp_path / "src", 3)
    with pytest.raises(SourceError, match="listed twice"):
        shard([src, src], tmp_path / "out")
    other = small_tree(tmp_path / "b" / "src", 3)  # another folder of the same name
    with pytest.raises(SourceError, match=r"src/.* and .*b/src/.* would be one sample \(src/.*\): two sources are "
                       "named src; rename one"):  # fmt: skip
        shard([src, other], tmp_path / "out")


# ------------------------------------------------------------------------------------------------- crashes


class Boom(RuntimeError):
    pass


def crash_after(monkeypatch, n_ok: int) -> None:
    real_write = ShardWriter.write
    calls = {"n": 0}

    def write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise Boom("disk on fire")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", write)


def assert_no_complete_looking_output(out: Path) -> None:
    assert not (out / INDEX_NAME).exists()
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.glob("*.partial"))
    assert not list(out.glob("*.tar"))  # tars only leave the staging folder when all of them are complete


def test_crash_mid_run_leaves_no_complete_looking_output(image_tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after(monkeypatch, 6)
    with pytest.raises(Boom):
        shard(image_tree, out, shard_size=4)
    assert_no_complete_looking_output(out)
    monkeypatch.undo()
    result = shard(image_tree, out, shard_size=4)  # the rerun redoes the work
    assert not result.up_to_date and result.n_written == 16
    assert len(samples(out)) == 16


def test_failed_forced_rebuild_keeps_the_previous_output(image_tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shard(image_tree, out, shard_size=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    crash_after(monkeypatch, 2)
    with pytest.raises(Boom):
        shard(image_tree, out, shard_size=3, force=True)
    monkeypatch.undo()
    # the new tars were still in the staging folder: it is gone, and the old output is as it was, so a rerun of
    # the old command is rightly up to date
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert shard(image_tree, out, shard_size=4).up_to_date


@pytest.mark.parametrize("where", ["moving the new tars in", "between index and manifest"])
def test_crash_while_swapping_keeps_the_old_tars_and_a_plain_rerun_finishes(image_tree, tmp_path, monkeypatch, where):
    import semspai.stages.shard as shard_stage

    out = tmp_path / "out"
    shard(image_tree, out, shard_size=4)
    old = tar_bytes(out)
    if where == "moving the new tars in":
        real_replace, moved = os.replace, []

        def replace(src, dst):
            if Path(src).parent.name == shard_stage.STAGING and Path(dst).parent == out:  # a new tar moving in
                if moved:
                    raise Boom("power cut")
                moved.append(dst)
            return real_replace(src, dst)

        monkeypatch.setattr(shard_stage.os, "replace", replace)
    else:
        monkeypatch.setattr(shard_stage, "write_manifest", lambda *a: (_ for _ in ()).throw(Boom("power cut")))
    with pytest.raises(Boom):
        shard(image_tree, out, shard_size=3, force=True)
    monkeypatch.undo()
    aside = out / shard_stage.PREVIOUS
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == old  # the old output is still on disk
    assert not (out / MANIFEST_NAME).exists()
    if where == "moving the new tars in":  # a mix of old and new tars, no index: no shard folder to extract
        with pytest.raises(ShardError, match="a `semspai shard` run stopped while writing it"):
            resolve_shards(out)
    else:  # every new tar in place and indexed: extractable as it is
        assert [p.name for p in resolve_shards(out)] == sorted(e["name"] for e in read_index(out)["shards"])
    result = shard(image_tree, out, shard_size=3)  # no --force: what is there is this stage's own
    assert not result.up_to_date and len(samples(out)) == 16 and not aside.exists()


def test_run_that_shards_nothing_keeps_the_previous_output(image_tree, tmp_path):
    out = tmp_path / "out"
    shard(image_tree, out, shard_size=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    junk = tmp_path / "junk"
    (junk / "real" / "cam").mkdir(parents=True)
    (junk / "real" / "cam" / "a.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match=r"no image could be sharded \(1 unreadable skipped\).*left as it was"):
        shard(junk, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(StaleOutputError):  # the old output still says what it was made from
        shard(junk, out)


def test_tars_it_did_not_make_are_refused_without_force(image_tree, tmp_path):
    made = tmp_path / "made"
    shard(image_tree, made, shard_size=4)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train-000001.tar", "train-000002.tar"):
        shutil.copy(made / name, out / name)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SourceError, match=r"train-000001.tar and 1 more.*did not record making.*--force"):
        shard(small_tree(tmp_path / "other", 6), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = shard(small_tree(tmp_path / "other", 6), out, force=True)
    assert not result.up_to_date and len(samples(out)) == 6
    assert (out / "notes.txt").read_text() == "mine"  # only shard-named files and index.json are replaced
    # a tar of another name would stay beside the shards, where the next stages refuse it: not even --force
    (out / "mydata.tar").write_bytes(b"mine too")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "mydata.tar").write_bytes(b"mine too")
    before = {p: p.read_bytes() for p in [*out.iterdir(), *fresh.iterdir()]}
    for folder, force in ((fresh, False), (out, True)):
        with pytest.raises(SourceError, match=r"holds mydata.tar, not a tar `semspai shard` makes.*move it out"):
            shard(small_tree(tmp_path / "third", 5), folder, force=force)
    assert {p: p.read_bytes() for p in [*out.iterdir(), *fresh.iterdir()]} == before
    # a shard-named tar put into a folder that is up to date: said at once, not only by the next stage
    shutil.copy(made / "train-000001.tar", made / "train-000009.tar")
    with pytest.raises(SourceError, match=r"holds train-000009.tar, named like its shards but not among the tars its "
                       r"index.json lists .*move it out, or pass --force"):  # fmt: skip
        shard(image_tree, made, shard_size=4)
    (made / "train-000009.tar").unlink()
    assert shard(image_tree, made, shard_size=4).up_to_date


def test_a_later_batch_sharded_with_a_prefix_joins_the_same_store(tmp_path):
    """Images that arrive later are sharded apart with --prefix: the first batch's tars (and their extracted
    vectors) stay as they are, and one store takes both folders."""
    from semspai.stages.extract import ExtractConfig
    from semspai.stages.extract import run as extract
    from semspai.store.features import FeatureStore

    first = shard(small_tree(tmp_path / "a" / "data", 9), tmp_path / "s1", shard_size=2)
    later = shard(small_tree(tmp_path / "b" / "data", 9, start=9), tmp_path / "s2", shard_size=2, prefix="batch_2")
    assert all(n.startswith("batch_2-") for n in later.shards) and not set(first.shards) & set(later.shards)
    for out in (tmp_path / "s1", tmp_path / "s2"):
        for tar, sample in samples(out).values():
            assert shard_split(tar) == sample.meta["split"]
    store = tmp_path / "f.zarr"
    extract(ExtractConfig(shards=f"{tmp_path}/s1", store=str(store), clip="tiny-random", workers=0))
    first_fs = FeatureStore.open(str(store))
    before = dict(zip(first_fs.keys, first_fs.global_vectors().tolist(), strict=True))
    result = extract(ExtractConfig(shards=f"{tmp_path}/s{{1,2}}", store=str(store), clip="tiny-random", workers=0))
    assert sorted(result.shards_already_done) == sorted(Path(n).stem for n in first.shards)
    fs = FeatureStore.open(str(store))
    assert fs.n_images == 18 and sorted(fs.done_shards) == sorted(Path(n).stem for n in first.shards + later.shards)
    after = dict(zip(fs.keys, fs.global_vectors().tolist(), strict=True))
    assert {k: after[k] for k in before} == before  # the first batch's rows are as they were
    assert shard(tmp_path / "b" / "data", tmp_path / "s2", shard_size=2, prefix="batch_2").up_to_date
    with pytest.raises(StaleOutputError):  # another prefix renames every tar: a rebuild, not a no-op
        shard(tmp_path / "b" / "data", tmp_path / "s2", shard_size=2, prefix="batch_3")
    with pytest.raises(SourceError, match="--prefix 'batch-2': use letters, digits and underscores only"):
        shard(tmp_path / "b" / "data", tmp_path / "s3", prefix="batch-2")


def test_the_same_images_sharded_twice_are_refused_before_extraction_writes(tmp_path):
    """A second sharding of one folder (here under a prefix) holds the same keys: extract-clip refuses it before
    writing anything, since a key stored twice would make training and eval refuse the store."""
    from semspai.stages.extract import ExtractConfig
    from semspai.stages.extract import run as extract
    from semspai.store.features import FeatureStore

    data = small_tree(tmp_path / "a" / "data", 6)
    shard(data, tmp_path / "s1", shard_size=2)
    again = shard(data, tmp_path / "s2", shard_size=2, prefix="again")
    store = tmp_path / "f.zarr"
    with pytest.raises(
        ShardError, match=r"shard again-\w+-\d+: sample \S+ is already in shard \w+-\d+; .*sharded twice"
    ):
        extract(ExtractConfig(shards=f"{tmp_path}/s{{1,2}}", store=str(store), clip="tiny-random", workers=0))
    assert not store.exists()  # refused before the store was made
    extract(ExtractConfig(shards=f"{tmp_path}/s1", store=str(store), clip="tiny-random", workers=0))
    before = FeatureStore.open(str(store))
    with pytest.raises(ShardError, match=rf"is already in feature store {store} \(shard \w+-\d+\)"):
        extract(ExtractConfig(shards=f"{tmp_path}/s{{1,2}}", store=str(store), clip="tiny-random", workers=0))
    after = FeatureStore.open(str(store))
    assert after.done_shards == before.done_shards and after.keys == before.keys
    assert after.unfinished_shards == [] and not set(after.recorded_shards) & {Path(n).stem for n in again.shards}


def test_a_resharded_grown_folder_is_refused_as_changed_not_as_sharded_twice(tmp_path):
    """Resharding a grown folder renumbers its tars: the store names the changed tar (and --prefix in the
    README is the way), rather than calling the moved samples duplicates."""
    from semspai.stages.extract import ExtractConfig
    from semspai.stages.extract import run as extract
    from semspai.store.features import FeatureStoreError

    data = small_tree(tmp_path / "data", 12)
    shard(data, tmp_path / "s", shard_size=2)
    store = tmp_path / "f.zarr"
    extract(ExtractConfig(shards=str(tmp_path / "s"), store=str(store), clip="tiny-random", workers=0))
    shard(small_tree(data, 6, start=12), tmp_path / "s", shard_size=2, force=True)
    with pytest.raises(FeatureStoreError, match=r"shard \w+-\d+ \(.*\) changed since it was extracted"):
        extract(ExtractConfig(shards=str(tmp_path / "s"), store=str(store), clip="tiny-random", workers=0))


def test_a_second_run_into_a_folder_being_written_is_refused(image_tree, tmp_path):
    """Two runs into one --out would clear each other's staging folder: the second fails at once."""
    from semspai.store.locks import run_lock

    out = tmp_path / "out"
    with run_lock(tmp_path / "out.lock", RuntimeError):  # as a run in another process holds it
        with pytest.raises(SourceError, match=r"being written by another `semspai shard` \(pid \d+ on "):
            shard(image_tree, out)
    assert not out.exists() and not (tmp_path / "out.lock").exists()
    assert len(samples(shard(image_tree, out).out)) == 16 and not (tmp_path / "out.lock").exists()


def test_keys_and_splits_do_not_depend_on_how_the_folder_is_spelled(image_tree, tmp_path, monkeypatch):
    shard(image_tree, tmp_path / "named")
    monkeypatch.chdir(image_tree)
    shard(Path("."), tmp_path / "dot")
    monkeypatch.chdir(image_tree / "real")
    shard(Path(".."), tmp_path / "dotdot")
    assert shard(Path(".."), tmp_path / "named").up_to_date  # a rerun from elsewhere: the same files, not changed
    named = {k: (t, s.meta["path"]) for k, (t, s) in samples(tmp_path / "named").items()}
    assert named and all(path.startswith(f"{image_tree.name}/") for _, path in named.values())
    for spelled in ("dot", "dotdot"):
        assert {k: (t, s.meta["path"]) for k, (t, s) in samples(tmp_path / spelled).items()} == named
    assert tar_bytes(tmp_path / "dot") == tar_bytes(tmp_path / "named")


def test_shard_writer_abort_and_dotted_keys(tmp_path):
    w = ShardWriter(tmp_path / "train-000000.tar")
    with pytest.raises(ValueError, match="dot"):
        w.write("a.b", b"x", "png", {})
    w.write("ab", b"x", "png", {"label": 1})
    assert (tmp_path / "train-000000.tar.partial").exists() and not (tmp_path / "train-000000.tar").exists()
    w.abort()
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------- rerun and stale


def test_second_run_is_up_to_date_and_touches_nothing(image_tree, tmp_path):
    out = tmp_path / "out"
    shard(image_tree, out)
    before = mtimes(out)
    result = shard(image_tree, out, workers=1)  # decode threads do not change the output
    assert result.up_to_date and result.n_written == 0
    assert mtimes(out) == before


def test_split_spelled_otherwise_is_the_same_config(image_tree, tmp_path):
    """The digest holds the ratios: `0,0,1.0` and `0,0,5` shard as `0,0,1` does, so a rerun is up to date."""
    out = tmp_path / "out"
    shard(image_tree, out, split="0,0,1")
    for spelling in ("0,0,1.0", "0,0,5", "0.0,0,1"):
        assert shard(image_tree, out, split=spelling).up_to_date
    with pytest.raises(StaleOutputError, match="split"):
        shard(image_tree, out, split="0,1,1")
    moved = Path(shutil.copytree(out, tmp_path / "moved"))  # where the output is is no part of its config
    assert shard(image_tree, moved, split="0,0,1").up_to_date
    with pytest.raises(StaleOutputError, match=r"another configuration \(shard_size differ\)"):
        shard(image_tree, moved, split="0,0,1", shard_size=3)
    # an output of an earlier version: its digest held the --split text as given, its config --force and --workers
    path = out / MANIFEST_NAME
    old = json.loads(path.read_text())
    old["config_digest"] = ShardConfig(sources=[], out="", split="0,0,1").digest(split_as_given=True)
    old["config"] |= {"force": False, "workers": 2}
    path.write_text(json.dumps(old))
    assert shard(image_tree, out, split="0,0,1").up_to_date
    with pytest.raises(StaleOutputError, match=r"another configuration \(shard_size differ\)"):
        shard(image_tree, out, split="0,0,1", shard_size=3)


def test_changed_config_is_stale_until_forced(image_tree, tmp_path):
    out = tmp_path / "out"
    shard(image_tree, out, shard_size=4)
    before = tar_bytes(out)
    for kw in ({"shard_size": 5}, {"split": "0.5,0.25,0.25"}, {"max_pixels": 10**6}, {"skip_unlabeled": True}):
        with pytest.raises(StaleOutputError, match="another configuration") as info:
            shard(image_tree, out, **kw)
        assert "--force" in str(info.value)
        assert tar_bytes(out) == before  # a refusal changes nothing
    result = shard(image_tree, out, shard_size=5, force=True)
    assert not result.up_to_date
    assert all(s["count"] <= 5 for s in read_index(out)["shards"])
    assert shard(image_tree, out, shard_size=5).up_to_date


@pytest.mark.parametrize("content", ["{not json", '{"stage": "shard"}'])
def test_corrupt_stage_manifest_or_index_is_a_clear_error(image_tree, tmp_path, content):
    out = tmp_path / "out"
    shard(image_tree, out)
    before = tar_bytes(out)
    (out / MANIFEST_NAME).write_text(content)
    res = CliRunner().invoke(cli, ["shard", str(image_tree), "--out", str(out)])
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    assert "unreadable" in res.output and "--force" in res.output
    assert tar_bytes(out) == before  # the refusal changed nothing
    assert shard(image_tree, out, force=True).n_written == 16
    for damaged in (content[:5], "[]"):  # cut short; valid JSON of another shape
        (out / INDEX_NAME).write_text(damaged)
        with pytest.raises(ShardError, match="corrupt.*--force"):
            read_index(out)
    res = CliRunner().invoke(cli, ["extract-clip", "--shards", str(out), "--store", str(tmp_path / "s.zarr"),
                                   "--clip", "tiny-random", "--workers", "0"])  # fmt: skip
    assert res.exit_code != 0 and "Traceback" not in res.output and "index.json is corrupt (a JSON list" in res.output


def test_touched_or_added_source_is_stale_naming_what_to_rerun(image_tree, tmp_path):
    out = tmp_path / "out"
    shard(image_tree, out)
    victim = image_tree / "real" / "camera" / "000.jpg"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleOutputError) as info:
        shard(image_tree, out)
    msg = str(info.value)
    assert "sources" in msg and f"semspai shard ... --out {out} --force" in msg
    assert shard(image_tree, out, force=True).n_written == 16

    write_image(image_tree / "fake" / "gan_b" / "new.png", 30, 30, seed=77)
    with pytest.raises(StaleOutputError, match="--force"):
        shard(image_tree, out)
    assert shard(image_tree, out, force=True).n_written == 17
    assert shard(image_tree, out).up_to_date


def test_edited_manifest_is_stale(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.png", 20, 20, seed=0)
    csv = src / "m.csv"
    csv.write_text("path,label\na.png,real\n")
    run(ShardConfig(sources=[str(csv)], out=str(tmp_path / "out")))
    csv.write_text("path,label\na.png,fake\n")
    with pytest.raises(StaleOutputError):
        run(ShardConfig(sources=[str(csv)], out=str(tmp_path / "out")))


def test_output_of_another_stage_is_refused(image_tree, tmp_path):
    from semspai.store.manifest import StageManifest, write_manifest

    out = tmp_path / "out"
    write_manifest(out, StageManifest(stage="extract-clip", schema_version=1, config_digest="x", inputs={}))
    with pytest.raises(StaleOutputError, match="extract-clip"):
        shard(image_tree, out)


# ------------------------------------------------------------------------------------------ reading shards


def test_iter_shard_rejects_truncated_and_missing_tars(tiny_shards, tmp_path):
    tar = resolve_shards(tiny_shards)[0]
    data = tar.read_bytes()
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"train-000000\.tar.*rerun `semspai shard`"):
        list(iter_shard(cut))
    with pytest.raises(ShardError, match="does not exist"):
        list(iter_shard(tmp_path / "missing.tar"))


def _tar_with_every_kind(path: Path, fmt: int) -> dict[str, bytes]:
    """A tar in `fmt` with the members a reader meets: long and prefixed names, a directory, a link, an empty
    file, a size on a block boundary, non-ASCII names; returns name -> bytes of its regular files."""
    files = {
        "a.jpg": os.urandom(1000),
        "d" * 30 + "/" + "x" * 90 + ".jpg": os.urandom(700),  # > 100 chars: ustar prefix, GNU longname, pax path
        "empty.json": b"",
        "block.png": os.urandom(1024),
        "caf\u00e9.json": b'{"label": 0}',
        "y" * 150 + ".jpg": os.urandom(10),  # no '/' to split on: only GNU and pax can store it
    }
    if fmt == tarfile.USTAR_FORMAT:
        del files["y" * 150 + ".jpg"]
    with tarfile.open(path, "w", format=fmt) as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return files


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_lean_tar_reader_reads_what_tarfile_reads(tmp_path, fmt):
    path = tmp_path / "t.tar"
    files = _tar_with_every_kind(path, fmt)
    with open(path, "rb") as fh:
        got = list(tar_members(fh))
    assert [(n, bytes(d)) for n, d in got] == list(files.items())
    with open(path, "rb") as fh:  # unwanted members are skipped unread
        assert [(n, d) for n, d in tar_members(fh, want=lambda n: n.endswith(".json"))] == [
            (n, bytearray(d) if n.endswith(".json") else None) for n, d in files.items()
        ]


def test_lean_tar_reader_accepts_signed_checksums_and_rejects_damage(tiny_shards, tmp_path):
    path = tmp_path / "signed.tar"
    _tar_with_every_kind(path, tarfile.USTAR_FORMAT)
    data = bytearray(path.read_bytes())
    at = data.index("café".encode())  # a header whose name has bytes > 127: store its old-style signed sum
    header = data[at : at + 512]
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32
    data[at + 148 : at + 156] = b"%06o\0 " % signed
    path.write_bytes(data)
    with open(path, "rb") as fh:
        assert "café.json" in [n for n, _ in tar_members(fh)]

    tar = resolve_shards(tiny_shards)[0]
    good = tar.read_bytes()
    second = 512 + -(-len(list(iter_shard(tar))[0].image) // 512) * 512  # the header after the first image
    cases = {
        "checksum": good[:second] + bytes([good[second] ^ 1]) + good[second + 1 :],
        "header cut": good[: second + 100],
        "no end": good[:second],  # cut exactly between members: only the missing end block tells
        "member cut": good[: second + 512 + 10],
        "garbage header": good[:second] + os.urandom(512) + good[second + 512 :],
    }
    for what, blob in cases.items():
        cut = tmp_path / f"{what.replace(' ', '-')}.tar"
        cut.write_bytes(blob)
        with pytest.raises(ShardError, match=r"truncated or corrupt tar.*rerun `semspai shard`"):
            list(iter_shard(cut))
        with pytest.raises(ShardError, match="truncated or corrupt tar"):
            shard_sidecars(cut)


def test_iter_shard_rejects_a_sample_without_sidecar(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("abc.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))
    with pytest.raises(ShardError, match="no .json sidecar"):
        list(iter_shard(path))


def test_resolve_shards_spec_forms(tiny_shards, tmp_path):
    tars = resolve_shards(tiny_shards)
    assert tars == sorted(tiny_shards.glob("*.tar")) and len(tars) >= 3
    train = sorted(p for p in tars if p.name.startswith("train-"))
    assert resolve_shards(f"{tiny_shards}/train-{{000000..{len(train) - 1:06d}}}.tar") == train
    assert resolve_shards(f"{tiny_shards}/train-*.tar") == train
    assert resolve_shards(train[0]) == [train[0]]
    assert shard_name(train[0]) == "train-000000" and shard_split(train[0]) == "train"
    with pytest.raises(ShardError, match="do not exist"):
        resolve_shards(f"{tiny_shards}/train-{{000000..000099}}.tar")
    with pytest.raises(ShardError, match=r"Unbalanced braces.*a brace pattern reads like"):
        resolve_shards(f"{tiny_shards}/train-{{000000..000001.tar")
    with pytest.raises(ShardError, match="no shard matches"):
        resolve_shards(f"{tiny_shards}/nothing-*.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="holds no .tar"):
        resolve_shards(tmp_path / "empty")
    with pytest.raises(ShardError, match="neither"):
        resolve_shards(tmp_path / "nope")
    with pytest.raises(ShardError, match="index.json is not a .tar file"):
        resolve_shards(tiny_shards / "index.json")
    with pytest.raises(ShardError, match="index.json is missing"):
        read_index(tmp_path / "empty")


def test_spec_naming_folders_takes_their_tars_and_a_folder_missing_an_indexed_tar_is_refused(tiny_shards, tmp_path):
    a, b = (Path(shutil.copytree(tiny_shards, tmp_path / n)) for n in ("shA", "shB"))
    both = sorted([*a.glob("*.tar"), *b.glob("*.tar")])
    assert resolve_shards(f"{tmp_path}/sh{{A,B}}") == both  # a brace pattern or glob may name shard folders
    assert resolve_shards(f"{tmp_path}/sh?") == both
    gone = sorted(b.glob("*.tar"))[1]
    gone.unlink()
    for spec in (b, f"{tmp_path}/sh{{A,B}}"):
        with pytest.raises(
            ShardError,
            match=rf"1 tar\(s\) that index.json lists are missing or cut short, e.g. "
            rf"{gone.name} is missing; .*rerun the `semspai shard`",
        ):
            resolve_shards(spec)
    assert resolve_shards(f"{b}/train-*.tar")  # naming tars, not the folder, picks a subset on purpose
    shutil.copy(sorted(a.glob("*.tar"))[0], a / "extra.tar")  # a tar its index does not list, copied in
    with pytest.raises(ShardError, match="extra.tar not among the tars its index.json lists"):
        resolve_shards(a)
    assert resolve_shards(f"{a}/train-*.tar")  # named on purpose
    assert indexed_sha256(sorted(a.glob("*.tar"))) == {str(a / e["name"]): e["sha256"] for e in read_index(a)["shards"]}
    assert indexed_sha256(make_shards(tmp_path / "no-index", 1, 1, corrupt=False)) == {}


# -------------------------------------------------------------------------------------------- shared data


@pytest.mark.skipif(not CNN_RANKING.is_dir(), reason=f"{CNN_RANKING} is absent (shared data, not in the repo)")
def test_cnndetection_ranking_gives_400_images_40_per_generator(tmp_path):
    out = tmp_path / "out"
    result = shard(CNN_RANKING, out)
    assert result.n_written == 400 and result.n_skipped == result.n_duplicates == 0
    index = read_index(out)
    assert index["counts"]["label"] == {"real": 200, "fake": 200}
    assert len(index["counts"]["generator"]) == 10
    assert set(index["counts"]["generator"].values()) == {40}
    sizes = {(s.meta["width"], s.meta["height"]) for _, s in samples(out).values()}
    assert sizes == {(224, 224)}
    assert sum(index["counts"]["split"].values()) == 400


def test_a_rerun_over_damaged_or_missing_tars_rebuilds_them(image_tree, tmp_path, caplog):
    """Up to date by inputs and config, but a tar is gone or cut short: the rerun rebuilds the same tars."""
    out = tmp_path / "out"
    shard(image_tree, out, shard_size=4)
    before = tar_bytes(out)
    first, second = sorted(before)[:2]
    (out / first).unlink()
    with open(out / second, "r+b") as f:
        f.truncate(5000)
    with caplog.at_level(logging.WARNING, logger="semspai.stages.shard"):
        result = shard(image_tree, out, shard_size=4)
    assert not result.up_to_date and tar_bytes(out) == before
    (said,) = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert f"{first} is missing" in said or f"{second} has 5000 bytes, index.json recorded" in said
    assert "(and 1 more); rebuilding its shards" in said
    assert shard(image_tree, out, shard_size=4).up_to_date
    index = read_index(out)
    assert all(e["bytes"] == (out / e["name"]).stat().st_size for e in index["shards"])


def test_a_feature_store_is_never_a_shard_folder(image_tree, tmp_path):
    store = tmp_path / "features.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    for force in (False, True):
        with pytest.raises(SourceError, match="is a Zarr store"):
            shard(image_tree, store, force=force)
    assert sorted(p.name for p in store.iterdir()) == ["zarr.json"]


def test_names_and_manifests_in_other_encodings(tmp_path):
    """A file name that is not UTF-8 is still a sample (its bytes shown as \\xNN); a UTF-16 manifest is read; a
    manifest in another encoding is a one-line error naming its line."""
    root = tmp_path / "ds"
    write_image(root / "real" / "g" / "ok.png", 64, 64, 0)
    odd = os.fsdecode(b"bad\xff\xfename.png")  # e.g. Latin-1 bytes from an old archive
    write_image(root / "real" / "g" / odd, 64, 64, 1)
    res = CliRunner().invoke(cli, ["shard", str(root), "--out", str(tmp_path / "o1"), "--split", "1,0,0"])
    assert res.exit_code == 0, res.output
    origins = sorted(s.meta["path"] for _, s in samples(tmp_path / "o1").values())
    assert origins == ["ds/real/g/bad\\xff\\xfename.png", "ds/real/g/ok.png"]
    res = CliRunner().invoke(cli, ["shard", str(root), "--out", str(tmp_path / "o1"), "--split", "1,0,0"])
    assert res.exit_code == 0 and "up to date" in res.output, res.output
    write_image(tmp_path / "m" / "café.png", 64, 64, 2)
    (tmp_path / "m" / "utf16.csv").write_bytes("path,label\ncafé.png,real\n".encode("utf-16"))
    shard([], tmp_path / "o2", manifests=[str(tmp_path / "m" / "utf16.csv")])
    assert [s.meta["path"] for _, s in samples(tmp_path / "o2").values()] == ["utf16/café.png"]
    (tmp_path / "m" / "latin1.csv").write_bytes("path,label\ncafé.png,real\n".encode("latin-1"))
    res = CliRunner().invoke(cli, ["shard", "--manifest", str(tmp_path / "m" / "latin1.csv"), "--out",
                                   str(tmp_path / "o3")])  # fmt: skip
    assert res.exit_code == 1 and "latin1.csv:2: not UTF-8 text (byte 0xe9); save the manifest as UTF-8" in res.output
    assert "Traceback" not in res.output
