"""WebDataset shards: deterministic tar writing, sample reading, shard-spec resolution, the shard index."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import braceexpand

INDEX_NAME = "index.json"
STAGING = ".staging"  # a `semspai shard` run writes its tars here first
PREVIOUS = ".previous"  # the tars a rebuild replaces, until its output is recorded complete
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


def tar_sha256s(paths: list[Path], known: dict[str, list] | None = None, threads: int = 8) -> dict[str, str]:
    """str(tar path) -> its sha256: from `known` (real path -> [size, mtime_ns, sha256], as `file_stats` gives
    them) where the file's size and mtime are the ones recorded there, else hashed, in threads (hashlib releases
    the GIL: reads overlap)."""
    known = known or {}

    def sha(path: Path) -> str:
        st, had = os.stat(path), known.get(os.path.realpath(path))
        if had is not None and list(had[:2]) == [st.st_size, st.st_mtime_ns]:
            return str(had[2])
        return file_sha256(path)

    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        return dict(zip(map(str, paths), pool.map(sha, paths), strict=True))


def file_stats(paths: list[Path], shas: dict[str, str]) -> dict[str, list]:
    """Real path -> [size, mtime_ns, sha256] of each of `paths` (shas by str(path)): what `tar_sha256s` reuses."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[os.path.realpath(p)] = [st.st_size, st.st_mtime_ns, shas[str(p)]]
    return out


def shard_name(path: str | Path) -> str:
    """A shard's name: its file name without `.tar` (e.g. `train-000003`)."""
    name = Path(str(path)).name
    return name[: -len(".tar")] if name.endswith(".tar") else name


TAR_BLOCK = 512
REGULAR, DIRECTORY, LINKS = (b"0", b"\0"), b"5", (b"1", b"2")


def _octal(field: bytes) -> int:
    try:
        return int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"a header number is not octal: {bytes(field)!r}") from None


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    rest = header[:148] + header[156:]
    return stored == unsigned - 256 * (len(rest) - len(rest.translate(None, bytes(range(128, 256)))))  # signed chars


def tar_members(fh, want=lambda name: True) -> Iterator[tuple[str, bytearray | None]]:
    """(name, bytes) of each regular file of an open tar, in stored order; bytes are None (skipped unread)
    when not `want(name)`.

    Plain ustar, GNU and v7 headers are parsed here, several times cheaper per member than tarfile; from the
    first header this reader leaves to tarfile (pax, GNU long names, base-256 sizes, sparse files) tarfile
    reads the rest. Stricter than tarfile, which stops silently at a damaged header: a bad checksum, a cut
    header or a missing end-of-archive block raise tarfile.ReadError, a cut member EOFError.
    """
    while True:
        start = fh.tell()
        header = fh.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK:
            why = "no end-of-archive block" if not header else f"a header cut at byte {start + len(header)}"
            raise tarfile.ReadError(f"{why}: the tar is truncated")
        if not any(header):
            return  # end of archive
        if not _checksum_ok(header):
            raise tarfile.ReadError(f"bad header checksum at byte {start}")
        kind, magic = header[156:157], header[257:263]
        size_field = header[124:136]
        if (kind not in REGULAR and kind != DIRECTORY and kind not in LINKS) or size_field[0] & 0x80:
            fh.seek(start)
            yield from _tarfile_members(fh, want)
            return
        if kind not in REGULAR:
            continue  # a directory or link: no data follows its header
        name = header[:100].split(b"\0", 1)[0]
        if magic == b"ustar\x00" and header[345]:  # POSIX ustar: a path prefix (GNU uses these bytes otherwise)
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        size = _octal(size_field)
        padded = -size % TAR_BLOCK
        text = name.decode("utf-8", "surrogateescape")
        if want(text):
            data = bytearray(size)
            if fh.readinto(data) != size:
                raise EOFError(f"member {text} ends early")
            fh.seek(padded, 1)
            yield text, data
        else:
            fh.seek(size + padded, 1)
            yield text, None


