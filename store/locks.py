"""One run at a time per output: an OS lock (flock) on a file, so a killed run never leaves it held."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path


def lock_beside(path: str | Path) -> Path:
    """`PATH.lock`, beside the output PATH (a folder or a store), however PATH is spelled (`out/`, `.`)."""
    out = Path(os.path.abspath(path))
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def run_lock(lock: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold `lock` for the run; when another process holds it, raise `busy(holder)` at once, `holder` saying
    which process that is. The file is removed when the run ends."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(lock, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise busy(holder) from None
        try:
            if os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()  # the previous holder removed the file after we opened it: lock the new one
    fh.truncate(0)
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
    fh.flush()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        fh.close()
