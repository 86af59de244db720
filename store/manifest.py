"""Stage manifests: what a stage's output was made from, so reruns skip, or refuse stale inputs.

A manifest records the resolved config's digest, a fingerprint of each input and the stage's schema
version — never the git commit, so an unrelated commit does not invalidate hours of extraction.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from semspai.store.atomic import write_json_atomic
from semspai.store.shards import file_sha256

MANIFEST_NAME = "semspai-stage.json"


class StaleOutputError(RuntimeError):
    """The output exists but was made from other inputs or another config; the message says what to rerun."""


@dataclass
class StageManifest:
    stage: str
    schema_version: int
    config_digest: str
    inputs: dict[str, str]  # input name -> fingerprint
    semspai_version: str = ""
    config: dict = field(default_factory=dict)  # the resolved config itself, so the output says how it was made
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # input files hashed for the fingerprints: real path -> [size, mtime_ns, sha256], so a later check of an
    # unchanged file reads no byte of it (a cache: no part of what the output is)
    file_shas: dict[str, list] = field(default_factory=dict)


def unique_files(paths: Iterable[str | Path], unlinked: bool = False) -> list[Path]:
    """Each file once, as it was first named: the same file named twice, from another working directory or
    through a symlink (one real path) counts once. `unlinked`: named by a path that is no symlink where one of
    its names is (at the place of its first name)."""
    first: dict[str, Path] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real not in first or (unlinked and os.path.islink(first[real]) and not os.path.islink(p)):
            first[real] = Path(p)
    return list(first.values())


def fingerprint_paths(paths: list[Path], root: Path | None = None) -> str:
    """Cheap fingerprint of many files: names, sizes and mtimes (content hashes would cost a full read). Names
    are relative to `root` when given, else the files' real paths: the same files named from another working
    directory or through a symlink have the same fingerprint."""
    h = hashlib.sha256()
    for p in sorted(paths, key=os.path.realpath):
        st = p.stat()
        name = str(p.relative_to(root)) if root else os.path.realpath(p)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))  # any file name
    return h.hexdigest()


def fingerprint_file(path: str | Path) -> str:
    """Content fingerprint of one small file (e.g. an upstream stage's index)."""
    return file_sha256(path)


def manifest_path(out: str | Path) -> Path:
    return Path(out) / MANIFEST_NAME


def read_manifest(out: str | Path) -> StageManifest | None:
    path = manifest_path(out)
    if not path.exists():
        return None
    try:
        return StageManifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:  # not JSON, or not a manifest's fields
        raise StaleOutputError(
            f"{path} is unreadable ({exc}), so whether {Path(out)} is up to date is unknown; "
            "rerun the stage with --force to rebuild it"
        ) from exc


def write_manifest(out: str | Path, manifest: StageManifest) -> None:
    os.makedirs(out, exist_ok=True)
    write_json_atomic(manifest_path(out), asdict(manifest))


def leaf_differences(old: dict, new: dict, prefix: str = "", shared: bool = False) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs between two nested dicts; with `shared`,
    only of keys both have (a config written by another version may have keys this one has not, or lack some)."""
    out = []
    keys = set(old) & set(new) if shared else set(old) | set(new)
    for key in sorted(keys, key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += leaf_differences(a, b, f"{prefix}{key}.", shared)
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def check_stage(out: str | Path, wanted: StageManifest, rerun_hint: dict[str, str], force: bool,
                otherwise: str = "") -> bool:  # fmt: skip
    """Decide whether a stage must run. True: run it. False: its output is up to date.

    Raises StaleOutputError when the output exists but was made from other inputs, another config or
    another schema; `rerun_hint` maps an input name to the command that rebuilds what depends on it, and
    `otherwise` (default: the stage with --force) says what to run when no changed input has a hint.
    `force` always runs.
    """
    if force:
        return True
    have = read_manifest(out)
    if have is None:
        return True
    if have.stage != wanted.stage:
        raise StaleOutputError(f"{out} holds the output of `semspai {have.stage}`, not of `semspai {wanted.stage}`")
    reasons = []
    if have.schema_version != wanted.schema_version:
        reasons.append(
            f"it was made by schema version {have.schema_version}, this semspai writes {wanted.schema_version}"
        )
    if have.config_digest != wanted.config_digest:
        keys = [k for k, _, _ in leaf_differences(have.config, wanted.config, shared=True)]
        shown = f" ({', '.join(keys[:3])}{' and more' if len(keys) > 3 else ''} differ)" if keys else ""
        reasons.append(f"it was made with another configuration{shown}")
    for name, fp in wanted.inputs.items():
        if have.inputs.get(name) != fp:
            reasons.append(f"its input {name} changed since it was made at {have.created} (rebuilt, touched or "
                           "moved; or fingerprinted by an older semspai)")  # fmt: skip
    if not reasons:
        return False
    hints = [rerun_hint[n] for n in wanted.inputs if have.inputs.get(n) != wanted.inputs[n] and n in rerun_hint]
    what = hints[0] if hints else otherwise or f"`semspai {wanted.stage}` with --force to rebuild it"
    raise StaleOutputError(f"{out} is stale: {'; '.join(reasons)}. Rerun {what}.")
