"""Checkpoints: atomic save, `weights_only` load round trip, `RUN` -> best.pt, unusable files -> CheckpointError."""

from __future__ import annotations

import pytest
import torch

from semspai.store.checkpoints import (
    CHECKPOINT_SCHEMA_VERSION,
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(4, dtype=torch.float16)},
        "config": {"TRAIN": {"EPOCHS": 2, "BASE_LR": 5e-4}, "DATA": {"GENERATORS": ["a", "b"]}},
        "clip": "tiny-random",
        "threshold": 0.37,
        "epoch": 3,
    }


def test_round_trip(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"  # parents are created
    save_checkpoint(path, state())
    loaded = load_checkpoint(path)
    want = state()
    assert loaded["schema_version"] == CHECKPOINT_SCHEMA_VERSION
    assert set(loaded) == set(want) | {"schema_version"}
    for k, t in want["model"].items():
        assert torch.equal(loaded["model"][k], t) and loaded["model"][k].dtype == t.dtype
    assert {k: loaded[k] for k in ("config", "clip", "threshold", "epoch")} == {
        k: want[k] for k in ("config", "clip", "threshold", "epoch")
    }
    assert not list(path.parent.glob("*.partial"))


def test_save_overwrites_atomically(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"epoch": 1})

    def dying_save(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1  # the old checkpoint is intact


def test_run_directory_means_best(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "best.pt", {"epoch": 7})
    save_checkpoint(run / "checkpoints" / "last.pt", {"epoch": 9})
    assert resolve_checkpoint(run) == run / "checkpoints" / "best.pt"
    assert load_checkpoint(run)["epoch"] == 7
    assert load_checkpoint(str(run / "checkpoints" / "last.pt"))["epoch"] == 9


def test_run_directory_without_best(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"run directory .*run has no checkpoints/best\.pt"):
        load_checkpoint(tmp_path / "run")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"", "is not a checkpoint"),
        (b"garbage" * 100, "is not a checkpoint"),
        (b"PK\x03\x04truncated zip", "cannot be read"),
    ],
)
def test_garbage_file(tmp_path, payload, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=rf"bad\.pt {message}"):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.pt"
    save_checkpoint(path, state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


class Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"schema_version": CHECKPOINT_SCHEMA_VERSION, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("obj", [{"model": {}}, {"schema_version": 999}, [1, 2, 3]])
def test_not_a_semspai_checkpoint(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a semspai checkpoint"):
        load_checkpoint(path)
