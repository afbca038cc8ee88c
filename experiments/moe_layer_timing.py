"""One MoE layer at the paper's sizes on a GPU, per dispatch path, against the dense FFN of the same
active FLOPs: the layer section of experiments/bench_kernels.py and of experiments/gpu_check.py.

Top-1, capacity factor 1.0, bfloat16. Paths: einsum (DeepSpeed's one-hot), gather (the mapping
table), kernel (Pallas permute + grouped matmul), "kernel + fused gating" (the kernel path with the
fused gating kernel as its router), "dropless + Pallas gmm" (dispatch_dropless(impl="pallas")) and
dropless (ragged_dot). "dense FFN" is one FFN of the
expert's size per token: the FLOPs a top-1 layer must do, with no routing and no data movement.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax import moe as moe_lib
from moe_jax.config import MoEConfig
from moe_jax.kernels import bench_util

# (name, tokens S, experts E, model dim M, FFN dim F)
LAYERS = [("350M+MoE-128", 16384, 128, 1024, 4096), ("1.3B+MoE-128", 16384, 128, 2048, 8192)]
# dropless last: on an H200 (jax 0.11.2) its jax.lax.ragged_dot ran at 2% of the bf16 peak
LAYER_PATHS = ("einsum", "gather", "kernel", "kernel + fused gating", "dropless + Pallas gmm", "dropless")
DENSE = "dense FFN"


def layer_params(num_experts, model_dim, ffn_dim):
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "gate": {"kernel": jax.random.normal(keys[0], (model_dim, num_experts)) * 0.02},
        "experts": {
            "w1": (jax.random.normal(keys[1], (num_experts, model_dim, ffn_dim), jnp.bfloat16) * 0.02),
            "b1": jnp.zeros((num_experts, ffn_dim), jnp.bfloat16),
            "w2": (jax.random.normal(keys[2], (num_experts, ffn_dim, model_dim), jnp.bfloat16) * 0.02),
            "b2": jnp.zeros((num_experts, model_dim), jnp.bfloat16),
        },
    }


def _forward_fn(path: str, moe: MoEConfig):
    if path == DENSE:
        def dense(params, x):  # expert 0's weights as the dense FFN: the same shapes and FLOPs per token
            mlp = {name: w[0] for name, w in params["experts"].items()}
            return moe_lib.dense_mlp(mlp, x), jnp.float32(0)
        return dense
    if path == "dropless + Pallas gmm":  # the dropless path with dispatch_dropless(impl="pallas")
        def dropless_pallas(params, x):
            routing = moe_lib.route(params["gate"], x, moe=moe, train=True, rng=None, drop_tokens=False)
            return dispatch_lib.dispatch_dropless(x, routing, params["experts"], impl="pallas"), routing.aux_loss
        return dropless_pallas
    fused = path == "kernel + fused gating"
    layer_moe = dataclasses.replace(moe, router_impl="kernel") if fused else moe
    layer_path = "kernel" if fused else path

    def forward(params, x):
        y, stats = moe_lib.moe_forward(params, x, moe=layer_moe, train=True, path=layer_path)
        return y, stats["aux_loss"]
    return forward


def run_layers(layers, deadline: float, *, paths=LAYER_PATHS, directions=("forward", "forward+backward"),
               with_dense: bool = False, on_record=None) -> list[bench_util.Record]:
    """Measures each layer, direction and path until time.perf_counter() passes `deadline`. Off GPU
    the kernel paths are left out (they would time the kernels' jnp references). With with_dense,
    each row's note gives its time over the dense FFN's (measured first). on_record(record) sees
    each row as it is measured."""
    records = []
    on_gpu = jax.default_backend() == "gpu"
    # off GPU the kernel paths would time the kernels' references ("dropless + Pallas gmm" runs them
    # too: a rehearsal of its wiring in the GPU check's dry run, not a measurement)
    paths = [p for p in paths if on_gpu or not p.startswith("kernel")]
    for name, num_tokens, num_experts, model_dim, ffn_dim in layers:
        params = layer_params(num_experts, model_dim, ffn_dim)
        x = jax.random.normal(jax.random.key(1), (num_tokens, model_dim), jnp.bfloat16)
        moe = MoEConfig(experts=num_experts, k=1, capacity_factor=1.0, min_capacity=4, use_rts=False)
        shape = f"{name}: S={num_tokens} E={num_experts} M={model_dim} F={ffn_dim}"
        # Useful FLOPs: one expert FFN per token (top-1); the weights are read at least once.
        flops = 2 * 2 * num_tokens * model_dim * ffn_dim
        weight_bytes = 2 * 2 * num_experts * model_dim * ffn_dim
        for direction in directions:
            baseline, dense_ms = None, None
            for path in ([DENSE] if with_dense else []) + list(paths):
                if time.perf_counter() > deadline:
                    print(f"{shape} {path} {direction}: skipped, out of time", file=sys.stderr)
                    continue
                forward = _forward_fn(path, moe)
                if direction == "forward":
                    fn = jax.jit(forward)
                else:
                    def loss(params, x, forward=forward):
                        y, aux = forward(params, x)
                        return jnp.mean(jnp.square(y.astype(jnp.float32))) + 0.01 * aux
                    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
                try:
                    ms = bench_util.time_ms(fn, params, x, repeats=5)
                except Exception as error:
                    print(f"{shape} {path} {direction}: failed: {type(error).__name__}: {str(error)[:300]}",
                          file=sys.stderr)
                    continue
                if path == DENSE:
                    dense_ms = ms
                else:
                    baseline = baseline or ms
                scale = 1 if direction == "forward" else 3  # backward: twice the forward's matmuls
                note = f"{ms / dense_ms:.2f}x the dense FFN" if dense_ms and path != DENSE else ""
                records.append(bench_util.Record(f"MoE layer {direction}", shape, path, ms,
                                                 bytes_moved=scale * (weight_bytes if path != DENSE
                                                                      else weight_bytes / num_experts),
                                                 flops=scale * flops,
                                                 baseline_ms=None if path == DENSE else baseline, note=note))
                if on_record:
                    on_record(records[-1])
    return records
