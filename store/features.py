"""The Zarr v3 feature store: cached CLIP vectors per image and per grid patch, one group per shard.

Layout (DESIGN.md, "Feature store (Zarr v3) — invariants"):

    ROOT/                      attrs: schema, clip spec, preprocessing, patch rule, prompt bank, recorded shards
    ROOT/text                  (K, D) float16 prompt vectors (absent without a text tower)
    ROOT/shards/<shard-name>/  one group per shard tar, written by exactly one task, `done` attr written last
        global        (n, D) float16, L2-normalised
        local         (rows, D) float16, one row per grid patch, image i's rows at local_offsets[i]:[i+1]
        local_offsets (n + 1,) int64
        boxes         (rows, 4) int32, x0, y0, x1, y1 in the padded image
        caption       (n, D) float16 + caption_mask (n,) bool (absent without a text tower)
        key, generator, split (n,) str; label (n,) int8; width, height (n,) int32

A reader sees the concatenation of the done shard groups in shard-name order. Zarr 3.1 has no locks, so
every array here has exactly one writer: the task that owns its shard, or the driver for the root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from semspai.store.atomic import replacing
from semspai.store.locks import lock_beside, run_lock
from semspai.store.manifest import leaf_differences
from semspai.store.shards import (
    INDEX_NAME,
    ShardError,
    file_sha256,
    indexed_sha256,
    iter_shard,
    shard_name,
    tar_sha256s,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SHARDS_GROUP = "shards"
TEXT_ARRAY = "text"
# Rows per chunk are chosen so a chunk holds about this many bytes: big enough for object stores,
# small enough that a reader of one image does not pull a whole shard.
CHUNK_BYTES = 1 << 21
# float16 storage of unit vectors: |norm - 1| stays well below this (verified by `store verify`).
NORM_TOLERANCE = 1e-2
STR_ARRAYS = ("key", "generator", "split")
# Zarr reads a missing chunk file as fill values (zeros, ""), silently: so every chunk is written, even one of
# fill values alone (Zarr skips those by default), done markers record each array's chunk count, and readers
# check no chunk file is missing (a partial copy of a store, a deleted file). In older stores a chunk of fill
# values may be absent by right: there only these arrays, whose chunks never hold fill values alone, are checked
ALL_CHUNKS = {"write_empty_chunks": True}
NEVER_FILL_ONLY = ("global", "local", "boxes", "key", "width", "height")


class FeatureStoreError(ValueError):
    """The store is missing, mismatched (another CLIP, decoder, patch rule), stale or inconsistent."""


@dataclass
class StoreHeader:
    """Everything that decides what the vectors mean; fixed into the root attrs when the store is made."""

    clip: dict  # ClipSpec.to_dict(): model, weights id, sha256, quick_gelu, meaningless, ...
    clip_identity: dict  # ClipSpec.identity(): what must match for vectors to be comparable
    has_text: bool  # False for timm encoders: no caption or prompt vectors
    embed_dim: int
    decoder: dict  # {"cpu": DECODER_ID, "gpu": GPU decoder id or None}
    patch_rule: dict  # PatchRule.to_dict() plus its "id"
    prompts: list[str]  # the prompt bank, fixed into the store
    preprocessing: dict = field(default_factory=dict)  # how global and local crops are made (for humans)
    semspai_version: str = ""

    def identity(self) -> dict:
        """The parts a second run must share with the store to add shards to it."""
        return {
            "clip": self.clip_identity,
            "decoder": self.decoder,
            "patch_rule": self.patch_rule.get("id"),
            "prompts_sha256": prompts_digest(self.prompts),
        }

    def to_attrs(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "semspai_version": self.semspai_version,
            "clip": self.clip,
            "clip_identity": self.clip_identity,
            "has_text": self.has_text,
            "embed_dim": self.embed_dim,
            "decoder": self.decoder,
            "patch_rule": self.patch_rule,
            "prompts": self.prompts,
            "prompts_sha256": prompts_digest(self.prompts),
            "preprocessing": self.preprocessing,
            "shards": {},
        }


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def _attrs_identity(attrs: dict) -> dict:
    return {
        "clip": attrs.get("clip_identity"),
        "decoder": attrs.get("decoder"),
        "patch_rule": (attrs.get("patch_rule") or {}).get("id"),
        "prompts_sha256": attrs.get("prompts_sha256"),
    }


def check_identity(path: str, have: dict, want: dict, advice: str = "") -> None:
    """Raise unless the store's setup `have` is `want`; `advice` (default: a new store, or the store's own setup)
    says what to do."""
    diffs = [f"{k}: store has {a!r}, asked for {b!r}" for k, a, b in leaf_differences(have, want)]
    if diffs:
        # the CPU decoder and the patch rule are this semspai version's own: no option asks for another one
        fixed = any(d.startswith(("decoder.cpu", "patch_rule")) for d in diffs)
        advice = advice or "extract into a new --store" + ("" if fixed else ", or ask for the store's own setup")
        raise FeatureStoreError(f"feature store {path} was made with another setup ({'; '.join(diffs)}); {advice}")


def limit_zarr_concurrency(n: int) -> None:
    """Cap Zarr's own async and thread concurrency (many Dask threads x Zarr's defaults oversubscribe)."""
    zarr.config.set({"async.concurrency": n, "threading.max_workers": n})


@contextlib.contextmanager
def writer_lock(path: str) -> Iterator[None]:
    """One writing run at a time per store on this machine: a second one fails at once, naming the first.

    The lock is `PATH.lock` beside the store (`run_lock`). Remote (fsspec URL) stores are not locked.
    """
    if "://" in path and not path.startswith("file://"):
        yield
        return
    lock = lock_beside(path.removeprefix("file://"))

    def busy(holder: str) -> FeatureStoreError:
        return FeatureStoreError(
            f"feature store {path} is being written by another extract-clip or store drop ({holder}, lock {lock}); "
            "wait for it to finish, or stop it: a rerun resumes where it stopped"
        )

    with run_lock(lock, busy):
        yield


def _zopen(path: str, mode: str) -> zarr.Group:
    # fsspec's local filesystem makes no parent folders unless asked (Zarr's own LocalStore does)
    options = {"auto_mkdir": True} if path.startswith("file://") else None
    return zarr.open_group(path, mode=mode, storage_options=options)


def _open_root(path: str, mode: str) -> zarr.Group:
    try:
        return _zopen(path, mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        hint = (  # a folder of something else (shards, say) is a wrong path, not a store to make there
            "is that the store's path?" if os.path.isdir(path) and any(os.scandir(path))
            else f"run `semspai extract-clip --store {path}` first"
        )  # fmt: skip
        raise FeatureStoreError(f"no feature store at {path}; {hint}") from exc


def read_store_attrs(path: str) -> dict | None:
    """The root attrs of a finished store at `path`, or None when there is none (or its creation died)."""
    try:
        attrs = _zopen(str(path), mode="r").attrs.asdict()
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    return attrs if is_finished(attrs) else None


# what a finished store's root and a done shard's marker hold: earlier semspai wrote them key by key, so a kill could
# leave some without the rest, which readers take for an unfinished creation or shard (redone by the next run)
# (what StoreHeader.to_attrs and mark_done write; each ends with the key every version wrote last)
ROOT_KEYS = ("schema_version", "semspai_version", "clip", "clip_identity", "has_text", "embed_dim", "decoder",
             "patch_rule", "prompts", "prompts_sha256", "preprocessing", "shards")  # fmt: skip
DONE_KEYS = ("done", "shard", "sha256", "n_samples", "n_images", "skipped", "writer")  # `chunks` since 2026-11-28


def is_finished(attrs: dict) -> bool:
    """Whether a store's root attrs are those of a finished creation."""
    return all(k in attrs for k in ROOT_KEYS)


