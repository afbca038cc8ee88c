"""The GPU overlap flags: added without overriding the user's, and accepted by XLA at start-up."""

import os
import subprocess
import sys

from moe_jax import xla_flags


def test_user_flags_win_and_the_rest_are_added():
    out = xla_flags.with_gpu_overlap_flags("--xla_gpu_enable_pipelined_all_gather=false --xla_dump_to=/tmp/x")
    parts = out.split()
    assert parts[:2] == ["--xla_gpu_enable_pipelined_all_gather=false", "--xla_dump_to=/tmp/x"]
    names = [p.lstrip("-").split("=")[0] for p in parts]
    assert sorted(names) == sorted(set(xla_flags.GPU_OVERLAP_FLAGS) | {"xla_dump_to"})
    assert xla_flags.with_gpu_overlap_flags(out) == out  # idempotent


def _start_jax(flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_xla_accepts_every_flag_at_start_up():
    ok = _start_jax(xla_flags.with_gpu_overlap_flags(""))
    assert ok.returncode == 0 and ok.stdout.strip() == "3.0", ok.stderr[-2000:]
    bad = _start_jax("--xla_gpu_no_such_flag=true")  # the check can fail: XLA aborts on an unknown flag
    assert bad.returncode != 0 and "xla_gpu_no_such_flag" in bad.stderr
