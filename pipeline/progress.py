"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise (CI logs, pipes), nothing in a
process told to be quiet (a DDP rank other than 0: rank 0 reports for all)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")
log = logging.getLogger("semspai.progress")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int) -> None:
    """semspai's records of `level` and above to stderr in semspai's format; other libraries' (open_clip's INFO
    narration of every model build, say) from WARNING, or from DEBUG too when `level` is DEBUG. The handler is
    added only when this process has none (its first `logging.warning()` would set Python's bare format)."""
    logging.basicConfig(
        level=level if level <= logging.DEBUG else logging.WARNING, format=LOG_FORMAT, stream=sys.stderr
    )
    logging.getLogger("semspai").setLevel(level)


_quiet = False


def quiet_progress(quiet: bool = True) -> None:
    """No bar and no progress lines from this process (its log records still go where logging sends them)."""
    global _quiet
    _quiet = quiet


def progress(
    items: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    status: Callable[[], str] | None = None,
) -> Iterator[T]:
    """Iterate `items`, showing a bar on a terminal or logging about every 10% (and at the end) otherwise.

    `status()`, asked after each item, adds a line of its own (e.g. images/s) to the bar and the log lines. While
    the bar runs, log records are written above it rather than through it.
    """
    if _quiet:
        yield from items
        return
    if sys.stderr.isatty():
        with logging_redirect_tqdm():
            bar = tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)
            for item in bar:
                yield item
                if status is not None:
                    bar.set_postfix_str(status(), refresh=False)
        return
    start, step, next_mark, n = time.perf_counter(), max(1, (total or 0) // 10), 0, 0

    def line() -> str:
        rate = n / max(time.perf_counter() - start, 1e-9)
        return f"{rate:.1f} {unit}/s" + (f", {status()}" if status is not None else "")

    for n, item in enumerate(items, 1):
        yield item
        if total and next_mark + step <= n < total:  # the last item gets the `done` line
            next_mark = n
            log.info("%s: %d/%d %s (%s)", desc, n, total, unit, line())
    log.info("%s: done, %d %s (%s)", desc, n, unit, line())