def is_done(attrs: dict) -> bool:
    """Whether a shard group's attrs are a whole done marker."""
    return bool(attrs.get("done")) and all(k in attrs for k in DONE_KEYS)


def _chunk_rows(row_bytes: int, n: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(1, row_bytes)))


@dataclass
class ShardFeatures:
    """One shard's extracted rows, ready to write (n images kept, `skipped` unreadable ones)."""

    name: str
    sha256: str  # of the tar the rows came from
    n_samples: int  # samples in the tar, kept + skipped
    keys: list[str]
    label: np.ndarray  # (n,) int8
    generator: list[str]
    split: list[str]
    width: np.ndarray  # (n,) int32, decoded size after EXIF orientation
    height: np.ndarray  # (n,) int32
    global_: np.ndarray  # (n, D) float16
    local: np.ndarray  # (rows, D) float16
    local_offsets: np.ndarray  # (n + 1,) int64
    boxes: np.ndarray  # (rows, 4) int32
    caption: np.ndarray | None  # (n, D) float16, zero rows where the sample has no caption
    caption_mask: np.ndarray | None  # (n,) bool
    skipped: list[dict]  # {"key", "reason"} for unreadable images

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "global": self.global_,
            "local": self.local,
            "local_offsets": self.local_offsets,
            "boxes": self.boxes,
            "key": np.asarray(self.keys, dtype=str),
            "label": self.label,
            "generator": np.asarray(self.generator, dtype=str),
            "split": np.asarray(self.split, dtype=str),
            "width": self.width,
            "height": self.height,
        }
        if self.caption is not None:
            out["caption"], out["caption_mask"] = self.caption, self.caption_mask
        return out


def sidecar_fields(meta: dict) -> tuple[int, str, str]:
    """Label, generator and split of a shard sidecar, as the store holds them ("" where absent)."""
    return int(meta["label"]), str(meta.get("generator") or ""), str(meta.get("split") or "")


def _put(group: zarr.Group, name: str, arr: np.ndarray) -> None:
    """Create one array holding `arr`, chunked along rows only."""
    if arr.dtype.kind == "U":
        # dtype=str is Zarr's spec'd variable-length "string"; numpy's fixed "<U" is not (unstable warning)
        a = group.create_array(name, shape=arr.shape, dtype=str, chunks=(_chunk_rows(64, len(arr)),), config=ALL_CHUNKS)
        if len(arr):
            a[:] = arr
        return
    row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    chunks = (_chunk_rows(row_bytes, arr.shape[0]), *arr.shape[1:])
    a = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks, config=ALL_CHUNKS)
    if arr.size:
        a[...] = arr


