"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise (CI logs, pipes)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("semspai.progress")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate `items`, showing a bar on a terminal or logging about every 10% (and at the end) otherwise."""
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    start, step, next_mark, n = time.perf_counter(), max(1, (total or 0) // 10), 0, 0
    for n, item in enumerate(items, 1):
        yield item
        if total and n >= next_mark + step:
            next_mark = n
            rate = n / max(time.perf_counter() - start, 1e-9)
            log.info("%s: %d/%d %s (%.1f %s/s)", desc, n, total, unit, rate, unit)
    rate = n / max(time.perf_counter() - start, 1e-9)
    log.info("%s: done, %d %s (%.1f %s/s)", desc, n, unit, rate, unit)
