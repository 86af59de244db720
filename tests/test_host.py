"""The CLI's allocator settings: large blocks from glibc's heap, kept for reuse; the user's own settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from semspai.pipeline import host
from semspai.stages.cli import cli
from tests.conftest import run_in_own_session

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
pytestmark = pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")

# mallinfo2 (glibc >= 2.33) in a fresh process: bytes in mmapped blocks while 256 MiB are held, then the heap's size
# and its free bytes once they are freed
PROBE = """
import ctypes, json, sys
import numpy as np
from semspai.pipeline.host import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
tuned = tune_malloc() if sys.argv[1] == "tune" else None
block = np.ones(256 << 20, np.uint8)
held = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "mapped": held.hblkhd, "heap": freed.arena, "free": freed.fordblks}))
"""


def probe(*args: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in host.USER_SETTINGS}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    return json.loads(proc.stdout)


def test_large_blocks_come_from_the_heap_and_stay_for_reuse():
    plain = probe("plain")
    assert plain["mapped"] >= 256 << 20  # glibc's default: its own mapping, returned to the OS on free
    tuned = probe("tune")
    assert tuned["tuned"] is True and tuned["mapped"] < 64 << 20  # (blocks mapped before it tuned may stay)
    assert tuned["heap"] >= 256 << 20 and tuned["free"] >= 256 << 20  # freed, and kept for the next batch


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_ARENA_MAX": "4"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=8"},
        {"LD_PRELOAD": "/nowhere/libjemalloc.so.2"},  # the loader warns and goes on: a name to recognise
    ],
)
def test_the_users_own_allocator_settings_win(env):
    result = probe("tune", **env)
    assert result["tuned"] is False and result["mapped"] >= 256 << 20


def test_the_command_tunes_its_own_process_only(tmp_path: Path):
    exe = Path(sys.executable).with_name("semspai")
    env = {k: v for k, v in os.environ.items() if k not in host.USER_SETTINGS}
    proc = subprocess.run([str(exe), "-v", "store", "info", str(tmp_path / "none.zarr")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "host: glibc malloc keeps large blocks for reuse" in proc.stderr, proc.stderr
    CliRunner().invoke(cli, ["-v", "store", "info", str(tmp_path / "none.zarr")])  # in a caller's process (tests)
    assert host.worker_environment() == {}  # this process was left as it was


def test_local_dask_workers_start_with_the_settings_of_a_tuned_command():
    script = """
import json, os
from semspai.pipeline.extraction import DaskDistributor
from semspai.pipeline.host import ENVIRONMENT, tune_malloc

tune_malloc()
dask = DaskDistributor(1)
try:
    seen = dask.client.run(lambda: {k: os.environ.get(k) for k in ENVIRONMENT})
finally:
    dask.close()
print(json.dumps(list(seen.values())))
"""
    env = {k: v for k, v in os.environ.items() if k not in host.USER_SETTINGS and not k.startswith("DASK_")}
    returncode, out, err = run_in_own_session([sys.executable, "-c", script], env, 300, stderr=subprocess.PIPE,
                                              text=True)  # fmt: skip
    assert returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == [host.ENVIRONMENT]
