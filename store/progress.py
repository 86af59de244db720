"""Work kept as it is done: a JSON-lines file whose first line says whose it is, then one row a line, appended and
flushed row by row, so a killed run loses at most the row being written and a rerun with --resume goes on."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from semspai.store.atomic import write_text_atomic
from semspai.store.manifest import StaleOutputError


def file_state(path: str | Path) -> list[int] | None:
    """[size, mtime_ns] of a file (None when it cannot be read): a row is reused on --resume only while its file
    is as it was scored."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def row_line(row: dict) -> str:
    return json.dumps(row) + "\n"


def read_progress(path: Path, kind: str, fields: Sequence[str], command: str) -> tuple[dict, list[dict]]:
    """(header, rows) of the progress file at `path`; a last line cut short by a kill is dropped.

    `kind` is the header's `semspai` value; a file without it is refused (FileExistsError: it is not ours, and
    left as it is). A damaged row, or one missing any of `fields`, is a StaleOutputError. `command` names the
    command in messages (e.g. "predict")."""
    lines = path.read_bytes().split(b"\n")
    try:
        header = json.loads(lines[0])
        ok = isinstance(header, dict) and header.get("semspai") == kind
    except ValueError:
        ok = False
    if not ok:
        raise FileExistsError(f"{path} exists and is not the progress of a `semspai {command}`; it is left as it is: "
                              "remove it or choose another --out")  # fmt: skip
    rows = []
    for n, line in enumerate(lines[1:-1], start=2):  # lines[-1]: b"" after a whole last row, else a cut one
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise StaleOutputError(f"{path}: line {n} is damaged ({exc}); delete the file to start over") from exc
        missing = [k for k in fields if not isinstance(row, dict) or k not in row]
        if missing:
            raise StaleOutputError(f"{path}: line {n} is not a row a {command} of this semspai keeps (no "
                                   f"{', '.join(missing)}); delete the file to start over")  # fmt: skip
        rows.append(row)
    return header, rows


def begin_progress(path: Path, header: dict, kept: Iterable[dict]) -> TextIO:
    """Write `header` and the rows kept from before (whole, replacing the file in one step: a kill meanwhile
    keeps the old one), then return the file open for appending this run's rows (`row_line`, flushed by the
    caller)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, row_line(header) + "".join(row_line(r) for r in kept))
    return path.open("a", encoding="utf-8")


__all__ = ["begin_progress", "file_state", "read_progress", "row_line"]
