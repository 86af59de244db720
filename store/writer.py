"""A shard's write into the feature store: its rows, then its done marker, by a writer process of its own.

A shard's Zarr write is mostly Python (about 7 ms of fixed cost an array, twelve arrays a shard): 76-95 us of
CPU an image on the project's 2-core machine, much of it holding the GIL. In a thread of the extracting
process (the in-process run, or a Dask worker) that is GIL time taken from the threads that read, decode and
feed the GPU (README: the host ceiling it bought).

Each extracting process starts one writer process (`writer_process`), a fresh interpreter running `serve`,
not a multiprocessing child: spawn would re-import the caller's main module (a benchmark script imports
torch; an unguarded script would run again), and Dask's worker processes are daemonic. It imports no torch,
so it is ready in well under a second. It gets the parent's import path (not the working folder that `-c`
would put first), and with each request the parent's environment and an absolute store path; a store in the
parent's memory (`memory://`) is written by the parent itself. Requests are pickles on its stdin; replies
are pickles on a pipe of their own that nothing else writes to (its stdout goes to stderr from the first byte
of start-up on); a shard's arrays travel as one copy (about 12 MB for 2,048 images). It logs to the stderr
it shares with its parent, and on Linux dies with its parent (PR_SET_PDEATHSIG), so a killed run leaves at
most one unfinished group per writer, as writes in a thread do, and no writer still at work once the run's
store lock is gone; elsewhere it ends at the end of its input, after the write under way.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
import weakref
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from semspai.store.features import ShardFeatures

log = logging.getLogger(__name__)

# Set to a shard name: SIGKILL the extraction's process group after that shard's rows are written and
# before its done marker (the crash the resume logic must survive; used by the tests).
FAULT_ENV = "SEMSPAI_FAULT_KILL_AFTER_SHARD"
# "process" (default) or "thread": write in the extracting process, e.g. where it may not start processes
# (for an existing Dask cluster, set it in the workers' environment)
WRITER_ENV = "SEMSPAI_STORE_WRITER"
# stores that live in this process's memory: another process would write into a store of its own
PROCESS_LOCAL = ("memory://",)
CHILD_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s (store writer, pid %(process)d): %(message)s"
# the writer process's first lines: the parent's import path, then `serve` with the replies' pipe
_BOOT = "import sys; sys.path[:] = {path!r}; from semspai.store.writer import serve; serve({replies}, {parent})"
_READY, _TAKEN = "ready", "taken"


def write_shard_rows(store: str, features: ShardFeatures, zarr_concurrency: int) -> int:
    """A shard's rows into its group, then its done marker (exactly once per shard), in this process's writer
    process or, where WRITER_ENV says `thread` or the store is in this process's memory, here; the id of the
    process that wrote them."""
    global _UNSTARTABLE
    if not uses_writer_process() or store.startswith(PROCESS_LOCAL):
        return write_here(store, features, zarr_concurrency)
    try:
        return writer_process().call(store, features, zarr_concurrency)
    except WriterNotReached:  # it ended before taking the request (nothing was written): once more, with a new one
        try:
            return writer_process().call(store, features, zarr_concurrency)
        except WriterDidNotStart as exc:  # twice: the next shards fail at once, without trying again
            _UNSTARTABLE = str(exc)
            raise


def uses_writer_process() -> bool:
    mode = os.environ.get(WRITER_ENV, "process")
    if mode not in ("process", "thread"):
        from semspai.store.features import FeatureStoreError

        raise FeatureStoreError(f"{WRITER_ENV}={mode!r}: use process (the default) or thread")
    return mode == "process"


def write_here(store: str, features: ShardFeatures, zarr_concurrency: int) -> int:
    """`write_shard_rows` in this process, whatever WRITER_ENV says (what the writer process runs)."""
    from semspai.store.features import FeatureStoreWriter, limit_zarr_concurrency

    limit_zarr_concurrency(zarr_concurrency)
    writer = FeatureStoreWriter(store)
    writer.write_rows(features)
    if os.environ.get(FAULT_ENV) == features.name:
        log.warning("%s=%s: killing the extraction's process group now (fault injection)", FAULT_ENV, features.name)
        os.killpg(os.getpgid(0), signal.SIGKILL)
    writer.mark_done(features)
    return os.getpid()


class WriterProcessError(RuntimeError):
    """The writer process did not start, or ended or broke off during a request (killed, out of memory)."""


class WriterNotReached(WriterProcessError):
    """The writer process ended (or never started) before it took the request: nothing of it was written."""


class WriterDidNotStart(WriterNotReached):
    """The writer process ended before it was ready."""


class RemoteTraceback(Exception):
    """The writer process's traceback of an error it sent back, attached as that error's cause."""

    def __str__(self) -> str:
        return f"\n(in the store writer process)\n{self.args[0]}"


class WriterProcess:
    """`write_here` in a process of its own, one request at a time (`call`, from any thread)."""

    def __init__(self) -> None:
        self.pid_here = os.getpid()
        self.lock = threading.Lock()
        self.ready = self.broken = False
        read_end, write_end = os.pipe()
        self.replies = os.fdopen(read_end, "rb")
        path = [os.fsdecode(p) for p in sys.path if isinstance(p, (str, bytes, os.PathLike))]
        boot = _BOOT.format(path=path, replies=write_end, parent=self.pid_here)
        started = threading.Event()
        failed: list[BaseException] = []

        def own() -> None:
            # the parent-death signal fires when the *thread* that started the process ends: this one lasts as long
            # as the process it started
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=2, pass_fds=(write_end,)
                )
            except BaseException as exc:
                failed.append(exc)
                return
            finally:
                os.close(write_end)  # the child's copy is the only one: its end is the replies' end
                started.set()
            self.proc.wait()

        threading.Thread(target=own, name="store-writer-process", daemon=True).start()
        started.wait()
        if failed:
            self.replies.close()
            raise WriterProcessError(
                f"could not start the feature store's writer process ({failed[0]}); {WRITER_ENV}=thread writes "
                "in this process instead"
            ) from failed[0]
        _ALL.add(self)

    def alive(self) -> bool:
        return self.pid_here == os.getpid() and not self.broken and self.proc.poll() is None

    def call(self, store: str, features: ShardFeatures, zarr_concurrency: int) -> int:
        assert self.proc.stdin is not None
        name = features.name
        with self.lock:
            if self.broken:
                raise WriterNotReached(f"the feature store's writer process had ended before shard {name}'s write")
            try:
                if not self.ready:
                    self._expect_ready()
                where = store if "://" in store else os.path.abspath(store)  # its working folder may not be ours
                request = (where, features, zarr_concurrency, _most_verbose_level(), dict(os.environ))
                try:
                    pickle.dump(request, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                    self.proc.stdin.flush()
                    taken = pickle.load(self.replies)  # sent before it writes anything
                except (BrokenPipeError, EOFError):
                    raise WriterNotReached(
                        f"the feature store's writer process had ended (exit status {self._exit_status()}) before "
                        f"shard {name}'s write"
                    ) from None
                if taken != (True, _TAKEN):
                    raise pickle.UnpicklingError(f"{taken!r} where the writer process says it took the request")
                ok, value = pickle.load(self.replies)
            except EOFError:
                self.broken = True
                raise WriterProcessError(
                    f"the feature store's writer process ended (exit status {self._exit_status()}) during shard "
                    f"{name}'s write; rerun: a shard without its done marker is written again"
                ) from None
            except (OSError, pickle.UnpicklingError) as exc:
                self._break()  # its pipes may be out of step: no later request goes to it
                raise WriterProcessError(
                    f"shard {name}'s write broke off ({type(exc).__name__}: {exc}); rerun: a shard without its "
                    "done marker is written again"
                ) from exc
            except BaseException:
                self._break()  # whatever it is (a bug, a signal's exception) goes on as it is
                raise
        if not ok:
            error, remote_traceback = value
            raise error from RemoteTraceback(remote_traceback)
        return value

    def _expect_ready(self) -> None:
        try:
            reply = pickle.load(self.replies)
        except Exception:  # the end of its replies (or, from a broken start, anything else)
            reply = None
        if reply != (True, _READY):
            raise WriterDidNotStart(
                f"the feature store's writer process did not start (exit status {self._exit_status()}; what it "
                f"printed is above); {WRITER_ENV}=thread writes in this process instead"
            )
        self.ready = True

    def _exit_status(self) -> int:
        """Its exit status, once it has ended (it closed its replies: it is ending); killed if it does not end."""
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._break()
            return self.proc.wait()

    def _break(self) -> None:
        """No request goes to it any more; it is killed and gone when this returns."""
        self.broken = True
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Ends the process (end of its input) once its write under way is done."""
        with self.lock:
            self._end()

    def _end(self) -> None:
        if self.pid_here != os.getpid():
            return  # a forked copy: the process is its parent's
        with contextlib.suppress(OSError, ValueError):
            if not self.broken:
                pickle.dump(None, self.proc.stdin)  # the end (a forked copy of its stdin would keep EOF away)
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self._break()
        self.replies.close()


