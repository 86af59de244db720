"""Progress reporting: log lines when piped, a bar on a terminal, silence where INFO is off (DDP ranks > 0)."""

from __future__ import annotations

import io
import logging

import pytest

from semspai.pipeline import progress as progress_mod
from semspai.pipeline.progress import progress, quiet_progress


def test_piped_progress_logs_every_tenth_once_with_the_status(caplog):
    caplog.set_level(logging.INFO, logger="semspai.progress")
    seen = []
    for i in progress(range(20), total=20, desc="job", unit="shard", status=lambda: f"{len(seen)} seen"):
        seen.append(i)
    lines = [r.getMessage() for r in caplog.records if r.name == "semspai.progress"]
    assert seen == list(range(20))
    marks = [m for m in lines if m.startswith("job: ") and "/20 shard" in m]
    assert [m.split()[1] for m in marks] == [f"{n}/20" for n in range(2, 20, 2)]  # 20/20 only as `done`
    assert lines[-1].startswith("job: done, 20 shard (") and lines[-1].endswith(", 20 seen)")
    assert marks[0].endswith(", 2 seen)")  # status is asked after the item was handled


def test_a_quiet_process_shows_no_progress(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="semspai.progress")
    monkeypatch.setattr(progress_mod, "_quiet", False)
    quiet_progress()
    calls = []
    assert list(progress(range(5), total=5, status=lambda: calls.append(1) or "")) == list(range(5))
    assert not caplog.records and not calls


def test_a_terminal_gets_its_bar_without_any_logging_set_up(monkeypatch):
    """A library or notebook user who never configured logging still sees the bar."""
    err = io.StringIO()
    err.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(progress_mod.sys, "stderr", err)
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    list(progress(range(3), total=3, desc="plain"))
    assert "plain: 100%" in err.getvalue()


def test_terminal_bar_shows_the_status_and_keeps_log_lines_whole(monkeypatch):
    err = io.StringIO()
    err.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(progress_mod.sys, "stderr", err)
    root = logging.getLogger()
    handler = logging.StreamHandler(err)
    root.addHandler(handler)
    monkeypatch.setattr(root, "level", logging.INFO)
    try:
        for i in progress(range(3), total=3, desc="bar", unit="img", status=lambda: "12.5 images/s"):
            if i == 1:
                logging.getLogger("semspai.test").info("a log line mid-run")
    finally:
        root.removeHandler(handler)
    text = err.getvalue()
    assert "12.5 images/s" in text and "bar:" in text
    # the record went through tqdm.write: on a line of its own, not glued to a bar's text
    assert any(line == "a log line mid-run" for line in text.replace("\r", "\n").splitlines())


@pytest.mark.parametrize("total", [None, 0])
def test_unknown_total_logs_only_the_end(caplog, total):
    caplog.set_level(logging.INFO, logger="semspai.progress")
    list(progress(iter(range(4)), total=total, desc="x"))
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["x: done, 4 it"]
