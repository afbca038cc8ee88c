"""XLA flags that let a GPU step overlap its collectives with compute; the training binaries add them.

The gradient reduction of data / expert-data parallelism (and ZeRO-1's parameter all-gather) can run
while the backward pass of earlier layers computes, if XLA schedules it so. On GPU that takes the
latency-hiding scheduler (collectives started early, waited on late, on their own stream) and the
pipelining of all-gather / reduce-scatter / all-reduce across the layers; combining small
collectives into large ones keeps each worth the link's latency. XLA:CPU ignores them.

`add_gpu_overlap_flags()` appends to XLA_FLAGS each flag the user has not set (a flag already in
XLA_FLAGS wins), before jax starts: call it at the top of a binary, before importing jax. XLA
aborts at start-up on an unknown flag; every name here is accepted by jaxlib 0.11.2 and 0.12
(tests/test_xla_flags.py starts jax with them). MOE_JAX_XLA_FLAGS=default leaves XLA_FLAGS alone.
"""

from __future__ import annotations

import os

COMBINE_BYTES = 128 << 20  # one combined collective per 128 MiB of gradients

GPU_OVERLAP_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": str(COMBINE_BYTES),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(COMBINE_BYTES),
    "xla_gpu_all_gather_combine_threshold_bytes": str(COMBINE_BYTES),
}


def with_gpu_overlap_flags(xla_flags: str) -> str:
    """`xla_flags` with every GPU_OVERLAP_FLAGS entry it does not already set appended."""
    present = {part.lstrip("-").split("=", 1)[0] for part in xla_flags.split()}
    added = [f"--{name}={value}" for name, value in GPU_OVERLAP_FLAGS.items() if name not in present]
    return " ".join([xla_flags.strip(), *added]).strip()


def add_gpu_overlap_flags() -> bool:
    """Adds the flags to os.environ["XLA_FLAGS"] (module docstring). False when turned off."""
    if os.environ.get("MOE_JAX_XLA_FLAGS", "") == "default":
        return False
    os.environ["XLA_FLAGS"] = with_gpu_overlap_flags(os.environ.get("XLA_FLAGS", ""))
    return True
