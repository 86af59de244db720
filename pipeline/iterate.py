"""Iterator helpers shared by extraction and training: fixed-size batches, threaded maps, a background producer."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
PREFETCH_PER_WORKER = 4  # items in flight per thread of ordered_map: enough to hide jitter, bounded memory
_DONE = object()


class _Ready:
    """A result computed in the calling thread, in the window beside the futures (a Future costs locks)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of `size` consecutive items; the last one may be shorter."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def batched_by_weight(items: Iterable[T], max_weight: float, weight: Callable[[T], float]) -> Iterator[list[T]]:
    """Lists of consecutive items whose weights add up to at most `max_weight` (an item heavier than that
    alone gets a list of its own); the last list may be lighter."""
    batch: list[T] = []
    total = 0.0
    for item in items:
        w = weight(item)
        if batch and total + w > max_weight:
            yield batch
            batch, total = [], 0.0
        batch.append(item)
        total += w
    if batch:
        yield batch


def ordered_map(
    fn: Callable[[Any], T],
    items: Iterable[Any],
    workers: int,
    inline: Callable[[Any], bool] | None = None,
    ahead: int | None = None,
) -> Iterator[T]:
    """`map(fn, items)` on `workers` threads, in input order, with at most `ahead` items in flight (default
    PREFETCH_PER_WORKER a thread; fewer where each result is large).

    Threads, not processes: Dask workers are daemonic and cannot fork; PIL and torch release the GIL.
    Items for which `inline(item)` holds are mapped in the calling thread: handing an item to a thread costs
    tens of microseconds (far more under GIL contention), more than a cheap `fn` itself.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    window: deque[Future | _Ready] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        for item in items:
            if inline is not None and inline(item):
                window.append(_Ready(fn(item)))
            else:
                window.append(pool.submit(fn, item))
            if len(window) >= (ahead or workers * PREFETCH_PER_WORKER):
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


class Background(Iterator[T]):
    """Iterates `items` in a producer thread, started at once, at most `depth` items ahead of the consumer.

    An exception in the producer is raised in the consumer. `close()` stops the producer, waits for it and drops
    what it made ahead; an object dropped unfinished tells its producer to stop.
    """

    def __init__(self, items: Iterable[T], depth: int) -> None:
        # the thread holds the queue and the flag, never this object: dropping it can stop the producer
        self._buf: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(
            target=_produce, args=(iter(items), self._buf, self._stop), name="producer", daemon=True
        )
        self._thread.start()

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._buf.get()
        if item is _DONE or isinstance(item, _Failure):
            self._finished = True
            if item is _DONE:
                raise StopIteration
            raise item.exc
        return item

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the producer (it notices within 0.1 s, once the item it is making is made), wait for it (at most
        `timeout` seconds), and drop the items it made ahead (device memory, say). Closing again does nothing.
        `wait=False` only tells it to stop; it then drops what it made itself."""
        self._finished = True
        self._stop.set()
        if wait:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                _drain(self._buf)

    def __del__(self) -> None:
        # only the flag: a finaliser may run in any thread, the producer's own included (the cycle collector),
        # where touching the queue could deadlock on its lock; the producer empties the queue itself
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def _produce(items: Iterator[Any], buf: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in items:
            if not _put(buf, item, stop):
                break
        else:
            _put(buf, _DONE, stop)
    except BaseException as exc:  # handed to the consumer, which raises it
        _put(buf, _Failure(exc), stop)
    if stop.is_set():  # nobody takes what is queued: free it now, not when the queue is collected
        _drain(buf)


def _put(buf: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put `item` once there is room; False once `stop` is set (the item is then dropped, and the producer
    makes no further one)."""
    while not stop.is_set():
        try:
            buf.put(item, timeout=0.1)
        except queue.Full:
            continue
        return not stop.is_set()
    return False


def _drain(buf: queue.Queue) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            buf.get_nowait()
