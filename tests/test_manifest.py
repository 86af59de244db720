"""Stage manifests: skip when unchanged, refuse stale output with a message naming what to rerun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from semspai.store.manifest import (
    MANIFEST_NAME,
    StageManifest,
    StaleOutputError,
    check_stage,
    fingerprint_file,
    fingerprint_paths,
    manifest_path,
    read_manifest,
    write_manifest,
)

HINT = {"shards": "`semspai shard ... --force`", "store": "`semspai extract-clip --force`"}


def manifest(**kw) -> StageManifest:
    base = {"stage": "train", "schema_version": 2, "config_digest": "cfg-a", "inputs": {"shards": "s1", "store": "z1"}}
    return StageManifest(**(base | kw))


def test_write_read_round_trip(tmp_path):
    out = tmp_path / "run" / "nested"
    m = manifest(semspai_version="1.2.3")
    write_manifest(out, m)  # creates the folder
    assert manifest_path(out) == out / MANIFEST_NAME
    assert read_manifest(out) == m
    assert json.loads((out / MANIFEST_NAME).read_text())["config_digest"] == "cfg-a"
    assert not list(out.glob("*.partial"))
    assert read_manifest(tmp_path / "nothing") is None


def test_no_manifest_means_run(tmp_path):
    assert check_stage(tmp_path, manifest(), HINT, force=False) is True
    assert check_stage(tmp_path / "missing", manifest(), HINT, force=False) is True


def test_same_inputs_and_config_means_up_to_date(tmp_path):
    write_manifest(tmp_path, manifest(created="2020-01-01T00:00:00+00:00"))
    # the creation time and the semspai version do not matter; config, inputs and schema do
    assert check_stage(tmp_path, manifest(semspai_version="9.9"), HINT, force=False) is False


def test_force_always_runs(tmp_path):
    write_manifest(tmp_path, manifest())
    assert check_stage(tmp_path, manifest(), HINT, force=True) is True
    assert check_stage(tmp_path, manifest(config_digest="other", stage="eval"), HINT, force=True) is True


def test_changed_config(tmp_path):
    write_manifest(tmp_path, manifest())
    with pytest.raises(StaleOutputError) as info:
        check_stage(tmp_path, manifest(config_digest="cfg-b"), HINT, force=False)
    msg = str(info.value)
    assert str(tmp_path) in msg and "another configuration" in msg
    assert "`semspai train` with --force" in msg  # no input changed: the stage itself is what to rerun


def test_changed_schema(tmp_path):
    write_manifest(tmp_path, manifest())
    with pytest.raises(StaleOutputError, match="schema version 2, this semspai writes 3"):
        check_stage(tmp_path, manifest(schema_version=3), HINT, force=False)


@pytest.mark.parametrize("changed,hint", [("shards", "semspai shard"), ("store", "semspai extract-clip")])
def test_rebuilt_input_names_what_to_rerun(tmp_path, changed, hint):
    made = manifest(created="2026-01-02T03:04:05+00:00")
    write_manifest(tmp_path, made)
    wanted = manifest(inputs=made.inputs | {changed: "new"})
    with pytest.raises(StaleOutputError) as info:
        check_stage(tmp_path, wanted, HINT, force=False)
    msg = str(info.value)
    assert f"its input {changed} changed" in msg and "2026-01-02T03:04:05" in msg
    assert f"Rerun `{hint}" in msg
    other = "store" if changed == "shards" else "shards"
    assert f"its input {other}" not in msg


def test_added_input_is_stale(tmp_path):
    write_manifest(tmp_path, manifest(inputs={"shards": "s1"}))
    with pytest.raises(StaleOutputError, match="its input store changed"):
        check_stage(tmp_path, manifest(), HINT, force=False)


def test_output_of_another_stage(tmp_path):
    write_manifest(tmp_path, manifest(stage="shard"))
    with pytest.raises(StaleOutputError, match="output of `semspai shard`, not of `semspai train`"):
        check_stage(tmp_path, manifest(), HINT, force=False)


def test_fingerprint_paths(tmp_path, monkeypatch):
    files = []
    for name in ("b.bin", "a.bin"):
        (tmp_path / name).write_bytes(b"12345")
        files.append(tmp_path / name)
    fp = fingerprint_paths(files)
    assert fp == fingerprint_paths(list(reversed(files)))  # order-free
    assert fingerprint_paths(files, root=tmp_path) != fp  # names are relative to the root when given
    monkeypatch.chdir(tmp_path)
    assert fingerprint_paths([Path("a.bin"), Path("../" + tmp_path.name + "/b.bin")]) == fp  # spelled otherwise
    (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path)
    link = tmp_path.parent / f"{tmp_path.name}-link"
    assert fingerprint_paths([link / "a.bin", link / "b.bin"]) == fp  # reached through a symlink

    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert fingerprint_paths(files) != fp  # touched
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint_paths(files) == fp

    files[0].write_bytes(b"123456")
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint_paths(files) != fp  # size changed
    assert fingerprint_paths(files[:1]) != fingerprint_paths(files)  # a file removed


def test_fingerprint_paths_with_root_moves_with_the_tree(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
        (root / "x").write_bytes(b"x")
        os.utime(root / "x", ns=(0, 10**18))
    assert fingerprint_paths([a / "x"], root=a) == fingerprint_paths([b / "x"], root=b)


def test_fingerprint_file_is_a_content_hash(tmp_path):
    f = tmp_path / "index.json"
    f.write_text("{}")
    fp = fingerprint_file(f)
    os.utime(f, ns=(0, 12345))
    assert fingerprint_file(f) == fp
    f.write_text("{ }")
    assert fingerprint_file(f) != fp