def _tarfile_members(fh, want) -> Iterator[tuple[str, bytearray | None]]:
    with tarfile.open(fileobj=fh, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, _read_member(tar, member) if want(member.name) else None


def _key_ext(member: str) -> tuple[str, str]:
    """A member name -> (sample key, extension): WebDataset's rule, the key ends at the base name's first dot."""
    key, _, ext = member.rsplit("/", 1)[-1].partition(".")
    return key, ext


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

    with _reading(path) as fh:
        for name, data in tar_members(fh):
            key, ext = _key_ext(name)
            if current is not None and key != current:
                yield finish(current)
            current = key
            pending.setdefault(key, {})[ext] = data
        if current is not None:
            yield finish(current)


@contextlib.contextmanager
def _reading(path: Path):
    """The shard opened for reading; any read failure inside becomes one ShardError naming it."""
    try:
        with open(path, "rb") as fh:
            yield fh
    except FileNotFoundError as exc:
        raise ShardError(f"shard {path} does not exist") from exc
    except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as exc:
        raise ShardError(
            f"shard {path}: truncated or corrupt tar ({exc}); rerun `semspai shard` to rebuild it (with --force "
            "should it say up to date)"
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
    with _reading(path) as fh:
        return [
            (_key_ext(name)[0], json.loads(data))
            for name, data in tar_members(fh, want=lambda n: n.endswith(".json"))
            if data is not None
        ]


def resolve_shards(spec: str | Path) -> list[Path]:
    """A brace pattern (`train-{000000..000031}.tar`), a glob, a shard folder or one tar -> sorted tar paths.

    Every path a brace pattern names must exist; a folder or glob that matches nothing is an error.
    """
    text = str(spec)
    if os.path.isdir(text):
        return _folder_tars(Path(text))
    if "{" in text:
        try:
            paths = [Path(p) for p in braceexpand.braceexpand(text)]
        except braceexpand.UnbalancedBracesError as exc:
            raise ShardError(
                f"shard spec {text}: {exc} (a brace pattern reads like train-{{000000..000031}}.tar)"
            ) from exc
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ShardError(f"{len(missing)} shard(s) of {text} do not exist, e.g. {missing[0]}")
        return sorted(t for p in paths for t in (_folder_tars(p) if p.is_dir() else [p]))
    if any(c in text for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(text))
        if not paths:
            raise ShardError(f"no shard matches {text}")
        return sorted(t for p in paths for t in (_folder_tars(p) if p.is_dir() else [p]))
    if os.path.isfile(text):
        if not text.endswith(".tar"):  # e.g. the folder's index.json: the folder is the SPEC
            raise ShardError(f"shard spec {text} is not a .tar file; name a tar, a shard folder, a glob or a brace "
                             "pattern")  # fmt: skip
        return [Path(text)]
    raise ShardError(f"shard spec {text} is neither a folder, a tar, a glob nor a brace pattern that exists")


def _folder_tars(folder: Path) -> list[Path]:
    """A shard folder's tars: with an index.json, exactly the tars it lists (each must be there, and no other);
    a folder that a `semspai shard` run left mid-way (its index gone, old or new tars set aside) is refused."""
    paths = sorted(folder.glob("*.tar"))
    indexed = (folder / INDEX_NAME).exists()
    if not indexed and ((folder / PREVIOUS).exists() or (folder / STAGING).exists()):
        raise ShardError(f"{folder}: a `semspai shard` run stopped while writing it ({INDEX_NAME} is missing, "
                         f"{PREVIOUS} or {STAGING} is there); rerun that `semspai shard` to finish it")  # fmt: skip
    if not paths:
        raise ShardError(f"shard folder {folder} holds no .tar files; run `semspai shard ... --out {folder}` first")
    if not indexed:
        return paths  # tars made elsewhere: WebDataset tars with semspai's sidecars
    found = {p.name for p in paths}
    index = read_index(folder)
    listed = [e.get("name") for e in index.get("shards", [])]
    damage = damaged_tars(folder, index)
    if damage:
        raise ShardError(
            f"{folder}: {len(damage)} tar(s) that {INDEX_NAME} lists are missing or cut short, e.g. {damage[0]}; "
            "restore them, or rerun the `semspai shard` that made the folder: it rebuilds them"
        )
    extra = sorted(found - set(listed))
    if extra:
        raise ShardError(
            f"{folder}: {extra[0]}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''} not among the tars its "
            f"{INDEX_NAME} lists (added since `semspai shard` made it); move them out, or name the tars you mean "
            "with a glob"
        )
    return [folder / n for n in sorted(listed)]


def indexed_sha256(paths: list[Path]) -> dict[str, str]:
    """Tar path -> the sha256 `semspai shard` recorded for it in its folder's index.json (tars without one,
    or that it does not list, are left out: tars may come from elsewhere)."""
    recorded: dict[Path, dict[str, str]] = {}
    out = {}
    for p in paths:
        folder = Path(p).parent
        if folder not in recorded:
            has_index = (folder / INDEX_NAME).exists()
            entries = read_index(folder).get("shards", []) if has_index else []
            recorded[folder] = {e.get("name"): e.get("sha256") for e in entries}
        sha = recorded[folder].get(Path(p).name)
        if sha:
            out[str(p)] = sha
    return out


def shard_split(path: str | Path) -> str:
    """The split a shard holds, from its name (`val-000002.tar` or `PREFIX-val-000002.tar` -> `val`)."""
    parts = shard_name(path).rsplit("-", 2)
    return parts[-2] if len(parts) > 1 else ""


def damaged_tars(folder: Path, index: dict | None = None) -> list[str]:
    """What is wrong with the tars a shard folder's index.json (`index`, when already read) lists: gone, or of
    another size than it recorded (indexes of older versions recorded no sizes: only existence is checked).
    ShardError without an index."""
    damage = []
    for e in (read_index(folder) if index is None else index).get("shards", []):
        tar = folder / str(e.get("name", ""))
        if not e.get("name") or not tar.is_file():
            damage.append(f"{e.get('name') or '(a nameless entry)'} is missing")
        elif "bytes" in e and tar.stat().st_size != e["bytes"]:
            damage.append(f"{e['name']} has {tar.stat().st_size} bytes, {INDEX_NAME} recorded {e['bytes']}")
    return damage


def read_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX_NAME
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ShardError(f"{path} is missing: {shard_dir} was not made by `semspai shard` (or the run died)") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(f"{path} is corrupt ({exc}); rebuild the shards with `semspai shard ... --force`") from exc
    if not isinstance(index, dict):  # valid JSON, but not what `semspai shard` writes
        raise ShardError(f"{path} is corrupt (a JSON {type(index).__name__}, not an object); rebuild the shards with "
                         "`semspai shard ... --force`")  # fmt: skip
    return index
