"""Files replaced whole: written under a temporary name of their own beside the target, then renamed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a new file beside `path` to write; once the block ends, it is renamed to `path` in one step, so a
    reader (or a run killed meanwhile) never sees half a file. The temporary name (`NAME.<random>.partial`) is
    created exclusively: a file of the user's that happens to be called `NAME.partial` is never written over.
    On an error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.partial")
        try:
            with open(tmp, "x"):  # exclusive create, with the permissions the umask gives any new file
                break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clear_partials(paths: list[Path]) -> int:
    """Remove the temporary files `replacing` left beside each of `paths` when a run was killed mid-write
    (`NAME.<8 hex digits>.partial`; nothing else, e.g. not a file of the user's called `NAME.partial`). Call it
    only while holding the lock that keeps other runs from writing these outputs; returns how many went."""
    removed = 0
    for path in map(Path, paths):
        pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{8}\.partial")
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(path.parent):
                if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def write_text_atomic(path: str | Path, text: str, errors: str = "strict") -> None:
    """Write `text` as UTF-8 to `path` through `replacing`; `errors="surrogateescape"` writes a file name that is
    no UTF-8 (held in a str as Python holds such names) back as the bytes it is on disk."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=errors)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write `data` as indented, key-sorted JSON to `path` through `replacing`."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
