"""Host memory policy for training processes on CPU: keep freed memory for the next step.

XLA:CPU runs every step of a compiled program on freshly allocated buffers: hundreds of MB at the
tiny scale (one train step of the tiny PR-MoE has 368 MB of temporaries). glibc's malloc serves
allocations that large with mmap and returns them with munmap, so every step the kernel hands out
and zeroes ~100k fresh pages: page faults and system time that were about a quarter of a tiny
run's CPU time. `reuse_freed_memory()` tells malloc to serve everything from one heap
(M_ARENA_MAX=1, M_MMAP_MAX=0) and not to give freed memory back (M_TRIM_THRESHOLD), so the next
step reuses the same pages: page faults fell from 5.6M to 0.5M in experiments/bench_step_time.py
(WORKSPACE.md). The process's resident memory stays at its peak, which is what a training
process holds anyway.

Call it first thing in a binary, before jax creates its threads. It does nothing off glibc, and
MOE_JAX_MALLOC=default turns it off. The experiment binaries call it; a notebook can.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Applies the policy once per process; True when glibc accepted it."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOE_JAX_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave malloc alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20))
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    return _applied
