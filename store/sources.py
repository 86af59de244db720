"""Source listings for `semspai shard`: image folders and CSV manifests -> labelled records, and hash splits."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from semspai.store.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

REAL_NAMES = {"real", "0_real"}
FAKE_NAMES = {"fake", "1_fake"}
LABEL_VALUES = {"real": 0, "0": 0, "fake": 1, "1": 1}
LABEL_NAMES = ("real", "fake")  # by label value
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class SourceError(ValueError):
    """A source folder or manifest cannot be used; the message names the file and the fix."""


@dataclass
class SourceRecord:
    path: Path  # the image file
    origin: str  # stable identity: "<source name>/<path relative to the source>"
    label: int | None  # 0 real, 1 fake, None when not derivable
    generator: str
    caption: str = ""
    split: str = ""  # empty = decided by the group hash
    group: str = ""  # samples of one group never straddle splits; empty = the origin


def printable(path: str | Path) -> str:
    """A path as text: its name's bytes as UTF-8, any byte that is not UTF-8 as `\\xNN` (a file named in another
    encoding is then still a sample, with a stable origin and key, and index.json stays UTF-8)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def sample_key(origin: str) -> str:
    """A dot-free, stable key for WebDataset (a dot would split it into key and extension)."""
    return hashlib.sha256(origin.encode()).hexdigest()[:24]


def label_from_parts(parts: tuple[str, ...]) -> tuple[int | None, str]:
    """Label and generator from a relative path's folder names (DESIGN.md's convention).

    `.../real|fake/<generator>/file` names the generator under the label; ForenSynths'
    `<generator>/0_real|1_fake/file` names it above. The deepest label folder wins.
    """
    folders = parts[:-1]
    for i in range(len(folders) - 1, -1, -1):
        name = folders[i].lower()
        if name in REAL_NAMES or name in FAKE_NAMES:
            label = 0 if name in REAL_NAMES else 1
            if i + 1 < len(folders):
                return label, folders[i + 1]
            if i > 0:
                return label, folders[i - 1]
            return label, "unknown"
    return None, folders[-1] if folders else "unknown"


def _walk(root: Path) -> Iterator[tuple[str, list[str]]]:
    """(folder, file names) of every folder under `root`, each real folder once, hidden ones left out. Linked
    folders are walked after the folders reached without a link, so a folder reached both ways is taken by its own
    path (whose names give its label), not by the link's; a link to a folder already walked (a loop, a second
    name) is said and passed over."""
    walked: dict[str, str] = {}  # real path -> the path it was walked by
    pending = [str(root)]  # the root, then linked folders as they are found
    for top in pending:  # grows as it goes
        for folder, dirs, files in os.walk(top):  # links are not followed here: they are queued
            real = os.path.realpath(folder)
            if real in walked:
                log.warning("%s: a link to %s, walked as %s: its files are taken once, as found there", folder, real,
                            walked[real])  # fmt: skip
                dirs[:] = []
                continue
            walked[real] = folder
            names = sorted(d for d in dirs if not d.startswith("."))
            dirs[:] = [d for d in names if not os.path.islink(os.path.join(folder, d))]
            pending += [os.path.join(folder, d) for d in names if os.path.islink(os.path.join(folder, d))]
            yield folder, files


def image_files(root: str | Path) -> list[Path]:
    """Image files under `root` by extension (IMAGE_EXTENSIONS, any case), sorted. Linked folders are followed
    (each real folder once, by its own path where it has one in `root`: `_walk`); hidden files and folders (.git,
    macOS's ._name.jpg resource forks) are not images of the data set. Files of other extensions are not taken
    either, and a warning counts them by extension, so a folder of .gif or .jfif files is not passed over
    unnoticed."""
    root = Path(root)
    found, others = [], Counter()
    for folder, files in _walk(root):
        for f in files:
            path = Path(folder) / f
            if f.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                others[path.suffix.lower() or "no extension"] += 1
            elif path.is_file():
                found.append(path)
            else:
                log.warning("%s: a broken symlink or not a regular file, skipped", path)
    if others:
        log.warning("%s: %d file(s) left out as not images by their extension (%s); image extensions are %s",
                    root, others.total(), ", ".join(f"{ext} {n}" for ext, n in sorted(others.items(), key=lambda e: (-e[1], e[0]))),
                    " ".join(IMAGE_EXTENSIONS))  # fmt: skip
    return sorted(found)


