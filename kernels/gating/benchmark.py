r"""Fused gating vs the XLA reference router, sweeping S, E and k.

  python -m moe_jax.kernels.gating.benchmark [--quick]

Implementations: the Pallas kernel, the jax-triton kernel (when jax_triton imports), the XLA
reference moe_jax.gating.top_k_gating (the baseline of "vs reference") and this op's own jnp spec.
Bytes are the op's unavoidable traffic: logits (and noise) read, the [S, k] table written. FLOPs
are negligible, so the roofline is HBM bandwidth. Target (reported, not asserted): the fused
kernel >= 5x faster than the XLA reference at S=16384, E=128.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from moe_jax import gating as gating_lib
from moe_jax.kernels import bench_util, platform
from moe_jax.kernels.gating import kernel, reference, triton_kernel
from moe_jax import routing as routing_lib

SHAPES = [(4096, 64, 1), (16384, 128, 1), (16384, 128, 2), (65536, 128, 2), (16384, 16, 2), (16384, 512, 1)]
QUICK_SHAPES = [(16384, 128, 1), (16384, 128, 2)]


def run(shapes=SHAPES, on_record=None) -> list[bench_util.Record]:
    """Times each implementation at each (S, E, k); on_record(record) sees each row as it is measured."""
    records = []
    for num_tokens, num_experts, k in shapes:
        logits = jax.random.normal(jax.random.key(0), (num_tokens, num_experts), jnp.float32)
        noise = jax.random.gumbel(jax.random.key(1), logits.shape) if k == 2 else None
        capacity = routing_lib.compute_capacity(num_tokens, num_experts, 1.0, 4, k)
        shape = f"S={num_tokens} E={num_experts} k={k}"
        bytes_moved = logits.size * 4 * (1 if noise is None else 2) + num_tokens * k * 4 * 4
        impls = {
            "xla reference (moe_jax.gating)": jax.jit(lambda lg, n: gating_lib.top_k_gating(
                lg, k=k, capacity_factor=1.0, second_expert_sampling=n is not None, gumbel=n)),
            "jnp spec (reference.py)": jax.jit(lambda lg, n: reference.fused_gating(lg, n, k=k, capacity=capacity)),
        }
        if platform.on_gpu():
            impls["pallas kernel"] = jax.jit(lambda lg, n: kernel.fused_gating(lg, n, k=k, capacity=capacity))
            if triton_kernel.available():
                impls["jax-triton kernel"] = jax.jit(
                    lambda lg, n: triton_kernel.fused_gating(lg, n, k=k, capacity=capacity))
        baseline = None
        for name, fn in impls.items():
            try:
                ms = bench_util.time_ms(fn, logits, noise)
            except Exception as error:  # one failing implementation must not hide the others
                print(f"{shape} {name}: failed: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
                continue
            baseline = baseline or ms
            records.append(bench_util.Record("gating", shape, name, ms, bytes_moved=bytes_moved,
                                             baseline_ms=baseline))
            if on_record:
                on_record(records[-1])
    return records


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    bench_util.print_table(run(QUICK_SHAPES if "--quick" in argv else SHAPES))


if __name__ == "__main__":
    main()
