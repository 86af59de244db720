"""Iterator helpers: weighted batches, the ordered threaded map and the background producer."""

from __future__ import annotations

import threading
import time

import pytest

from semspai.pipeline.iterate import Background, batched, batched_by_weight, ordered_map


def test_batched_and_batched_by_weight() -> None:
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    weights = [1, 1, 5, 1, 9, 2, 2]  # 9 alone exceeds the limit: it gets a batch of its own
    assert list(batched_by_weight(weights, 6, lambda w: w)) == [[1, 1], [5, 1], [9], [2, 2]]
    assert list(batched_by_weight([], 6, lambda w: w)) == []


def test_ordered_map_keeps_input_order_under_uneven_work() -> None:
    def slow_first(i: int) -> int:
        time.sleep(0.02 if i % 3 == 0 else 0)
        return i * i

    assert list(ordered_map(slow_first, range(20), workers=4)) == [i * i for i in range(20)]


def test_background_yields_everything_and_raises_the_producers_error() -> None:
    assert list(Background(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("decoder broke")

    got = []
    with pytest.raises(RuntimeError, match="decoder broke"):
        for item in Background(failing(), depth=2):
            got.append(item)
    assert got == [1]


def test_background_stops_its_producer_when_the_consumer_stops() -> None:
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    for item in Background(endless(), depth=2):
        if item == 3:
            break
    time.sleep(0.3)
    assert threading.active_count() == before  # the producer thread ended
    assert len(produced) <= 3 + 1 + 3  # at most `depth` (+ the one being put) items beyond what was taken


def test_background_starts_at_once_and_close_stops_it_and_drops_what_was_made_ahead() -> None:
    made = threading.Semaphore(0)
    produced = []

    def counting():
        for i in range(100):
            produced.append(i)
            made.release()
            yield i

    ahead = Background(counting(), depth=2)
    assert made.acquire(timeout=10)  # made before anyone asked: the read-ahead extraction relies on this
    for _ in range(2):
        assert made.acquire(timeout=10)
    ahead.close()
    assert not ahead._thread.is_alive() and ahead._buf.empty()  # stopped, and the queued items are gone
    assert len(produced) <= 2 + 1  # `depth` queued and the one being put: none made once stop is asked
    assert list(ahead) == []

    def endless():
        while True:
            yield 0

    dropped = Background(endless(), depth=2)
    thread = dropped._thread
    del dropped  # never iterated, never closed: dropping it stops the producer
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_background_closed_without_waiting_stops_and_empties_itself() -> None:
    """After an interrupt the consumer must not wait for an item in the making: `close(wait=False)` returns at
    once, and the producer stops after that item and drops what it queued."""
    release = threading.Event()

    def slow():
        yield 0
        yield 1
        release.wait()  # the item in the making when the consumer is interrupted
        yield 2
        yield 3

    ahead = Background(slow(), depth=4)
    assert next(ahead) == 0
    ahead.close(wait=False)  # returns although the producer is stuck in `release.wait()`
    assert ahead._thread.is_alive() and list(ahead) == []
    release.set()
    ahead._thread.join(timeout=5)
    assert not ahead._thread.is_alive() and ahead._buf.empty()  # item 1 and item 2 dropped by the producer
