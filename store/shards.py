"""WebDataset shards: deterministic tar writing, sample reading, shard-spec resolution, the shard index."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand

INDEX_NAME = "index.json"
SHARD_SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")


class ShardError(ValueError):
    """A shard or shard spec cannot be read; the message names the shard and what to do."""


@dataclass
class ShardSample:
    key: str  # dot-free, stable across runs
    image: bytes | bytearray  # the original file's bytes, never re-encoded (writable when read from a tar)
    ext: str  # the image member's extension, e.g. "jpg"
    meta: dict  # the JSON sidecar: label, generator, caption, split, group, width, height, path, sha256

    @property
    def label(self) -> int:
        return int(self.meta["label"])


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so the same input gives byte-identical tars.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes one tar under a temporary name and renames it when complete, so a crash leaves no tar
    that looks finished."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self._fh = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, image: bytes, ext: str, meta: dict) -> None:
        if "." in key:
            raise ValueError(f"shard key {key!r} contains a dot (WebDataset would split it)")
        sidecar = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
        for name, payload in ((f"{key}.{ext}", image), (f"{key}.json", sidecar)):
            self._tar.addfile(_tarinfo(name, len(payload)), io.BytesIO(payload))
        self.count += 1

    def close(self) -> str:
        """Finish the tar, fsync, rename into place; returns its sha256."""
        self._tar.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest = file_sha256(self.tmp)
        os.replace(self.tmp, self.path)
        return digest

    def abort(self) -> None:
        self._tar.close()
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(path: str | Path) -> str:
    """A shard's name: its file name without `.tar` (e.g. `train-000003`)."""
    name = Path(str(path)).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


def iter_shard(path: str | Path) -> Iterator[ShardSample]:
    """Yield a tar's samples in stored order. A truncated or corrupt tar raises ShardError naming it."""
    path = Path(path)
    pending: dict[str, dict] = {}
    current: str | None = None

    def finish(key: str) -> ShardSample:
        parts = pending.pop(key)
        if "json" not in parts:
            raise ShardError(f"shard {path}: sample {key} has no .json sidecar; rerun `semspai shard` for it")
        images = [e for e in parts if e != "json"]
        if len(images) != 1:
            raise ShardError(f"shard {path}: sample {key} has {len(images)} image members ({images}), expected 1")
        try:
            meta = json.loads(parts["json"])
        except json.JSONDecodeError as exc:
            raise ShardError(f"shard {path}: sample {key} has an unreadable sidecar: {exc}") from exc
        return ShardSample(key=key, image=parts[images[0]], ext=images[0], meta=meta)

    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if current is not None and key != current:
                    yield finish(current)
                current = key
                pending.setdefault(key, {})[ext] = _read_member(tar, member)
            if current is not None:
                yield finish(current)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise ShardError(f"shard {path} does not exist") from exc
        raise ShardError(
            f"shard {path}: truncated or corrupt tar ({exc}); rerun `semspai shard` to rebuild it"
        ) from exc


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytearray:
    """A member's bytes in a writable buffer, read once: tensors can then view them without another copy."""
    buf = bytearray(member.size)
    fh = tar.extractfile(member)
    if fh is not None and fh.readinto(buf) != member.size:
        raise EOFError(f"member {member.name} ends early")
    return buf


def shard_sidecars(path: str | Path) -> list[tuple[str, dict]]:
    """(key, JSON sidecar) of each sample in stored order, skipping image bytes: lets a trainer plan an epoch
    (splits, generators, counts) without decoding or even reading the images."""
    path = Path(path)
    out = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if member.isfile() and ext == "json":
                    out.append((key, json.loads(tar.extractfile(member).read())))
    except FileNotFoundError as exc:
        raise ShardError(f"shard {path} does not exist") from exc
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as exc:
        raise ShardError(
            f"shard {path}: truncated or corrupt tar ({exc}); rerun `semspai shard` to rebuild it"
        ) from exc
    return out


def resolve_shards(spec: str | Path) -> list[Path]:
    """A brace pattern (`train-{000000..000031}.tar`), a glob, a shard folder or one tar -> sorted tar paths.

    Every path a brace pattern names must exist; a folder or glob that matches nothing is an error.
    """
    text = str(spec)
    if os.path.isdir(text):
        paths = sorted(Path(text).glob("*.tar"))
        if not paths:
            raise ShardError(f"shard folder {text} holds no .tar files; run `semspai shard ... --out {text}` first")
        return paths
    if "{" in text:
        paths = [Path(p) for p in braceexpand.braceexpand(text)]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ShardError(f"{len(missing)} shard(s) of {text} do not exist, e.g. {missing[0]}")
        return sorted(paths)
    if any(c in text for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(text))
        if not paths:
            raise ShardError(f"no shard matches {text}")
        return paths
    if os.path.isfile(text):
        return [Path(text)]
    raise ShardError(f"shard spec {text} is neither a folder, a tar, a glob nor a brace pattern that exists")


def shard_split(path: str | Path) -> str:
    """The split a shard holds, from its name (`val-000002.tar` -> `val`)."""
    return shard_name(path).rsplit("-", 1)[0]


def read_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ShardError(f"{path} is missing: {shard_dir} was not made by `semspai shard` (or the run died)") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(f"{path} is corrupt ({exc}); rebuild the shards with `semspai shard ... --force`") from exc


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON under a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
