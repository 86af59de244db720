"""A shard's write into the feature store: its rows, then its done marker, by a writer process of its own.

A shard's Zarr write is mostly Python (about 7 ms of fixed cost an array, twelve arrays a shard): 130-150 ms
of CPU for 2,048 images on the project's 2-core machine, much of it holding the GIL. In a thread of the
extracting process (the in-process run, or a Dask worker) that is GIL time taken from the threads that read,
decode and feed the GPU: with the writes in a thread, the in-process pipeline's host ceiling here was 4,471
images/s, with them in a writer process 7,324 (benchmarks/extract.py --host-ceiling, medians of 4).

Each extracting process starts one writer process (`writer_process`), `python -m semspai.store.writer`, not a
multiprocessing child: spawn would re-import the caller's main module (a benchmark script imports torch; an
unguarded script would run again), and Dask's worker processes are daemonic. It imports no torch, so it starts
in well under a second. Requests and replies are pickles over its stdin and stdout; a shard's arrays travel as
one copy (about 12 MB for 2,048 images). It logs to the stderr it shares with its parent, and dies with it
(Linux: PR_SET_PDEATHSIG), so a killed run leaves at most one unfinished group per writer, as writes in a
thread do, and no writer still at work once the run's store lock is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading

from semspai import LOG_FORMAT
from semspai.store.features import FeatureStoreWriter, ShardFeatures, limit_zarr_concurrency

log = logging.getLogger(__name__)

# Set to a shard name: SIGKILL the extraction's process group after that shard's rows are written and
# before its done marker (the crash the resume logic must survive; used by the tests).
FAULT_ENV = "SEMSPAI_FAULT_KILL_AFTER_SHARD"
# "thread": write in the calling process (no writer process), e.g. where starting processes is not allowed
WRITER_ENV = "SEMSPAI_STORE_WRITER"


def write_shard_rows(store: str, features: ShardFeatures, zarr_concurrency: int) -> int:
    """A shard's rows into its group, then its done marker (exactly once per shard), in this process's writer
    process or, where WRITER_ENV says `thread`, here; the id of the process that wrote them."""
    if not uses_writer_process():
        return write_here(store, features, zarr_concurrency)
    return writer_process().call(store, features, zarr_concurrency)


def uses_writer_process() -> bool:
    return os.environ.get(WRITER_ENV, "process") != "thread"


def write_here(store: str, features: ShardFeatures, zarr_concurrency: int) -> int:
    """`write_shard_rows` in this process, whatever WRITER_ENV says (what the writer process runs)."""
    limit_zarr_concurrency(zarr_concurrency)
    writer = FeatureStoreWriter(store)
    writer.write_rows(features)
    if os.environ.get(FAULT_ENV) == features.name:
        log.warning("%s=%s: killing the extraction's process group now (fault injection)", FAULT_ENV, features.name)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    writer.mark_done(features)
    return os.getpid()


class WriterProcessError(RuntimeError):
    """The writer process ended without answering (killed, or out of memory)."""


class WriterProcess:
    """`write_here` in a process of its own, one request at a time (`call`, from any thread)."""

    def __init__(self) -> None:
        self.pid_here = os.getpid()
        self.lock = threading.Lock()
        started = threading.Event()

        def own() -> None:
            # the parent-death signal fires when the *thread* that started the process ends: this one lasts as long
            # as the process it started
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            started.set()
            self.proc.wait()

        threading.Thread(target=own, name="store-writer-process", daemon=True).start()
        started.wait()

    def close(self) -> None:
        """Ends the process (EOF on its input) once its write under way is done."""
        with self.lock:
            if self.proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self.proc.stdin.close()
            self.proc.wait()

    def alive(self) -> bool:
        return self.pid_here == os.getpid() and self.proc.poll() is None

    def call(self, store: str, features: ShardFeatures, zarr_concurrency: int) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self.lock:
            try:
                request = (store, features, zarr_concurrency, _most_verbose_level())
                pickle.dump(request, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                self.proc.stdin.flush()
                ok, value = pickle.load(self.proc.stdout)
            except (BrokenPipeError, EOFError):
                raise WriterProcessError(
                    f"the feature store's writer process ended (exit status {self.proc.wait()}) before shard "
                    f"{features.name} was written; rerun to write it"
                ) from None
        if not ok:
            raise value
        return value


_WRITER: WriterProcess | None = None
_WRITER_LOCK = threading.Lock()


def writer_process() -> WriterProcess:
    """This process's writer process, started at the first call (and again if it died); it ends with this
    process. Call it early: the process imports Zarr while this one works."""
    global _WRITER
    with _WRITER_LOCK:
        if _WRITER is None or not _WRITER.alive():
            _WRITER = WriterProcess()
        return _WRITER


def _most_verbose_level() -> int:
    """The lowest level that this process's root or semspai loggers let through: the writer process logs at it."""
    ours = [lg for name, lg in logging.root.manager.loggerDict.items() if name.startswith("semspai.")]
    return min(lg.getEffectiveLevel() for lg in [logging.getLogger(), *ours] if isinstance(lg, logging.Logger))


def _die_with_parent() -> None:
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def _serve() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent ends this process
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the reply pipe
    logging.basicConfig(format=LOG_FORMAT, stream=sys.stderr)
    while True:
        try:
            store, features, zarr_concurrency, level = pickle.load(requests)
        except EOFError:
            return
        logging.getLogger().setLevel(level)  # as the requesting process's loggers are set now
        try:
            reply: tuple[bool, object] = (True, write_here(store, features, zarr_concurrency))
        except Exception as exc:
            reply = (False, exc)
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an exception that does not pickle: its text does
            data = pickle.dumps((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
        replies.write(data)
        replies.flush()


if __name__ == "__main__":
    _serve()