_WRITER: WriterProcess | None = None
_WRITER_LOCK = threading.Lock()
_UNSTARTABLE = ""  # why no writer process starts here, once two in a row did not
_ALL: weakref.WeakSet[WriterProcess] = weakref.WeakSet()  # a writer is kept alive by its owner thread until it ends


@atexit.register
def _end_all() -> None:
    for writer in list(_ALL):
        writer._end()  # without the lock: a daemon thread stopped in a call may hold it (nothing else runs now)


def _after_fork_in_child() -> None:
    """A forked child starts its own writer if it writes: its parent's (locks maybe held) are not its own."""
    global _WRITER_LOCK, _WRITER
    _WRITER_LOCK, _WRITER = threading.Lock(), None
    for writer in list(_ALL):
        writer.lock, writer.broken = threading.Lock(), True


os.register_at_fork(after_in_child=_after_fork_in_child)


def writer_process() -> WriterProcess:
    """This process's writer process, started at the first call (and again if it ended); it ends with this
    process. Call it early: it gets ready while this process works."""
    global _WRITER
    with _WRITER_LOCK:
        if _UNSTARTABLE:
            raise WriterDidNotStart(_UNSTARTABLE)
        if _WRITER is None or not _WRITER.alive():
            _WRITER = WriterProcess()
        return _WRITER


