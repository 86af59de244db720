"""Iterator helpers: weighted batches, the ordered threaded map and the background producer."""

from __future__ import annotations

import threading
import time

import pytest

from semspai.pipeline.iterate import batched, batched_by_weight, in_background, ordered_map


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


def test_in_background_yields_everything_and_raises_the_producers_error() -> None:
    assert list(in_background(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("decoder broke")

    got = []
    with pytest.raises(RuntimeError, match="decoder broke"):
        for item in in_background(failing(), depth=2):
            got.append(item)
    assert got == [1]


def test_in_background_stops_its_producer_when_the_consumer_stops() -> None:
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    for item in in_background(endless(), depth=2):
        if item == 3:
            break
    time.sleep(0.3)
    assert threading.active_count() == before  # the producer thread ended
    assert len(produced) <= 3 + 1 + 3  # at most `depth` (+ the one being put) items beyond what was taken
