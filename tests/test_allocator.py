"""Freed memory kept in the process (`kdistill.allocator`): with it, a large tensor allocated
again and again stops costing page faults; without it, each allocation faults its pages in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kdistill import allocator

# a 40 MB block (above glibc's largest automatic mmap threshold, 32 MiB) allocated, written and
# freed 16 times, as an activation is every step; the faults of the last 6 rounds (the first
# ones also grow the heap). Plain ctypes and the module alone: the subprocess starts fast.
PROBE = """
import ctypes, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])  # not kdistill/__init__
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
minor_page_faults, retain_freed_memory = allocator.minor_page_faults, allocator.retain_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
retained = retain_freed_memory() if sys.argv[1] == "retain" else False
size, faults = 40 * 2**20, []
for _ in range(16):
    before = minor_page_faults()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # touch every page, as a tensor being written does
    libc.free(block)
    faults.append(minor_page_faults() - before)
print(json.dumps({"retained": retained, "faults": faults[-6:]}))
"""


def probe(mode: str, **env: str) -> dict:
    environ = {**os.environ, **env}
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "KDISTILL_RETAIN_MEMORY"):
        if key not in env:
            environ.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, allocator.__file__],
        env=environ,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt thresholds are glibc's")


@glibc_only
def test_retained_memory_stops_the_page_faults():
    default = probe("default")
    kept = probe("retain")
    assert not default["retained"] and kept["retained"]
    # 40 MB = 10,240 pages of 4 KiB (20 of 2 MiB with transparent huge pages): every round
    # faults its pages in again (here: 10,241 each); kept, the block is reused (here: 0)
    assert min(default["faults"]) >= 20
    assert max(kept["faults"]) <= 2


@glibc_only
def test_the_opt_out_and_the_users_own_settings_win():
    opted_out = probe("retain", KDISTILL_RETAIN_MEMORY="0")
    assert not opted_out["retained"] and min(opted_out["faults"]) >= 20
    assert not probe("retain", MALLOC_TRIM_THRESHOLD_="1000")["retained"]


def test_why_not_names_the_reason(monkeypatch):
    monkeypatch.setenv("KDISTILL_RETAIN_MEMORY", "off")
    assert allocator.why_not_retained() == "KDISTILL_RETAIN_MEMORY is off"
    assert allocator.retain_freed_memory() is False
    monkeypatch.delenv("KDISTILL_RETAIN_MEMORY")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert "another allocator is preloaded" in allocator.why_not_retained()


def test_minor_page_faults_counts_touched_pages():
    import torch

    before = allocator.minor_page_faults()
    x = torch.empty(64 * 2**20, dtype=torch.uint8)  # fresh mmap: nothing touched yet
    x.fill_(1)
    assert allocator.minor_page_faults() - before >= 64 * 2**20 // (2 * 2**20)  # ≥ 1 per 2 MiB
