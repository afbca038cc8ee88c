"""The host memory policy: freed buffers are reused, not handed back and faulted in again."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees a 64 MB buffer 20 times; prints the minor page faults that took.
_PROGRAM = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
from moe_jax import host_memory
applied = host_memory.reuse_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20

def touch_and_free():
    pointer = libc.malloc(size)
    ctypes.memset(pointer, 1, size)
    libc.free(pointer)

touch_and_free()  # warm up: the heap grows once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    touch_and_free()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

def _faults(policy: str):
    env = {**os.environ, "MOE_JAX_MALLOC": policy}
    out = subprocess.run([sys.executable, "-c", _PROGRAM.format(root=ROOT)], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")
def test_freed_buffers_are_reused_without_page_faults():
    applied, reused = _faults("reuse")
    assert applied
    skipped, fresh = _faults("default")
    assert not skipped
    pages = 20 * (64 << 20) // 4096  # every buffer faulted in afresh: 20 x 16384 pages
    assert fresh > 0.5 * pages
    assert reused < 0.05 * pages