def check_new_store_path(path: str) -> None:
    """Raise unless a store may be made at `path` (a folder or an fsspec URL): new or empty, or a store's own
    (one whose creation died); not a file, nor a folder or prefix of something else (shards, images)."""
    import fsspec

    try:
        fs, where = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError):  # no filesystem for that URL here: Zarr's own open says so
        return
    if fs.isfile(where):
        raise FeatureStoreError(f"--store {path} is a file; a feature store is a folder (or a URL)")
    if fs.isdir(where) and fs.ls(where, detail=False) and not fs.exists(f"{where.rstrip('/')}/zarr.json"):
        raise FeatureStoreError(
            f"--store {path} is a folder of something else, not a feature store; give a new or empty folder"
        )


class FeatureStoreWriter:
    """Creates or extends a store. The driver writes the root; each shard task writes its own group."""

    def __init__(self, path: str) -> None:
        self.path = str(path)

    @classmethod
    def create_or_check(cls, path: str, header: StoreHeader, text: np.ndarray | None) -> FeatureStoreWriter:
        """Make the store with `header` (and the (K, D) prompt vectors), or check an existing one matches."""
        path = str(path)
        attrs = read_store_attrs(path)
        if attrs is not None:
            if attrs["schema_version"] != SCHEMA_VERSION:
                raise FeatureStoreError(
                    f"feature store {path} has schema version {attrs['schema_version']}, this semspai writes "
                    f"{SCHEMA_VERSION}; extract into a new --store"
                )
            check_identity(path, _attrs_identity(attrs), header.identity())
            return cls(path)
        check_new_store_path(path)
        root = _zopen(path, mode="a")
        root.require_group(SHARDS_GROUP)
        if TEXT_ARRAY in root:  # left by a creation that died before its attrs
            del root[TEXT_ARRAY]
        if header.has_text:
            if text is None:
                raise ValueError("a store with a text tower needs its prompt vectors")
            _put(root, TEXT_ARRAY, text.astype(np.float16))
        # attrs last, in one write of the root's metadata (zarr's attrs.update would write key by key): a store
        # without them all is an unfinished creation that the next run redoes
        root.update_attributes(header.to_attrs())
        return cls(path)

    def record_shards(self, shards: dict[str, str]) -> None:
        """Record shard name -> tar path of every shard asked for (driver only), so `info` can list missing ones."""
        root = _zopen(self.path, mode="r+")
        recorded = dict(root.attrs.get("shards", {}))
        recorded.update({n: os.path.abspath(p) for n, p in shards.items()})  # where they are, from any directory
        root.update_attributes({"shards": dict(sorted(recorded.items()))})

    def done_shards(self) -> dict[str, str]:
        """Done shard name -> the sha256 of the tar it was extracted from."""
        return {name: attrs["sha256"] for name, attrs in _shard_attrs(self.path).items() if is_done(attrs)}

    def write_rows(self, features: ShardFeatures) -> None:
        """Write a shard's arrays into its group (replacing an unfinished one); not visible until `mark_done`."""
        root = _zopen(self.path, mode="r+")
        shards = root[SHARDS_GROUP]
        if features.name in shards:
            if is_done(shards[features.name].attrs.asdict()):
                raise FeatureStoreError(f"shard {features.name} is already done in {self.path}; it is never rewritten")
            log.info("shard %s: replacing an unfinished group left by an interrupted run", features.name)
        clear_shard_group(root, features.name)  # an unfinished group, or what a killed delete left of one
        group = shards.create_group(features.name)
        group.update_attributes({"done": False, "shard": features.name, "sha256": features.sha256})
        for name, arr in features.arrays().items():
            _put(group, name, arr)

    def mark_done(self, features: ShardFeatures) -> None:
        """The done marker, written last in one write of the group's metadata (zarr's attrs.update would write key
        by key, and a kill between them left `done` without the rest): from here on readers see the shard."""
        group = _zopen(self.path, mode="r+")[SHARDS_GROUP][features.name]
        group.update_attributes(
            {
                "done": True,
                "shard": features.name,
                "sha256": features.sha256,
                "n_samples": features.n_samples,
                "n_images": len(features.keys),
                "skipped": features.skipped,
                # every chunk file written: how many each array has (readers check none is missing)
                "chunks": {name: a.nchunks for name, a in group.arrays()},
                "writer": {"pid": os.getpid(), "host": socket.gethostname()},
            }
        )


def clear_shard_group(root: zarr.Group, name: str) -> None:
    """Delete everything under shards/NAME: its arrays first, the group's own metadata last, so that a run killed
    meanwhile leaves an unfinished group (no done marker: the next extraction replaces it) or nothing."""
    prefix = f"{SHARDS_GROUP}/{name}/"

    async def clear() -> None:
        members = {k[len(prefix) :].split("/", 1)[0] async for k in root.store.list_prefix(prefix)}
        for member in sorted(members - {"zarr.json"}):
            await root.store.delete_dir(prefix + member)
        await root.store.delete_dir(prefix)

    sync(clear())


class ShardChangedError(FeatureStoreError):
    """A tar changed in place since it was extracted (not damaged since sharding, not another folder's tar):
    `semspai store drop` and a rerun of extract-clip bring its vectors up to date."""


