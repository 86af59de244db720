"""Host settings: glibc's allocator kept from mapping and unmapping each large tensor (the CLI's processes only),
and torch's thread count for a block (`predict --threads`).

By default glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh mmap and returns it to
the OS on free, so each batch's activations (hundreds of MiB at 256 crops) are page-faulted in anew: on the CPU,
the kernel's page zeroing then takes as long as the convolutions. Measured on this project's 2-core machine:
EfficientNet-Lite0 extraction 1.5 -> 5.5 images/s in one process (system time 101 s -> 6 s) and 1.5 -> 4.6 with
two Dask workers; ViT-B-32 1.0 -> 1.2. Large blocks then come from the heap and stay with the process for reuse:
its memory stays at its peak, which it reaches again with every batch anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and their values here: large blocks from the heap, and freed memory at the
# heap's top never returned to the OS (-1: glibc reads the threshold as unsigned)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
SETTINGS = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
# the same as environment variables, which glibc reads when a process starts, for worker processes to be started:
# with one arena too, as their tasks run in threads, and a thread's own arena maps each large block afresh whatever
# the settings (this process computes in its main thread, whose arena is the heap; one arena would slow its
# threads' own allocations down)
ENVIRONMENT = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}
# a user's own allocator settings win: glibc's variables, its tunables, or another allocator preloaded
USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                 "GLIBC_TUNABLES")  # fmt: skip
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_tuned = False


def tune_malloc() -> bool:
    """Serve large blocks from glibc's heap and keep freed memory for reuse, in this process; False (nothing
    changed) off glibc, or where the user chose allocator settings or another allocator. Idempotent."""
    global _tuned
    if _tuned:
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    if any(v in os.environ for v in USER_SETTINGS) or any(a in preload for a in OTHER_ALLOCATORS):
        log.debug("host: the allocator settings of the environment are kept")
        return False
    if not sys.platform.startswith("linux") or not (name := ctypes.util.find_library("c")):
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: no mallopt of glibc's kind
        return False
    _tuned = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS.items())
    log.debug("host: glibc malloc %s", "keeps large blocks for reuse" if _tuned else "left (partly) as it was")
    return _tuned


def worker_environment() -> dict[str, str]:
    """Environment variables for worker processes this one starts: the same settings when it took them."""
    return dict(ENVIRONMENT) if _tuned else {}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block (None: left as they are), and set back after it, so a
    caller's process (a notebook, a test) keeps its own setting."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