def _most_verbose_level() -> int:
    """The lowest level that this process's root or semspai loggers let through: the writer process logs at it."""
    loggers = list(logging.root.manager.loggerDict.items())  # one step: other threads may be adding loggers
    ours = [lg for name, lg in loggers if name.startswith("semspai.") and isinstance(lg, logging.Logger)]
    return min(lg.getEffectiveLevel() for lg in [logging.getLogger(), *ours])


def serve(replies_fd: int, parent: int) -> None:
    """The writer process: requests from stdin, one at a time, each answered on the pipe `replies_fd`, until the
    end of stdin."""
    os.set_inheritable(replies_fd, False)
    replies = os.fdopen(replies_fd, "wb")
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux): SIGKILL when the parent ends
    if os.getppid() != parent:  # it ended before that call
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent ends this process
    logging.basicConfig(format=CHILD_LOG_FORMAT, stream=sys.stderr)
    import semspai.store.features  # noqa: F401 - Zarr and numpy, imported before saying ready

    _reply(replies, (True, _READY))
    requests = sys.stdin.buffer
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        if request is None:  # the parent is done
            return
        store, features, zarr_concurrency, level, environ = request
        _reply(replies, (True, _TAKEN))
        logging.getLogger().setLevel(level)  # as the requesting process's loggers and environment are now
        if environ != os.environ:  # e.g. credentials of a remote store, set after this process started
            os.environ.clear()
            os.environ.update(environ)
        try:
            reply: tuple[bool, object] = (True, write_here(store, features, zarr_concurrency))
        except Exception as exc:
            reply = (False, (exc, traceback.format_exc()))
        _reply(replies, reply)


def _reply(replies: BinaryIO, reply: tuple[bool, object]) -> None:
    try:
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)  # as the parent will: an error that does not come back as itself comes as its text
    except Exception:
        error, remote_traceback = reply[1]  # type: ignore[misc]  # only errors fail to travel
        data = pickle.dumps((False, (RuntimeError(f"{type(error).__name__}: {error}"), remote_traceback)))
    replies.write(data)
    replies.flush()
