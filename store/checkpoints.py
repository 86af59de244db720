"""Checkpoints: atomic writes, `weights_only` loading, and `RUN` -> `RUN/checkpoints/best.pt` resolution."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semspai.store.manifest import MANIFEST_NAME

if TYPE_CHECKING:
    import torch

CHECKPOINT_SCHEMA_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint path or file cannot be used; the message names it."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save `state` (tensors, numbers, strings, lists, dicts only — so `weights_only` can load it) atomically:
    a temporary file is written and fsynced, then renamed, so a killed run never leaves half a checkpoint."""
    import torch  # lazily: CheckpointError is imported by every CLI stage, torch only by those that need it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        torch.save({"schema_version": CHECKPOINT_SCHEMA_VERSION, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory meaning its `checkpoints/best.pt`."""
    path = Path(path)
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        if not best.exists():
            other = _other_output(path)
            if other:
                raise CheckpointError(f"{path} is {other}, not a training run; pass a run directory or a checkpoint")
            raise CheckpointError(
                f"run directory {path} has no checkpoints/best.pt (did `semspai train` finish an epoch?)"
            )
        return best
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def _other_output(path: Path) -> str:
    """What another stage's output folder `path` is ('' when it is none of them)."""
    if (path / "zarr.json").exists():
        return "a Zarr store (a feature store?)"
    try:
        stage = json.loads((path / MANIFEST_NAME).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return ""
    return f"the output of `semspai {stage}`" if stage and stage != "train" else ""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (file or run directory) with `weights_only=True`: no pickled code runs."""
    import torch

    file = resolve_checkpoint(path)
    with open(file, "rb") as fh:
        head = fh.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save writes a zip archive (a pickle, long ago)
        raise CheckpointError(f"{file} is not a checkpoint (not a file torch.save writes); pass a .pt file that "
                              "`semspai train` wrote, or its run directory")  # fmt: skip
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to the user
        why = (str(exc).strip().splitlines() or [""])[0]  # torch's first line; its weights_only advice runs on
        why = why if len(why) <= 200 else why[:200] + "…"
        raise CheckpointError(f"checkpoint {file} cannot be read ({type(exc).__name__}: {why})") from exc
    if not isinstance(state, dict) or state.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
        raise CheckpointError(f"checkpoint {file} is not a semspai checkpoint of schema {CHECKPOINT_SCHEMA_VERSION}")
    return state