def drop_shards(path: str, names: Iterable[str]) -> list[str]:
    """Remove shards from the store at `path` (under its writer lock), so that the next extract-clip extracts them
    again: each one's done marker goes first (readers stop seeing it), then its arrays. A name the store does not
    hold is an error and nothing is dropped. Returns the names dropped, sorted."""
    names = sorted(set(names))
    with writer_lock(path):
        root = _open_root(path, "r+")
        if not is_finished(root.attrs.asdict()):
            raise FeatureStoreError(f"{path} is no finished feature store (no store attributes); nothing dropped")
        held = set(root[SHARDS_GROUP].group_keys()) if SHARDS_GROUP in root else set()
        absent = [n for n in names if n not in held]
        if absent:
            raise FeatureStoreError(f"feature store {path} holds no shard {absent[0]}"
                                    + (f" (nor {len(absent) - 1} more)" if len(absent) > 1 else "")
                                    + f"; nothing dropped (`semspai store info {path}` lists its shards)")  # fmt: skip
        for name in names:
            with contextlib.suppress(ValueError, OSError, json.JSONDecodeError):  # a damaged group goes all the same
                root[f"{SHARDS_GROUP}/{name}"].update_attributes({"done": False})
            clear_shard_group(root, name)
    return names


def changed_shards(path: str, tars: list[Path]) -> list[str]:
    """Names of the shards among `tars` whose tar changed in place since it was extracted into the store at `path`
    (what `drop_shards` then drops for re-extraction). A tar damaged since sharding, or another folder's tar
    of a name the store holds, raises: re-extracting it would store what is wrong."""
    done = done_shard_attrs(path)
    recorded = (read_store_attrs(path) or {}).get("shards", {})
    ours = [t for t in tars if shard_name(t) in done]
    changed = []
    for tar, sha in tar_sha256s(ours).items():
        name = shard_name(tar)
        try:
            check_shard_unchanged(path, name, done[name]["sha256"], sha, tar, recorded.get(name, ""))
        except ShardChangedError:
            changed.append(name)
    return sorted(changed)


def _shard_attrs(path: str) -> dict[str, dict]:
    """Shard group name -> its attrs, for every group under shards/ (done or not), sorted by name."""
    root = _open_root(path, "r")
    if SHARDS_GROUP not in root:
        return {}
    shards = root[SHARDS_GROUP]
    out = {}
    for name in sorted(shards.group_keys()):
        try:
            out[name] = shards[name].attrs.asdict()
        except (ValueError, OSError, json.JSONDecodeError) as exc:
            # a run killed while writing the group's metadata: unfinished, like any group without `done`
            log.warning("shard group %s in %s is unreadable (%s); treating it as not done", name, path, exc)
            out[name] = {}
    return out


REBUILD = (
    "drop the damaged shard (`semspai store drop STORE NAME`) and rerun `semspai extract-clip` to extract it again"
)
# the prompt vectors are written once, when the store is made: no rerun rewrites them
REBUILD_TEXT = "restore the store's text/ folder from a copy, or extract into a new --store"


def read_array(group: zarr.Group, name: str, where: str) -> np.ndarray:
    """All of array `name` of `group` (at `where`), or a FeatureStoreError: for damage (no metadata, a chunk that
    does not decode), saying how to rebuild it; for other I/O errors (access rights, a remote store's network),
    without that advice, as the data may be whole."""
    try:
        return group[name][...]
    except (KeyError, FileNotFoundError, RuntimeError, ValueError) as exc:
        advice = REBUILD_TEXT if name == TEXT_ARRAY else REBUILD
        raise FeatureStoreError(f"{where}/{name} is damaged ({type(exc).__name__}: {exc}); {advice}") from exc
    except OSError as exc:
        raise FeatureStoreError(
            f"{where}/{name} could not be read ({exc}); check access to the store, or retry"
        ) from exc


def damaged_arrays(path: str, done: dict[str, dict]) -> list[str]:
    """`shards/NAME/ARRAY: what` for each array of the done shards (name -> attrs) that is gone or lacks chunk
    files, and `text: what` for the prompt vectors; from one listing of the store and no chunk read (shards of
    older stores, which recorded no chunk counts, have their arrays' metadata read for them)."""
    root = _zopen(path, mode="r")
    arrays, files = set(), Counter()  # "NAME/ARRAY" (or "text") with metadata; its chunk files
    for key in _list_keys(root):
        parts = key.split("/")  # shards, NAME, ARRAY, then zarr.json or c/...; or text, then zarr.json or c/...
        head, rest = ("/".join(parts[1:3]), parts[3:]) if parts[0] == SHARDS_GROUP else (parts[0], parts[1:])
        if rest[:1] == ["zarr.json"]:
            arrays.add(head)
        elif rest[:1] == ["c"]:
            files[head] += 1

    def lacking(where: str, have: int, want: int) -> list[str]:
        return [f"{where}: {want - have} of its {want} chunk files are missing"] if have < want else []

    problems = lacking(TEXT_ARRAY, files[TEXT_ARRAY], root[TEXT_ARRAY].nchunks) if TEXT_ARRAY in arrays else []
    for name in sorted(done):
        chunks = done[name].get("chunks")
        if chunks is None:  # an older store: only arrays whose chunks are never all fill values are sure to exist
            group = root[SHARDS_GROUP][name]
            chunks = {a: group[a].nchunks for a in NEVER_FILL_ONLY if f"{name}/{a}" in arrays}
        for array, want in sorted(chunks.items()):
            where = f"{SHARDS_GROUP}/{name}/{array}"
            if f"{name}/{array}" not in arrays:
                problems.append(f"{where}: missing")
            else:
                problems += lacking(where, files[f"{name}/{array}"], want)
    return problems


