"""Test set-up: eight virtual CPU devices, float32 matmuls at full precision, and a persistent
compilation cache shared by the pytest workers and the binaries the tests start.

Most of the suite's time is XLA compiling the same small programs again (every resume test
compiles its run twice; subprocess tests compile what the parent already compiled). The cache
keys on the program, the compile options, the devices and the jax version, so a hit returns the
executable a fresh compile would build. It lives in `.pytest_cache/jax`, is kept between local
runs and pruned to its newest 512 MiB when it passes 1 GiB; `MOE_JAX_TEST_CACHE=` (empty) turns it
off and `MOE_JAX_TEST_CACHE=DIR` moves it. Only programs that took 0.25 s or more to compile are
cached (op-by-op dispatch compiles thousands of tiny ones). No size bound is given to jax: with one
it rescans the whole directory on every write. Without its lock a read that races a write of the
same entry fails to decompress, which jax reports as a warning before compiling afresh.
"""
import os
import pathlib

# XLA's LLVM back end at -O0: the suite's time is mostly compiling small programs, and their
# matmuls run in precompiled Eigen code either way (the suite's CPU time fell by about a fifth).
# HLO optimisation is unchanged. The binaries the tests start get the same flags (binary_env).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_CACHE = os.environ.get("MOE_JAX_TEST_CACHE",
                        str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"))


def binary_env(devices: int = 1) -> dict:
    """The environment for a binary a test starts: CPU, `devices` virtual devices, FAST_COMPILE, and
    (inherited from this process) the shared compilation cache."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


def _prune(cache: pathlib.Path, high: int = 1 << 30, low: int = 1 << 29) -> None:
    """Deletes the oldest entries once the cache holds more than `high` bytes, down to `low`."""
    stats = [(p.stat(), p) for p in cache.glob("*") if p.is_file()]
    entries = sorted((st.st_mtime, st.st_size, p) for st, p in stats)
    total = sum(size for _, size, _ in entries)
    if total <= high:
        return
    for _, size, path in entries:
        if total <= low:
            break
        path.unlink(missing_ok=True)
        total -= size


if _CACHE:
    # Environment variables, not only jax.config, so the binaries the tests start share the cache.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    if "PYTEST_XDIST_WORKER" not in os.environ and pathlib.Path(_CACHE).is_dir():  # once, in the controller
        _prune(pathlib.Path(_CACHE))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
