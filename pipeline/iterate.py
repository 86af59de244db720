"""Iterator helpers shared by extraction and training: fixed-size batches, threaded maps, a background producer."""

from __future__ import annotations

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
    fn: Callable[[Any], T], items: Iterable[Any], workers: int, inline: Callable[[Any], bool] | None = None
) -> Iterator[T]:
    """`map(fn, items)` on `workers` threads, in input order, with a bounded number of items in flight.

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
            if len(window) >= workers * PREFETCH_PER_WORKER:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def in_background(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` in a producer thread, at most `depth` items ahead of the consumer.

    An exception in the producer is raised in the consumer; a consumer that stops early stops the producer.
    """
    buf: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buf.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buf.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            buf.put(_Failure(exc))

    thread = threading.Thread(target=produce, name="producer", daemon=True)
    thread.start()
    try:
        while True:
            item = buf.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buf.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)