def _list_keys(root: zarr.Group) -> list[str]:
    """Every key of `root`'s store (Zarr's store API is async)."""

    async def keys() -> list[str]:
        return [k async for k in root.store.list_prefix("")]

    return sync(keys())


def damage_error(path: str, damaged: list[str], listed: str = "") -> FeatureStoreError:
    """`listed`: where the others are listed (default: by `store info`)."""
    listed = listed or f"`semspai store info {path}` lists them"
    more = f" (and {len(damaged) - 1} more: {listed})" if len(damaged) > 1 else ""
    advice = REBUILD_TEXT if damaged[0].startswith(TEXT_ARRAY) else REBUILD
    return FeatureStoreError(f"feature store {path} is damaged: {damaged[0]}{more}; {advice}")


def undecodable_arrays(path: str, done: dict[str, dict]) -> list[str]:
    """`shards/NAME/ARRAY: what` for each array of the done shards (name -> attrs), and `text: what` for the prompt
    vectors, holding a chunk that does not decode: every chunk is read (what `damaged_arrays`' listing cannot see)."""
    root = _zopen(path, mode="r")
    arrays = [(root, TEXT_ARRAY, TEXT_ARRAY)] if TEXT_ARRAY in root else []
    for name in sorted(done):
        group = root[SHARDS_GROUP][name]
        arrays += [(group, a, f"{SHARDS_GROUP}/{name}/{a}") for a in sorted(group.array_keys())]
    problems = []
    for group, array, where in arrays:
        try:
            read_array(group, array, where)
        except FeatureStoreError as exc:
            problems.append(f"{where}: a chunk does not decode ({type(exc.__cause__).__name__}: {exc.__cause__})")
    return problems


