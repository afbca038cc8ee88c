r"""Permute into the [E, C, M] buffer and combine back: the kernels vs XLA gathers vs one-hot einsums.

  python -m moe_jax.kernels.dispatch.benchmark [--quick]

For each shape (bfloat16 tokens, top-k routing at capacity factor 1.0): forward permute and
unpermute with the Pallas kernels, with moe_jax.dispatch's gathers (gather_to_buffer /
combine_from_buffer: the "vs reference" baseline) and with DeepSpeed's one-hot einsums; and the
backward of permute + unpermute (kernels vs jax.vjp of the gathers). Bytes: every buffer row
written or read once, every token row read or written once (k times for the combine's reads);
pure data movement, so the roofline is HBM bandwidth.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax import gating as gating_lib
from moe_jax.kernels import bench_util, platform
from moe_jax.kernels.dispatch import ops

SHAPES = [(4096, 64, 1024, 1), (16384, 128, 2048, 1), (16384, 128, 2048, 2), (16384, 32, 4096, 2)]
QUICK_SHAPES = [(16384, 128, 2048, 1)]


def run(shapes=SHAPES, einsum_baseline: bool = True) -> list[bench_util.Record]:
    records = []
    kernel_mode = False if platform.on_gpu() else None  # None: the jnp reference off the GPU
    for num_tokens, num_experts, model_dim, k in shapes:
        logits = jax.random.normal(jax.random.key(0), (num_tokens, num_experts))
        routing = gating_lib.top_k_gating(logits, k=k, capacity_factor=1.0)
        x = jax.random.normal(jax.random.key(1), (num_tokens, model_dim), jnp.bfloat16)
        rows = num_experts * routing.capacity
        out = jax.random.normal(jax.random.key(2), (num_experts, routing.capacity, model_dim), jnp.bfloat16)
        shape = f"S={num_tokens} E={num_experts} C={routing.capacity} M={model_dim} k={k}"
        itemsize = 2
        permute_bytes = (rows + num_tokens * k) * model_dim * itemsize
        combine_bytes = (num_tokens * k + num_tokens) * model_dim * itemsize

        def kernel_permute(x, routing):
            return ops.dispatch_to_buffer(x, routing.expert_index, routing.slot, routing.kept,
                                          num_experts=num_experts, capacity=routing.capacity,
                                          interpret=kernel_mode)

        def kernel_combine(out, routing):
            return ops.combine_from_buffer(out, routing.expert_index, routing.slot, routing.kept,
                                           routing.weight, interpret=kernel_mode)

        def einsum_permute(x, routing):
            _, dispatch_mask = routing.to_dense()
            return jnp.einsum("sec,sm->ecm", dispatch_mask.astype(x.dtype), x)

        def einsum_combine(out, routing):
            combine, _ = routing.to_dense()
            return jnp.einsum("sec,ecm->sm", combine.astype(out.dtype), out)

        def backward(permute, combine):
            def loss(x, out, weight):
                buffer = permute(x, routing)
                y = combine(out * buffer, routing.replace(weight=weight))
                return jnp.sum(y.astype(jnp.float32))
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

        cases = [
            ("permute", dispatch_lib.gather_to_buffer, kernel_permute, einsum_permute, (x, routing), permute_bytes),
            ("unpermute", dispatch_lib.combine_from_buffer, kernel_combine, einsum_combine, (out, routing),
             combine_bytes),
        ]
        for op, reference_fn, kernel_fn, einsum_fn, args, bytes_moved in cases:
            impls = [("xla gather (moe_jax.dispatch)", reference_fn), ("pallas kernel", kernel_fn)]
            if einsum_baseline:
                impls.append(("one-hot einsum", einsum_fn))
            baseline = None
            for name, fn in impls:
                ms = bench_util.time_ms(jax.jit(fn), *args)
                baseline = baseline or ms
                records.append(bench_util.Record(op, shape, name, ms, bytes_moved=bytes_moved,
                                                 baseline_ms=baseline))
        baseline = None
        for name, permute, combine in [
                ("xla gather (moe_jax.dispatch)", dispatch_lib.gather_to_buffer, dispatch_lib.combine_from_buffer),
                ("pallas kernel", kernel_permute, kernel_combine)]:
            ms = bench_util.time_ms(backward(permute, combine), x, out, routing.weight)
            baseline = baseline or ms
            records.append(bench_util.Record("permute+unpermute backward", shape, name, ms,
                                             bytes_moved=2 * (permute_bytes + combine_bytes), baseline_ms=baseline))
    return records


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    bench_util.print_table(run(QUICK_SHAPES if "--quick" in argv else SHAPES))


if __name__ == "__main__":
    main()
