"""The feature store: layout, reader view, identity checks, done markers, verify, info and HDF5 export."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from store_data import CORRUPT_KEY, make_shards
from zarr.storage import LocalStore

from semspai.pipeline.grid import DEFAULT_RULE, grid_boxes
from semspai.stages.cli import cli
from semspai.store import writer as writer_module
from semspai.store.features import (
    DONE_KEYS,
    ROOT_KEYS,
    FeatureStore,
    FeatureStoreError,
    FeatureStoreWriter,
    ShardFeatures,
    StoreHeader,
    check_new_store_path,
    damaged_arrays,
    done_shard_attrs,
    drop_shards,
    verify_store,
)
from semspai.store.shards import file_sha256, iter_shard, shard_name
from semspai.store.writer import (
    RemoteTraceback,
    WriterDidNotStart,
    WriterNotReached,
    WriterProcess,
    WriterProcessError,
)

D = 8


def header(**over) -> StoreHeader:
    base = dict(
        clip={
            "arg": "tiny-random",
            "kind": "tiny-random",
            "model": "tiny-random",
            "weights_id": "seed:0",
            "sha256": "ab" * 32,
            "quick_gelu": False,
            "image_size": 224,
            "meaningless": True,
        },
        clip_identity={"model": "tiny-random", "sha256": "ab" * 32, "quick_gelu": False},
        has_text=True,
        embed_dim=D,
        decoder={"cpu": "pil-exif-rgb8-v2", "gpu": None},
        patch_rule={"id": DEFAULT_RULE.id, **DEFAULT_RULE.to_dict()},
        prompts=["a photo of a cat.", "a photo of a dog."],
    )
    return StoreHeader(**{**base, **over})


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, D))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)


def features_for(path: Path, has_text: bool = True) -> ShardFeatures:
    """Rows for every sample of a tar (random unit vectors, boxes by the real patch rule)."""
    samples = list(iter_shard(path))
    rng = np.random.default_rng(len(samples))
    good = [s for s in samples if "width" in s.meta]
    boxes = [grid_boxes(s.meta["height"], s.meta["width"]) for s in good]
    counts = np.array([len(b) for b in boxes])
    n = len(good)
    captions = np.array([bool(s.meta.get("caption")) for s in good])
    return ShardFeatures(
        name=shard_name(path),
        sha256=file_sha256(path),
        n_samples=len(samples),
        keys=[s.key for s in good],
        label=np.array([s.meta["label"] for s in good], np.int8),
        generator=[s.meta["generator"] for s in good],
        split=[s.meta["split"] for s in good],
        width=np.array([s.meta["width"] for s in good], np.int32),
        height=np.array([s.meta["height"] for s in good], np.int32),
        global_=unit(rng, n),
        local=unit(rng, int(counts.sum())),
        local_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=np.concatenate(boxes).astype(np.int32),
        caption=np.where(captions[:, None], unit(rng, n), 0).astype(np.float16) if has_text else None,
        caption_mask=captions if has_text else None,
        skipped=[{"key": s.key, "reason": "not a readable image"} for s in samples if "width" not in s.meta],
    )


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    return make_shards(tmp_path / "shards")


def write(store: str, paths: list[Path], done: bool = True, **over) -> tuple[FeatureStoreWriter, list[ShardFeatures]]:
    h = header(**over)
    text = unit(np.random.default_rng(0), len(h.prompts)) if h.has_text else None
    writer = FeatureStoreWriter.create_or_check(store, h, text)
    writer.record_shards({shard_name(p): str(p) for p in paths})
    feats = [features_for(p, h.has_text) for p in paths]
    for f in feats:
        writer.write_rows(f)
        if done:
            writer.mark_done(f)
    return writer, feats


def test_reader_sees_done_shards_in_name_order(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    writer, feats = write(store, shards[::-1], done=False)  # written in reverse order
    for f in feats[:2]:  # train-000002 and train-000001 done; train-000000 left unfinished
        writer.mark_done(f)
    fs = FeatureStore.open(store)
    assert fs.done_shards == ["train-000001", "train-000002"]
    assert fs.unfinished_shards == ["train-000000"]
    by_name = {f.name: f for f in feats}
    want = [by_name["train-000001"], by_name["train-000002"]]
    assert fs.keys == want[0].keys + want[1].keys
    assert fs.n_images == len(fs.keys)
    assert np.array_equal(fs.global_vectors(), np.concatenate([f.global_ for f in want]))
    assert fs.global_vectors().dtype == np.float16
    i = fs.index_of(want[1].keys[2])
    f, j = want[1], 2
    assert np.array_equal(fs.local_vectors(i), f.local[f.local_offsets[j] : f.local_offsets[j + 1]])
    assert np.array_equal(fs.boxes(i), grid_boxes(int(f.height[j]), int(f.width[j])))
    assert fs.meta["label"].dtype == np.int8 and fs.meta["width"].dtype == np.int32
    assert fs.meta["shard"].tolist() == ["train-000001"] * len(want[0].keys) + ["train-000002"] * len(want[1].keys)
    assert fs.meta["generator"].tolist() == want[0].generator + want[1].generator
    assert fs.skipped == [{"shard": "train-000001", "key": CORRUPT_KEY, "reason": "not a readable image"}]
    for k in range(fs.n_images):
        cap = fs.caption_vector(k)
        s, j = (0, k) if k < len(want[0].keys) else (1, k - len(want[0].keys))
        if want[s].caption_mask[j]:
            assert np.array_equal(cap, want[s].caption[j])
        else:
            assert cap is None
    assert fs.prompts() == header().prompts and fs.prompt_vectors().shape == (2, D)
    with pytest.raises(FeatureStoreError, match="sample nope is not in feature store"):
        fs.index_of("nope")


def test_file_url_reads_the_same(tmp_path: Path, shards: list[Path]) -> None:
    store = tmp_path / "f.zarr"
    write(str(store), shards)
    a, b = FeatureStore.open(str(store)), FeatureStore.open(store.as_uri())
    assert a.keys == b.keys
    assert np.array_equal(a.global_vectors(), b.global_vectors())
    assert np.array_equal(a.local_vectors(3), b.local_vectors(3))


@pytest.mark.parametrize(
    ("over", "side"),
    [
        ({"clip_identity": {"model": "ViT-B-32", "sha256": "cd" * 32, "quick_gelu": False}}, "clip.model"),
        ({"decoder": {"cpu": "pil-exif-rgb8-v2", "gpu": "torchvision-nvjpeg"}}, "decoder.gpu"),
        ({"patch_rule": {"id": "grid256-stride256"}}, "patch_rule"),
        ({"prompts": ["a photo of a bird."]}, "prompts_sha256"),
    ],
)
def test_another_setup_is_refused_naming_both_sides(tmp_path: Path, shards: list[Path], over: dict, side: str) -> None:
    store = str(tmp_path / "f.zarr")
    write(store, shards[:1])
    with pytest.raises(FeatureStoreError, match=f"{side}: store has .*, asked for ") as info:
        FeatureStoreWriter.create_or_check(store, header(**over), None)
    assert "\n" not in str(info.value)
    # an option can ask for another CLIP, GPU decoder or prompt bank, not for another CPU decoder or patch rule
    assert str(info.value).endswith("or ask for the store's own setup") == (side != "patch_rule")


def test_reader_checks_the_expected_clip_and_rule(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    write(store, shards[:1])
    FeatureStore.open(store, expect_clip=header().clip_identity, expect_patch_rule=DEFAULT_RULE.id)
    other = {**header().clip_identity, "sha256": "ef" * 32}
    with pytest.raises(FeatureStoreError, match=r"clip\.sha256: store has 'abab.*', asked for 'efef"):
        FeatureStore.open(store, expect_clip=other)
    with pytest.raises(FeatureStoreError, match="patch_rule: store has"):
        FeatureStore.open(store, expect_patch_rule="grid112")


def test_a_store_is_made_only_in_a_new_or_empty_folder(tmp_path: Path, shards: list[Path]) -> None:
    with pytest.raises(FeatureStoreError, match="is a folder of something else, not a feature store"):
        write(str(shards[0].parent), shards[:1])  # the shard folder given as --store by a slip
    assert sorted(p.name for p in shards[0].parent.iterdir() if p.name.startswith("zarr")) == []
    (tmp_path / "file.zarr").write_text("")
    with pytest.raises(FeatureStoreError, match="is a file; a feature store is a folder"):
        write(str(tmp_path / "file.zarr"), shards[:1])
    (tmp_path / "empty").mkdir()
    write(str(tmp_path / "empty"), shards[:1])
    write(str(tmp_path / "empty"), shards[1:2])  # a store, once made, takes more shards
    # URLs get the same rule: a file:// one as a folder, any other fsspec filesystem's as a prefix
    with pytest.raises(FeatureStoreError, match="is a folder of something else"):
        check_new_store_path(shards[0].parent.as_uri())
    with pytest.raises(FeatureStoreError, match="is a file; a feature store is a folder"):
        check_new_store_path((tmp_path / "file.zarr").as_uri())
    check_new_store_path((tmp_path / "empty").as_uri())  # a store's own folder
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/images/a.jpg", b"not a store")
    with pytest.raises(FeatureStoreError, match="memory://bucket/images is a folder of something else"):
        check_new_store_path("memory://bucket/images")
    with pytest.raises(FeatureStoreError, match="is a file"):
        check_new_store_path("memory://bucket/images/a.jpg")
    check_new_store_path("memory://bucket/new.zarr")
    fs.rm("/bucket", recursive=True)


def test_unfinished_group_is_replaced_and_done_group_never_rewritten(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    writer, (f,) = write(store, shards[:1], done=False)
    assert FeatureStore.open(store).n_images == 0
    writer.write_rows(f)  # a rerun after a crash between rows and marker
    writer.mark_done(f)
    assert FeatureStore.open(store).keys == f.keys
    assert writer.done_shards() == {f.name: f.sha256}
    with pytest.raises(FeatureStoreError, match="already done"):
        writer.write_rows(f)
    # what a delete killed half-way can leave (arrays without their group's metadata) is cleared, not tripped on
    _, (g,) = write(store, shards[1:2], done=False)
    (Path(store) / "shards" / g.name / "zarr.json").unlink()
    assert (Path(store) / "shards" / g.name / "global" / "zarr.json").exists()
    writer.write_rows(g)
    writer.mark_done(g)
    assert FeatureStore.open(store).keys == f.keys + g.keys


def test_root_attrs_and_done_markers_are_each_one_metadata_write(
    tmp_path: Path, shards: list[Path], monkeypatch
) -> None:
    """A kill can fall between any two writes: a marker written key by key (zarr's attrs.update) once left `done`
    without `n_images`, and every reader crashed on it while reruns took the shard for done."""
    store = str(tmp_path / "f.zarr")
    written, put = [], LocalStore.set

    async def spy(self, key, value, *args, **kwargs) -> None:
        written.append(key)
        await put(self, key, value, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "set", spy)
    writer, (f,) = write(store, shards[:1], done=False)
    assert written.count("zarr.json") == 3  # made; its attrs, whole; the shards asked for
    written.clear()
    writer.mark_done(f)
    monkeypatch.undo()
    assert written == [f"shards/{f.name}/zarr.json"]  # the whole marker
    assert tuple(header().to_attrs()) == ROOT_KEYS and set(DONE_KEYS) < set(done_shard_attrs(store)[f.name])


@pytest.mark.parametrize("part", ["marker", "root"])
def test_attrs_cut_short_by_an_earlier_version_are_unfinished_and_redone(tmp_path: Path, shards: list[Path],
                                                                          part: str) -> None:  # fmt: skip
    before = FeatureStore.open(write(str(tmp_path / "ref.zarr"), shards[:2])[0].path).global_vectors()
    store = str(tmp_path / "f.zarr")
    writer, feats = write(store, shards[:2] if part == "marker" else [])  # a store's creation comes first
    meta = Path(store) / ("shards" / Path(feats[1].name) if part == "marker" else Path()) / "zarr.json"
    doc = json.loads(meta.read_text())
    keys = DONE_KEYS if part == "marker" else ROOT_KEYS
    doc["attributes"] = {k: doc["attributes"][k] for k in keys[:4]}  # what a kill after 4 of the writes left
    meta.write_text(json.dumps(doc))
    if feats:
        assert FeatureStore.open(store).done_shards == [feats[0].name]
        assert FeatureStore.open(store).unfinished_shards == [feats[1].name]
        assert list(done_shard_attrs(store)) == [feats[0].name] and writer.done_shards().keys() == {feats[0].name}
        writer.write_rows(feats[1])  # what the rerun does: replace it
        writer.mark_done(feats[1])
    else:
        with pytest.raises(FeatureStoreError, match="not a finished feature store"):
            FeatureStore.open(store)
        res = CliRunner().invoke(cli, ["store", "info", store])
        assert res.exit_code == 1 and "not a finished feature store" in res.output and "Traceback" not in res.output
        write(store, shards[:2])  # the next run redoes the creation
    assert np.array_equal(FeatureStore.open(store).global_vectors(), before)


class Stopped(Exception):
    pass


def test_a_drop_stopped_half_way_leaves_an_unfinished_group_that_extraction_replaces(
    tmp_path: Path, shards: list[Path], monkeypatch
) -> None:
    store = str(tmp_path / "f.zarr")
    writer, feats = write(store, shards[:2])
    before = FeatureStore.open(store).global_vectors()
    deleted, delete_dir = [], LocalStore.delete_dir

    async def stops_after_one(self, prefix: str) -> None:
        if deleted:
            raise Stopped(prefix)
        deleted.append(prefix)
        await delete_dir(self, prefix)

    monkeypatch.setattr(LocalStore, "delete_dir", stops_after_one)
    with pytest.raises(Stopped):
        drop_shards(store, [feats[0].name])
    monkeypatch.undo()
    assert deleted[0].startswith(f"shards/{feats[0].name}/") and deleted[0] != f"shards/{feats[0].name}/"
    # the marker went first: readers no longer see the shard, and its group is an unfinished one
    assert FeatureStore.open(store).done_shards == [feats[1].name]
    assert FeatureStore.open(store).unfinished_shards == [feats[0].name]
    writer.write_rows(feats[0])
    writer.mark_done(feats[0])
    assert np.array_equal(FeatureStore.open(store).global_vectors(), before)


def test_a_tar_damaged_since_sharding_is_named_so_with_the_repair(
    tiny_shards: Path, train_store: Path, tmp_path: Path
) -> None:
    """A tar unlike the one its index.json recorded is damaged whatever a store says: the advice is to restore
    or reshard it, not to extract into a new store (which would refuse it too) or to rename shard folders."""
    copy = Path(shutil.copytree(tiny_shards, tmp_path / "copy"))  # a copied folder: the store saw other paths
    tar = copy / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[-1] ^= 1  # the end-of-archive padding: still a readable tar, of the recorded size
    tar.write_bytes(bytes(data))
    res = CliRunner().invoke(cli, ["store", "verify", str(train_store), "--shards", str(copy)])
    assert res.exit_code == 1
    assert "val-000000.tar is not the tar `semspai shard` wrote" in res.output
    assert "damaged or changed since. Restore it, or rerun the `semspai shard` that made its folder with --force" in (
        res.output
    )
    assert "--prefix" not in res.output and "new --store" not in res.output


def test_changed_shard_is_named(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    write(store, shards)
    fs = FeatureStore.open(store)
    fs.check_shards(shards)
    make_shards(tmp_path / "other", per_shard=5)  # same names, other content
    with pytest.raises(
        FeatureStoreError, match=r"shard train-000000: .*other/train-000000.tar is not the tar extracted"
    ):
        fs.check_shards([tmp_path / "other" / "train-000000.tar"])


def test_store_without_text_tower(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    write(store, shards[:1], has_text=False, prompts=[])
    fs = FeatureStore.open(store)
    assert not fs.has_text and fs.prompt_vectors() is None and fs.caption_vector(0) is None
    assert "text" not in zarr.open_group(store, mode="r")
    out = CliRunner().invoke(cli, ["store", "info", store])
    assert "text tower: NONE" in out.output


def test_verify_finds_missing_samples_and_bad_vectors(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    writer, feats = write(store, shards[:2], done=False)
    writer.mark_done(feats[0])
    f = feats[1]
    f.keys = f.keys[:-1] + ["s1n9"]  # one sample lost, one foreign key
    f.global_[0] = np.nan
    writer.write_rows(f)
    writer.mark_done(f)
    fs = FeatureStore.open(store)
    assert verify_store(fs, shards[:1], grid_boxes) == ["global: 1 rows hold NaN or inf"]
    problems = verify_store(fs, shards, grid_boxes)
    text = "\n".join(problems)
    assert "shard train-000001: 1 samples missing from the store, e.g. s1n3" in text
    assert "shard train-000001: 1 stored keys are not in the tar, e.g. s1n9" in text
    assert "global: 1 rows hold NaN or inf" in text
    assert "shard train-000002 (" in text and "is not done in the store" in text
    result = CliRunner().invoke(cli, ["store", "verify", store, "--shards", str(shards[0].parent)])
    assert result.exit_code == 1
    assert "Error:" in result.output and "problem(s); first:" in result.output


def test_a_missing_chunk_file_is_damage_every_reader_refuses(tmp_path: Path, shards: list[Path]) -> None:
    """Zarr reads a missing chunk as zeros: the store must say it is damaged, never hand out those zeros."""
    store = tmp_path / "f.zarr"
    _, feats = write(str(store), shards[:2])
    f = feats[0]
    for array in ("label", "global"):
        (store / "shards" / f.name / array / "c" / "0").rename(tmp_path / "aside")
        with pytest.raises(FeatureStoreError, match=rf"shards/{f.name}/{array}: 1 of its 1 chunk files are missing"):
            FeatureStore.open(str(store))
        info = CliRunner().invoke(cli, ["store", "info", str(store)])
        assert info.exit_code == 1 and f"shards/{f.name}/{array}: 1 of its 1 chunk files are missing" in info.output
        assert "is damaged" in info.output and "rerun `semspai extract-clip`" in info.output
        problems = verify_store(FeatureStore.open(str(store), check=False), shards[:2], grid_boxes)
        assert problems == [f"shards/{f.name}/{array}: 1 of its 1 chunk files are missing"]
        (tmp_path / "aside").rename(store / "shards" / f.name / array / "c" / "0")
    assert verify_store(FeatureStore.open(str(store)), shards[:2], grid_boxes) == []
    before = FeatureStore.open(str(store)).global_vectors()
    # a whole array gone: info and verify still list the damage (they read no array of a damaged store)
    shutil.rmtree(store / "shards" / f.name / "label")
    assert damaged_arrays(str(store), done_shard_attrs(str(store))) == [f"shards/{f.name}/label: missing"]
    info = CliRunner().invoke(cli, ["store", "info", str(store), "--json"])
    assert info.exit_code == 1 and json.loads(info.output[: info.output.rindex("}") + 1]) == {
        "damaged": [f"shards/{f.name}/label: missing"]
    }
    verify = CliRunner().invoke(cli, ["store", "verify", str(store), "--shards", str(shards[0])])
    assert verify.exit_code == 1 and f"problem: shards/{f.name}/label: missing" in verify.output
    # the repair the message gives: the damaged shard dropped, then extracted again
    assert "`semspai store drop STORE NAME`" in verify.output
    assert CliRunner().invoke(cli, ["store", "drop", str(store), f.name]).exit_code == 0
    assert not (store / "shards" / f.name).exists()
    writer = FeatureStoreWriter(str(store))
    writer.write_rows(f)
    writer.mark_done(f)
    assert np.array_equal(FeatureStore.open(str(store)).global_vectors(), before)
    # the prompt vectors are written once: their damage gets other advice
    shutil.rmtree(store / "text" / "c")
    with pytest.raises(
        FeatureStoreError, match=r"is damaged: text: 1 of its 1 chunk files .*restore the store's text/"
    ):
        FeatureStore.open(str(store))


def test_fill_value_chunks_are_written_and_corrupt_ones_named(tmp_path: Path, shards: list[Path]) -> None:
    store = tmp_path / "f.zarr"
    writer, (f,) = write(str(store), shards[:1], done=False)
    f.label[:] = 0  # every image real: a chunk of fill values alone, which Zarr would not write by default
    f.generator = [""] * len(f.keys)
    writer.write_rows(f)
    writer.mark_done(f)
    assert (store / "shards" / f.name / "label" / "c" / "0").is_file()
    assert (store / "shards" / f.name / "generator" / "c" / "0").is_file()
    (store / "shards" / f.name / "global" / "c" / "0" / "0").write_bytes(b"not zstd")
    fs = FeatureStore.open(str(store))  # every file is there: the damage shows when the chunk is read
    with pytest.raises(FeatureStoreError, match=rf"f.zarr/shards/{f.name}/global is damaged .*extract it again"):
        fs.global_vectors()


def test_verify_lists_every_array_with_a_chunk_that_does_not_decode(tmp_path: Path, shards: list[Path]) -> None:
    store = tmp_path / "f.zarr"
    _, feats = write(str(store), shards[:2])
    (store / "shards" / feats[0].name / "global" / "c" / "0" / "0").write_bytes(b"not zstd")
    (store / "shards" / feats[1].name / "label" / "c" / "0").write_bytes(b"")
    (store / "shards" / feats[1].name / "boxes" / "c" / "0" / "0").rename(tmp_path / "aside")  # missing
    res = CliRunner().invoke(cli, ["store", "verify", str(store), "--shards", str(shards[0].parent)])
    problems = [line for line in res.output.splitlines() if line.startswith("problem: ")]
    assert res.exit_code == 1 and len(problems) == 3, res.output
    assert problems[0] == f"problem: shards/{feats[1].name}/boxes: 1 of its 1 chunk files are missing"
    assert problems[1].startswith(f"problem: shards/{feats[0].name}/global: a chunk does not decode (")
    assert problems[2].startswith(f"problem: shards/{feats[1].name}/label: a chunk does not decode (")
    assert "(and 2 more: listed above)" in res.output and "Traceback" not in res.output


def test_verify_compares_labels_with_the_tars(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    writer, (f,) = write(store, shards[:1], done=False)
    f.label[0] = 1 - f.label[0]
    writer.write_rows(f)
    writer.mark_done(f)
    (problem,) = verify_store(FeatureStore.open(store), shards[:1], grid_boxes)
    assert problem.startswith(f"shard {f.name}: image {f.keys[0]} is stored as label, generator, split ({f.label[0]}")


def test_verify_checks_boxes_against_the_rule(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    writer, (f,) = write(store, shards[:1], done=False)
    f.boxes = f.boxes + 1
    writer.write_rows(f)
    writer.mark_done(f)
    problems = verify_store(FeatureStore.open(store), shards[:1], grid_boxes)
    assert problems == ["shard train-000000: image s0n0 boxes differ from the patch rule"]


def test_info_and_export_h5(tmp_path: Path, shards: list[Path]) -> None:
    store = str(tmp_path / "f.zarr")
    writer, feats = write(store, shards[:2])
    writer.record_shards({"train-000009": "elsewhere/train-000009.tar"})
    runner = CliRunner()
    out = runner.invoke(cli, ["store", "info", store])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    n = sum(len(f.keys) for f in feats)
    assert lines[0] == f"images: {n}"
    assert any("RANDOM WEIGHTS" in line for line in lines)
    assert (
        "shards: 2 done, 1 missing (train-000009: asked for, not done: an extract-clip running or stopped, or dropped)"
        in lines
    )
    assert "skipped images (unreadable): 1" in lines
    assert f"  train-000001/{CORRUPT_KEY}: not a readable image" in lines
    js = json.loads(runner.invoke(cli, ["store", "info", store, "--json"]).output)
    assert js["images"] == n and sum(js["by_label"].values()) == n and js["meaningless"] is True
    assert (
        runner.invoke(
            cli, ["store", "verify", store, "--shards", str(shards[0].parent / "train-00000[01].tar")]
        ).exit_code
        == 0
    )

    h5 = tmp_path / "f.h5"
    result = runner.invoke(cli, ["store", "export-h5", store, str(h5)])
    assert result.exit_code == 0 and "warning: 1 shard(s) asked for are not done" in result.output  # train-000009
    fs = FeatureStore.open(store)
    with h5py.File(h5, "r") as f:
        assert np.array_equal(f["global"][...], fs.global_vectors())
        assert [k.decode() for k in f["key"][...]] == fs.keys
        offsets = f["local_offsets"][...]
        for i in (0, fs.n_images - 1):
            assert np.array_equal(f["local"][offsets[i] : offsets[i + 1]], fs.local_vectors(i))
            assert np.array_equal(f["boxes"][offsets[i] : offsets[i + 1]], fs.boxes(i))
        assert json.loads(f.attrs["semspai_store"])["clip"]["model"] == "tiny-random"
        assert f["text"].shape == (2, D)
    assert runner.invoke(cli, ["store", "export-h5", store, str(h5)]).exit_code == 0  # an earlier export: replaced
    for foreign in (shards[0], tmp_path):  # a tar given as OUT by a slip; a folder
        before = sorted(os.listdir(tmp_path))
        result = runner.invoke(cli, ["store", "export-h5", store, str(foreign)])
        assert result.exit_code == 1 and f"Error: {foreign} " in result.output, result.output
        assert sorted(os.listdir(tmp_path)) == before  # no .partial left behind
    assert file_sha256(shards[0]) == feats[0].sha256
    result = runner.invoke(cli, ["store", "export-h5", store, str(tmp_path / "no-such-folder" / "x.h5")])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"Error: export-h5: the folder of {tmp_path / 'no-such-folder' / 'x.h5'} does not exist; create it first"
    ]


def test_missing_store_is_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["store", "info", str(tmp_path / "none.zarr")])
    assert result.exit_code == 1
    assert (
        result.output.startswith("Error: no feature store at ") and "run `semspai extract-clip --store" in result.output
    )
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"")  # a folder of something else: a wrong path
    result = CliRunner().invoke(cli, ["store", "info", str(tmp_path / "shards")])
    assert (
        result.exit_code == 1 and "is that the store's path?" in result.output and "extract-clip" not in result.output
    )


@pytest.mark.parametrize(
    "args",
    [["store", "--help"], ["store", "info", "--help"], ["store", "verify", "--help"], ["store", "export-h5", "--help"]],
)
def test_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "Usage:" in result.output


def test_writer_process_writes_reports_errors_and_fails_clearly_when_it_died(tmp_path: Path, shards) -> None:
    """The writer process (store/writer.py): rows and marker as a write here gives them; an error raised there
    arrives here with its type, message and remote traceback; a call to a writer that died fails clearly."""
    here, there = str(tmp_path / "here.zarr"), str(tmp_path / "there.zarr")
    write(here, shards)
    write(there, [])  # the store, no shard yet
    writer = WriterProcess()
    try:
        assert [writer.call(there, features_for(p), 2) for p in shards] == [writer.proc.pid] * len(shards)
        assert FeatureStore.open(there).done_shards == FeatureStore.open(here).done_shards
        for name in FeatureStore.open(here).done_shards:
            a, b = (zarr.open_group(s, mode="r")["shards"][name] for s in (here, there))
            assert sorted(a.array_keys()) == sorted(b.array_keys())
            assert all(np.array_equal(a[k][...], b[k][...]) for k in a.array_keys())
        with pytest.raises(FeatureStoreError, match="is already done in .* it is never rewritten") as info:
            writer.call(there, features_for(shards[0]), 2)
        assert isinstance(info.value.__cause__, RemoteTraceback) and "write_rows" in str(info.value.__cause__)
        assert writer.alive()
        os.kill(writer.proc.pid, signal.SIGKILL)
        with pytest.raises(WriterNotReached, match=r"had ended \(exit status -9\) before shard train-000000's write"):
            writer.call(there, features_for(shards[0]), 2)
        assert not writer.alive()
    finally:
        writer.close()


def test_a_writer_process_that_ended_while_idle_is_replaced_at_once(tmp_path: Path, shards, monkeypatch) -> None:
    write(str(tmp_path / "f.zarr"), [])
    monkeypatch.setattr(writer_module, "_WRITER", None)
    first = writer_module.writer_process()
    try:
        assert writer_module.writer_process() is first
        os.kill(first.proc.pid, signal.SIGKILL)  # not yet reaped: it may still look alive
        pid = writer_module.write_shard_rows(str(tmp_path / "f.zarr"), features_for(shards[0]), 2)
        assert pid not in (first.proc.pid, os.getpid()) and writer_module.writer_process().proc.pid == pid
        assert FeatureStore.open(str(tmp_path / "f.zarr")).done_shards == [shard_name(shards[0])]
    finally:
        writer_module.writer_process().close()


@pytest.mark.parametrize(
    ("boot", "message"),
    [
        ("import sys; sys.exit(3)", r"writer process did not start \(exit status 3; what it printed is above\)"),
        # stray output to stdout from the first line on (site hooks, C), which once was read as a reply and hung
        ("print('Using cache', flush=True); import os; os.write(1, b'U'); " + writer_module._BOOT, None),
    ],
)
def test_writer_process_start(tmp_path: Path, shards, monkeypatch, boot: str, message: str | None) -> None:
    store = str(tmp_path / "f.zarr")
    write(store, [])
    monkeypatch.setattr(writer_module, "_BOOT", boot)
    writer = WriterProcess()
    try:
        if message is None:
            assert writer.call(store, features_for(shards[0]), 2) == writer.proc.pid
        else:
            with pytest.raises(WriterProcessError, match=message):
                writer.call(store, features_for(shards[0]), 2)
    finally:
        writer.close()
    monkeypatch.setattr(writer_module.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(WriterProcessError, match="could not start .* SEMSPAI_STORE_WRITER=thread writes in this"):
        WriterProcess()


def test_an_unknown_writer_setting_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv(writer_module.WRITER_ENV, "threads")
    with pytest.raises(FeatureStoreError, match="SEMSPAI_STORE_WRITER='threads': use process .* or thread"):
        writer_module.uses_writer_process()


def test_a_writer_that_twice_did_not_start_fails_the_next_shards_at_once(tmp_path: Path, shards, monkeypatch) -> None:
    store = str(tmp_path / "f.zarr")
    write(store, [])
    monkeypatch.setattr(writer_module, "_WRITER", None)
    monkeypatch.setattr(writer_module, "_UNSTARTABLE", "")
    monkeypatch.setattr(writer_module, "_BOOT", "import sys; sys.exit(3)")
    with pytest.raises(WriterDidNotStart, match="did not start"):
        writer_module.write_shard_rows(store, features_for(shards[0]), 2)
    monkeypatch.setattr(writer_module.subprocess, "Popen", None)  # no third start
    with pytest.raises(WriterDidNotStart, match=r"did not start \(exit status 3.* SEMSPAI_STORE_WRITER=thread"):
        writer_module.write_shard_rows(store, features_for(shards[1]), 2)


def test_a_forked_copy_of_this_process_does_not_keep_the_writer_from_ending() -> None:
    writer = WriterProcess()
    release_r, release_w = os.pipe()
    child = os.fork()
    if child == 0:  # holds copies of the writer's pipes until released
        os.read(release_r, 1)
        os._exit(0)
    try:
        writer.close()  # would wait for its input's end, which the child's copy holds back, then kill it
        assert writer.proc.returncode == 0
        assert os.waitpid(child, os.WNOHANG) == (0, 0)  # the child still holds them
    finally:
        os.write(release_w, b"x")
        os.waitpid(child, 0)


def test_a_relative_store_path_means_the_same_store_to_the_writer_process(tmp_path: Path, shards, monkeypatch) -> None:
    writer_module.writer_process()  # started in the working folder the tests began in
    monkeypatch.chdir(tmp_path)
    write("rel.zarr", [])
    writer_module.write_shard_rows("rel.zarr", features_for(shards[0]), 2)
    assert FeatureStore.open(str(tmp_path / "rel.zarr")).done_shards == [shard_name(shards[0])]


def test_the_writer_process_writes_with_the_environment_of_the_request(tmp_path: Path, shards) -> None:
    """The fault hook, set after the writer started, still fires there: rows written, no marker, group killed."""
    store = str(tmp_path / "f.zarr")
    write(store, [])
    script = f"""
import os, pickle, sys
from semspai.store import writer
w = writer.writer_process()
features = pickle.loads(sys.stdin.buffer.read())
os.environ[writer.FAULT_ENV] = features.name
writer.write_shard_rows({store!r}, features, 2)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], input=pickle.dumps(features_for(shards[0])), start_new_session=True
    )
    assert proc.returncode == -signal.SIGKILL
    group = zarr.open_group(store, mode="r")["shards"][shard_name(shards[0])]
    assert group.attrs["done"] is False and "global" in group