def done_marker(path: str, name: str) -> dict | None:
    """Shard `name`'s attrs when it is done in the store at `path` (its group's metadata alone is read)."""
    try:
        attrs = _zopen(path, mode="r")[f"{SHARDS_GROUP}/{name}"].attrs.asdict()
    except (KeyError, FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None
    return attrs if is_done(attrs) else None


def done_shard_attrs(path: str) -> dict[str, dict]:
    """Done shard name -> its attrs (sha256, n_images, skipped, ...), from the attributes alone (no array read)."""
    return {name: a for name, a in _shard_attrs(path).items() if is_done(a)}


def stored_keys(path: str, done: dict[str, dict], threads: int = 8) -> dict[str, str]:
    """Key -> shard of every row and every skipped image of the done shards (name -> attrs, as
    `done_shard_attrs` gives them), reading only their key arrays (in threads: on a remote store each read is
    a round trip)."""
    root = _zopen(path, mode="r")[SHARDS_GROUP]
    names = sorted(done)

    def keys(name: str) -> list[str]:
        return read_array(root[name], "key", f"{path}/{SHARDS_GROUP}/{name}").tolist()

    with ThreadPoolExecutor(threads) as pool:
        owner = {k: name for name, ks in zip(names, pool.map(keys, names), strict=True) for k in ks}
    owner |= {s["key"]: name for name in names for s in done[name].get("skipped", []) if "key" in s}
    return owner


class FeatureStore:
    """Read-only view of a store: the done shards (or those of them named at `open`), concatenated in shard-name
    order.

    Global vectors and metadata are loaded at open (about 1 KiB per image at D=512). Local rows are read
    per shard on first use and kept in memory: about P x D x 2 bytes per image (10 KiB for 5 patches at
    D=512; 16 GiB for 1.6M images); `preload_local(spill_dir)` memory-maps them from copies instead.
    """

    def __init__(self, path: str, attrs: dict, shard_attrs: dict[str, dict]) -> None:
        self.path = path
        self.attrs = attrs
        self.clip_spec: dict = attrs["clip"]
        self.has_text: bool = bool(attrs["has_text"])
        self.embed_dim: int = int(attrs["embed_dim"])
        self.done_shards: list[str] = [n for n, a in shard_attrs.items() if is_done(a)]
        self.recorded_shards: dict[str, str] = dict(attrs.get("shards", {}))
        self.unfinished_shards: list[str] = [n for n, a in shard_attrs.items() if not is_done(a)]
        self.shard_info: dict[str, dict] = {n: shard_attrs[n] for n in self.done_shards}
        self.skipped: list[dict] = [
            {"shard": n, **s} for n in self.done_shards for s in shard_attrs[n].get("skipped", [])
        ]
        counts = [int(shard_attrs[n]["n_images"]) for n in self.done_shards]
        # image i of the store lives in shard s where starts[s] <= i < starts[s + 1]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.n_images = int(self._starts[-1])
        self.meta: dict[str, np.ndarray] = self._load_meta(counts)
        self.keys: list[str] = self.meta.pop("key").tolist()
        self._index: dict[str, int] | None = None
        self._global: np.ndarray | None = None
        self._local: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._caption: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def open(
        cls,
        path: str,
        expect_clip: dict | None = None,
        expect_decoder: dict | None = None,
        expect_patch_rule: str | None = None,
        check: bool = True,
        advice: str = "",
        shards: Collection[str] | None = None,
    ) -> FeatureStore:
        """Open a store for reading; each `expect_*` given must equal the store's (else FeatureStoreError), and
        with `check` no array of a done shard may lack a chunk file (`damaged_arrays`). `advice`: what a
        mismatch's message tells to do. `shards`: the names of the only shards to read (a run's view of a store
        that holds other data sets too: their damage, memory and load time are none of its business)."""
        path = str(path)
        root = _open_root(path, "r")
        attrs = root.attrs.asdict()
        if not is_finished(attrs):
            raise FeatureStoreError(
                f"{path} is not a finished feature store (no schema attributes); rerun extract-clip"
            )
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise FeatureStoreError(
                f"feature store {path} has schema version {attrs['schema_version']}; this semspai reads {SCHEMA_VERSION}"
            )
        have, want = _attrs_identity(attrs), {}
        for key, value in (("clip", expect_clip), ("decoder", expect_decoder), ("patch_rule", expect_patch_rule)):
            if value is not None:
                want[key] = value
        check_identity(path, {k: have[k] for k in want}, want, advice)
        shard_attrs = _shard_attrs(path)
        if shards is not None:
            wanted = set(shards)
            shard_attrs = {n: a for n, a in shard_attrs.items() if n in wanted}
        if check:
            damaged = damaged_arrays(path, {n: a for n, a in shard_attrs.items() if is_done(a)})
            if damaged:
                raise damage_error(path, damaged)
        return cls(path, attrs, shard_attrs)

    def _group(self, s: int) -> zarr.Group:
        return _zopen(self.path, mode="r")[SHARDS_GROUP][self.done_shards[s]]

    def _read(self, s: int, name: str, group: zarr.Group | None = None) -> np.ndarray:
        where = f"{self.path}/{SHARDS_GROUP}/{self.done_shards[s]}"
        return read_array(self._group(s) if group is None else group, name, where)

    def _load_meta(self, counts: list[int]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("key", "label", "generator", "split", "width", "height")}
        for s in range(len(self.done_shards)):
            g = self._group(s)
            for k in parts:
                a = self._read(s, k, g)
                # Zarr returns numpy's StringDType, which does not cast to "<U" directly
                parts[k].append(np.array(a.tolist(), dtype=str) if k in STR_ARRAYS else a)
        meta = {k: np.concatenate(v) if v else np.zeros(0, dtype=str) for k, v in parts.items()}
        meta["shard"] = np.repeat(np.asarray(self.done_shards, dtype=str), counts)
        meta["label"] = meta["label"].astype(np.int8)
        for k in ("width", "height"):
            meta[k] = meta[k].astype(np.int32)
        return meta

    def index_of(self, key: str) -> int:
        if self._index is None:
            index = {k: i for i, k in enumerate(self.keys)}
            if len(index) != len(self.keys):
                dup = next(k for k in self.keys if self.keys.count(k) > 1)
                raise FeatureStoreError(f"feature store {self.path}: key {dup} appears in more than one row")
            self._index = index
        try:
            return self._index[key]
        except KeyError:
            raise FeatureStoreError(
                f"sample {key} is not in feature store {self.path}; extract its shard (semspai extract-clip)"
            ) from None

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.n_images:
            raise IndexError(f"image {i} out of range for a store of {self.n_images} images")
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return s, i - int(self._starts[s])

    def _concat(self, name: str) -> np.ndarray:
        parts = [self._read(s, name) for s in range(len(self.done_shards))]
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float16)

    def global_vectors(self) -> np.ndarray:
        """(N, D) float16, L2-normalised, in reader order; loaded once."""
        if self._global is None:
            self._global = self._concat("global")
        return self._global

    def _shard_local(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if s not in self._local:
            g = self._group(s)
            # (rows, D) float16, (rows, 4) int32, (n + 1,) int64
            self._local[s] = (self._read(s, "local", g), self._read(s, "boxes", g), self._read(s, "local_offsets", g))
        return self._local[s]

    def local_nbytes(self) -> int:
        """Bytes of every shard's local rows once read (from the arrays' metadata; nothing is read)."""
        return sum(int(self._group(s)["local"].nbytes) for s in range(len(self.done_shards)))

    def preload_local(self, spill_dir: str | Path | None = None) -> None:
        """Read every shard's local rows now (training touches them all anyway).

        With `spill_dir`, each shard's rows are written there as .npy, one shard at a time, and memory-mapped
        instead of held: for stores larger than memory, whose pages the OS then reads (ahead) on demand and
        shares between DataLoader workers. Boxes and offsets (small) stay in memory either way.
        """
        for s, name in enumerate(self.done_shards):
            local, boxes, offsets = self._shard_local(s)
            if spill_dir is not None:  # one shard's rows in memory at a time, then only their map
                path = Path(spill_dir) / f"{s:06d}-{name}.npy"
                np.save(path, local)
                self._local[s] = (np.load(path, mmap_mode="r"), boxes, offsets)

    def local_vectors(self, i: int) -> np.ndarray:
        """(P_i, D) float16: image i's patch vectors in grid-box order."""
        s, j = self._locate(i)
        local, _, offsets = self._shard_local(s)
        return local[offsets[j] : offsets[j + 1]]

    def boxes(self, i: int) -> np.ndarray:
        """(P_i, 4) int32 patch boxes x0, y0, x1, y1 of image i, matching `local_vectors(i)` row by row."""
        s, j = self._locate(i)
        _, boxes, offsets = self._shard_local(s)
        return boxes[offsets[j] : offsets[j + 1]]

    def caption_vector(self, i: int) -> np.ndarray | None:
        """(D,) float16 for an image with a caption; None without a caption or a text tower."""
        if not self.has_text:
            return None
        if self._caption is None:
            mask = [self._read(s, "caption_mask") for s in range(len(self.done_shards))]
            self._caption = (self._concat("caption"), np.concatenate(mask) if mask else np.zeros(0, bool))
        vectors, mask = self._caption
        self._locate(i)
        return vectors[i] if mask[i] else None

    def prompt_vectors(self) -> np.ndarray | None:
        """(K, D) float16 vectors of the prompt bank; None without a text tower."""
        if not self.has_text:
            return None
        return read_array(_zopen(self.path, mode="r"), TEXT_ARRAY, self.path)

    def prompts(self) -> list[str]:
        return list(self.attrs.get("prompts", []))

    def check_shards(self, paths: Iterable[str | Path], tar_shas: dict[str, str] | None = None) -> None:
        """Raise if a tar among `paths` that the store holds changed since it was extracted (`tar_shas`: the
        tars' sha256 by str(path), when already hashed)."""
        for path in paths:
            name = shard_name(path)
            if name in self.shard_info:
                sha = self.shard_info[name]["sha256"]
                now = tar_shas[str(path)] if tar_shas is not None else file_sha256(path)
                check_shard_unchanged(self.path, name, sha, now, path, self.recorded_shards.get(name, ""))


def check_shard_unchanged(store: str, name: str, stored_sha: str, tar_sha: str, path: str | Path,
                          was_at: str = "") -> None:  # fmt: skip
    """Raise unless the tar at `path` is the one extracted as shard `name` (`was_at`: where that one was)."""
    if stored_sha == tar_sha:
        return
    shas = f"sha256 {stored_sha[:12]}… then, {tar_sha[:12]}… now"
    try:
        sharded = indexed_sha256([Path(path)]).get(str(Path(path)), "")
    except ShardError:  # its folder's index.json is unreadable: the checks below still say what is wrong
        sharded = ""
    if sharded and sharded != tar_sha:  # damaged or changed since `semspai shard` wrote it, whatever the store
        raise FeatureStoreError(
            f"shard {name}: {path} is not the tar `semspai shard` wrote ({INDEX_NAME} recorded sha256 "
            f"{sharded[:12]}…, it has {tar_sha[:12]}… now): damaged or changed since. Restore it, or rerun the "
            "`semspai shard` that made its folder with --force (the same sources give the same tars)"
        )
    # stores of an earlier semspai recorded paths as given, relative to a working directory unknown here
    if os.path.isabs(was_at) and was_at != os.path.abspath(path):
        raise FeatureStoreError(
            f"shard {name}: {path} is not the tar extracted under that name into {store} ({was_at}; {shas}). "
            "Shard folders that share a store need tars of other names (shard the later one with --prefix NAME); "
            "else extract into a new --store"
        )
    raise ShardChangedError(
        f"shard {name} ({path}) changed since it was extracted into {store} ({shas}); `semspai store drop {store} "
        f"{name}` (or `--changed SPEC` for every such shard), then rerun `semspai extract-clip`, extracts it again"
    )


def _norm_problems(what: str, vectors: np.ndarray) -> list[str]:
    """`vectors` (R, D): every row finite and of unit norm (within float16 rounding)."""
    if not len(vectors):
        return []
    v = vectors.astype(np.float32)
    if not np.isfinite(v).all():
        return [f"{what}: {int((~np.isfinite(v).all(axis=1)).sum())} rows hold NaN or inf"]
    bad = np.abs(np.linalg.norm(v, axis=1) - 1) > NORM_TOLERANCE
    return [f"{what}: {int(bad.sum())} rows are not unit vectors (|norm - 1| > {NORM_TOLERANCE})"] if bad.any() else []


def verify_store(
    store: FeatureStore, shard_paths: list[Path], expected_boxes: Callable[[int, int], np.ndarray] | None = None
) -> list[str]:
    """Problems found checking `store` against the tars it was made from (empty: consistent).

    Every sample of every tar is a row or a listed unreadable image, exactly once; the tar is the one
    extracted (sha256); shapes, offsets and norms are sane; with `expected_boxes(height, width)`, each
    image's boxes are exactly the patch rule's.
    """
    damaged = damaged_arrays(store.path, store.shard_info)
    if damaged:  # what the arrays hold in their place is fill values: checking those would only add noise
        return damaged
    problems: list[str] = []
    shard_col = store.meta["shard"]
    seen: dict[str, str] = {}
    for key, shard in zip(store.keys, shard_col, strict=True):
        if key in seen:
            problems.append(f"key {key} is stored twice (shards {seen[key]} and {shard})")
        seen[key] = shard
    for path in shard_paths:
        name = shard_name(path)
        if name not in store.shard_info:
            problems.append(f"shard {name} ({path}) is not done in the store; run semspai extract-clip on it")
            continue
        try:
            store.check_shards([path])
            sidecars = {s.key: s.meta for s in iter_shard(path)}
        except (FeatureStoreError, ValueError) as exc:
            problems.append(str(exc))
            continue
        tar_keys = list(sidecars)
        rows = np.flatnonzero(shard_col == name)
        have = [store.keys[i] for i in rows]
        for i in rows:  # the metadata beside the vectors is the sidecar's
            key = store.keys[i]
            stored = (int(store.meta["label"][i]), str(store.meta["generator"][i]), str(store.meta["split"][i]))
            if key in sidecars and stored != sidecar_fields(sidecars[key]):
                problems.append(f"shard {name}: image {key} is stored as label, generator, split {stored}; its tar "
                                f"says {sidecar_fields(sidecars[key])}")  # fmt: skip
                break
        have += [s["key"] for s in store.skipped if s["shard"] == name]
        missing, extra = sorted(set(tar_keys) - set(have)), sorted(set(have) - set(tar_keys))
        if missing:
            problems.append(f"shard {name}: {len(missing)} samples missing from the store, e.g. {missing[0]}")
        if extra:
            problems.append(f"shard {name}: {len(extra)} stored keys are not in the tar, e.g. {extra[0]}")
        if len(have) != len(set(have)) or len(tar_keys) != len(set(tar_keys)):
            problems.append(f"shard {name}: a key appears more than once (rows + skipped vs tar)")
    d = store.embed_dim
    g = store.global_vectors()
    if g.shape != (store.n_images, d):
        problems.append(f"global: shape {g.shape}, expected {(store.n_images, d)}")
    problems += _norm_problems("global", g)
    for s, name in enumerate(store.done_shards):
        local, boxes, offsets = store._shard_local(s)
        n = int(store._starts[s + 1] - store._starts[s])
        if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(local) or (np.diff(offsets) < 1).any():
            problems.append(f"shard {name}: local_offsets are not 0 .. {len(local)} rising by >= 1 per image")
            continue
        if local.shape[1:] != (d,) or boxes.shape != (len(local), 4):
            problems.append(f"shard {name}: local {local.shape} / boxes {boxes.shape} do not fit D={d}")
            continue
        problems += _norm_problems(f"shard {name}: local", local)
        if expected_boxes is not None:
            start = int(store._starts[s])
            for j in range(n):
                h, w = int(store.meta["height"][start + j]), int(store.meta["width"][start + j])
                if not np.array_equal(boxes[offsets[j] : offsets[j + 1]], expected_boxes(h, w)):
                    problems.append(f"shard {name}: image {store.keys[start + j]} boxes differ from the patch rule")
                    break
    if store.has_text:
        for i in range(store.n_images):
            c = store.caption_vector(i)
            if c is not None:
                problems += _norm_problems(f"caption of {store.keys[i]}", c[None])
        problems += _norm_problems("text (prompt vectors)", store.prompt_vectors())
    return problems


def is_export(path: Path) -> bool:
    """Whether `path` is an HDF5 file `export_h5` wrote."""
    import h5py

    if not h5py.is_hdf5(path):
        return False
    with h5py.File(path, "r") as f:
        return "semspai_store" in f.attrs


def export_h5(store: FeatureStore, out: str | Path) -> Path:
    """Write the reader's view (done shards, concatenated) to one HDF5 file; renamed into place when complete."""
    import h5py

    out = Path(out)
    if not out.parent.is_dir():
        raise FeatureStoreError(f"export-h5: the folder of {out} does not exist; create it first")
    store.preload_local()
    parts = [store._shard_local(s) for s in range(len(store.done_shards))]
    local = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, store.embed_dim), np.float16)
    boxes = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 4), np.int32)
    # per-shard offsets shifted by the rows of the shards before: one (N + 1,) index into `local`
    row_base = np.cumsum([0] + [len(p[0]) for p in parts])
    offsets = [np.zeros(1, np.int64)] + [p[2][1:] + row_base[s] for s, p in enumerate(parts)]
    str_type = h5py.string_dtype()
    with replacing(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["semspai_store"] = json.dumps(store.attrs, ensure_ascii=False)
        f.create_dataset("global", data=store.global_vectors())
        f.create_dataset("local", data=local)
        f.create_dataset("local_offsets", data=np.concatenate(offsets))
        f.create_dataset("boxes", data=boxes)
        f.create_dataset("key", data=np.asarray(store.keys, dtype=object), dtype=str_type)
        for k, v in store.meta.items():
            f.create_dataset(
                k, data=v.astype(object) if v.dtype.kind == "U" else v, dtype=str_type if v.dtype.kind == "U" else None
            )
        if store.has_text:
            cap = [store.caption_vector(i) for i in range(store.n_images)]
            f.create_dataset("caption_mask", data=np.array([c is not None for c in cap], dtype=bool))
            zero = np.zeros(store.embed_dim, np.float16)
            f.create_dataset(
                "caption",
                data=np.stack([zero if c is None else c for c in cap])
                if cap
                else np.zeros((0, store.embed_dim), np.float16),
            )
            f.create_dataset("text", data=store.prompt_vectors())
        f.create_dataset(
            "skipped", data=np.asarray([json.dumps(s) for s in store.skipped], dtype=object), dtype=str_type
        )
    return out