def scan_folder(root: Path) -> list[SourceRecord]:
    root = Path(root)
    # the folder's own name however it was spelled (`.`, `../ds`, `ds/`): origins, and with them keys and hash
    # splits, must not depend on the working folder; a linked root keeps its own name (not its target's)
    name = Path(os.path.abspath(root)).name
    records = []
    for path in image_files(root):
        rel = path.relative_to(root)
        label, generator = label_from_parts((name, *rel.parts))
        origin = printable(f"{name}/{rel.as_posix()}")
        records.append(SourceRecord(path=path, origin=origin, label=label, generator=printable(generator)))
    return records


def _parse_label(raw: str, where: str) -> int | None:
    value = raw.strip().lower()
    if not value:
        return None
    if value not in LABEL_VALUES:
        raise SourceError(f"{where}: label {raw!r} is not one of real, fake, 0, 1")
    return LABEL_VALUES[value]


def _parse_split(raw: str, where: str) -> str:
    value = raw.strip().lower()
    if not value:
        return ""
    if value not in SPLIT_ALIASES:
        raise SourceError(f"{where}: split {raw!r} is not one of train, val, test")
    return SPLIT_ALIASES[value]


def read_manifest_csv(csv_path: Path) -> list[SourceRecord]:
    """Our manifest (`path,label[,generator][,caption][,split][,group]`) or SPAI's (`image,class,split`).

    Paths are relative to the CSV's folder (absolute paths are kept).
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    raw = csv_path.read_bytes()
    try:  # UTF-8 (with or without a BOM), or UTF-16 with its BOM (what some spreadsheets save as "Unicode text")
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SourceError(f"{csv_path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the manifest as "
                          "UTF-8") from exc  # fmt: skip
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        spai = "image" in fields and "class" in fields
        if not spai and not ("path" in fields and "label" in fields):
            raise SourceError(
                f"{csv_path}: expected columns path,label[,generator][,caption][,split][,group] "
                f"or SPAI's image,class,split; found {','.join(fields) or 'none'}"
            )
        records = []
        for raw_row in reader:
            row = {(k or "").strip().lower(): (v or "") for k, v in raw_row.items()}
            # the reader's own count: blank lines and quoted line breaks make the row index wrong
            where = f"{csv_path}:{reader.line_num}"
            rel = row["image" if spai else "path"].strip()
            if not rel:
                raise SourceError(f"{where}: empty path")
            path = (base / rel) if not Path(rel).is_absolute() else Path(rel)
            label = _parse_label(row["class" if spai else "label"], where)
            generator = row.get("generator", "").strip() or label_from_parts(Path(rel).parts)[1]
            records.append(
                SourceRecord(
                    path=path,
                    origin=f"{csv_path.stem}/{rel}",
                    label=label,
                    generator=generator,
                    caption=row.get("caption", "").strip(),
                    split=_parse_split(row.get("split", ""), where),
                    group=row.get("group", "").strip(),
                )
            )
    return records


def parse_split_ratios(text: str) -> tuple[float, float, float]:
    """`--split` as train, val and test ratios summing to 1; another sum is scaled, with a warning."""
    parts = _split_parts(text)
    total = sum(parts)
    ratios = _normalised(parts)
    if abs(total - 1) > 1e-6:
        log.warning("--split %s sums to %g: taken as %s", text, total, ",".join(f"{r:.3g}" for r in ratios))
    return ratios


def split_ratios(text: str) -> tuple[float, float, float]:
    """`--split` normalised, without logging: equal ratios (`0,0,1`, `0,0,1.0`, `0,0,5`) give equal tuples."""
    return _normalised(_split_parts(text))


def _normalised(parts: list[float]) -> tuple[float, float, float]:
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def _split_parts(text: str) -> list[float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError as exc:
        raise SourceError(f"--split {text!r}: expected three numbers R,R,R (train,val,test), e.g. 0.8,0.1,0.1") from exc
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or sum(parts) <= 0:
        raise SourceError(f"--split {text!r}: expected three non-negative numbers with a positive sum")
    return parts


def hash_split(group: str, ratios: tuple[float, float, float]) -> str:
    """Split by a hash of the group: stable when files are added, and a group never straddles splits."""
    u = int(hashlib.sha256(group.encode()).hexdigest()[:16], 16) / 2**64  # uniform in [0, 1)
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "val"
    return "test"
