"""Freed memory kept in the process, so that large activations stop costing page faults.

glibc's malloc serves a block above its mmap threshold (128 KiB at first, rising with the
blocks freed, at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when it is
freed; free memory at the top of its heap is given back beyond the trim threshold. A training
step allocates the same large tensors every time (the classic teacher's first activation is
25.7 MB at batch 128), so each step maps them anew: one minor page fault per 4 KiB page
touched, with the kernel zeroing each page — about 17,000–19,000 faults and a quarter of the
classic teacher's forward (measured in `bench/`, see docs/speed.md).

`retain_freed_memory()` raises both thresholds with ``mallopt(3)`` in the running process:
blocks up to `MMAP_THRESHOLD` come from the heap and are reused, and up to `TRIM_THRESHOLD` of
free heap stays mapped. The same settings before a process starts are the environment variables
``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=536870912`` (which glibc reads at
start-up); a preloaded allocator (jemalloc, tcmalloc via ``LD_PRELOAD``) keeps freed memory too.
The price: the process keeps up to about `TRIM_THRESHOLD` of freed memory resident.

The ``kdistill`` command calls it at start (torchrun workers run the command too); a program
that embeds `kd.fit` calls `kd.retain_freed_memory()` once (or sets the variables). It does
nothing, and returns False, where the C library is not glibc, when ``KDISTILL_RETAIN_MEMORY=0``
(the opt-out), when the user set the ``MALLOC_*_THRESHOLD_`` variables (theirs win), or when
another allocator is preloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys

MMAP_THRESHOLD = 256 * 2**20  # bytes: blocks below this come from the heap (and are reused)
TRIM_THRESHOLD = 512 * 2**20  # bytes: free heap kept mapped up to this
OPT_OUT = "KDISTILL_RETAIN_MEMORY"
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_GLIBC_MMAP_MAX = 32 * 2**20  # the largest mmap threshold older glibc versions accept


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such function)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def why_not_retained() -> str | None:
    """Why `retain_freed_memory` would do nothing here (None when it would act)."""
    if os.environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT} is off"
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return "MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set in the environment"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"another allocator is preloaded ({preload})"
    if _glibc() is None:
        return "the C library is not glibc"
    return None


def retain_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Set glibc's mmap and trim thresholds for this process (see the module docstring);
    True when set. Thresholds in bytes; call it before training (it affects later
    allocations). Where glibc refuses an mmap threshold above 32 MiB (versions before 2.35),
    32 MiB is used."""
    if why_not_retained() is not None:
        return False
    libc = _glibc()
    assert libc is not None
    if not libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)):
        if not libc.mallopt(_M_MMAP_THRESHOLD, min(int(mmap_threshold), _GLIBC_MMAP_MAX)):
            return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def minor_page_faults() -> int:
    """Minor page faults of this process so far (``getrusage().ru_minflt``): count them
    before and after a step."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
