r"""Times one MoE layer per dispatch path on this machine and prints a table.

  python experiments/bench_moe_layer.py [--json FILE] [--tokens=1024,4096,16384] [--experts=8,32,64]

For each tokens S and experts E (M=512, FFN=2048, top-1, cf=1.0, float32): forward and
forward+backward milliseconds of the whole layer (gate, routing, dispatch, experts, combine) for
the einsum, gather and dropless paths, and of a dense FFN with the same FLOPs per token (the
floor: a top-1 MoE layer does one expert FFN per token). Ratios are to the einsum path and to the
dense floor, all measured in the same run. The one-hot einsum path costs O(S^2 * M) (E * C is
about S); the mapping table O(S * k * M).
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import moe as moe_lib  # noqa: E402
from moe_jax.config import MoEConfig  # noqa: E402

flags.DEFINE_string("json", None, "Write the records to this file.")
flags.DEFINE_list("tokens", ["1024", "4096", "16384"], "Token counts S.")
flags.DEFINE_list("experts", ["8", "32", "64"], "Expert counts E.")
flags.DEFINE_list("paths", ["einsum", "gather", "dropless"], "Dispatch paths.")
flags.DEFINE_integer("model_dim", 512, "M.")
flags.DEFINE_integer("ffn_dim", 2048, "F.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the minimum is reported).")


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def layer_params(rng, num_experts, model_dim, ffn_dim):
    keys = jax.random.split(rng, 3)
    return {
        "gate": {"kernel": jax.random.normal(keys[0], (model_dim, num_experts)) * 0.02},
        "experts": {
            "w1": jax.random.normal(keys[1], (num_experts, model_dim, ffn_dim)) * 0.02,
            "b1": jnp.zeros((num_experts, ffn_dim)),
            "w2": jax.random.normal(keys[2], (num_experts, ffn_dim, model_dim)) * 0.02,
            "b2": jnp.zeros((num_experts, model_dim)),
        },
    }


def bench_moe(path, x, params, repeats):
    moe = MoEConfig(experts=params["experts"]["w1"].shape[0], k=1, capacity_factor=1.0, min_capacity=4,
                    use_rts=False, dispatch=path)

    def forward(params, x):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True)
        return y, stats["aux_loss"]

    def loss(params, x):
        y, aux = forward(params, x)
        return jnp.sum(y * y) + 0.01 * aux

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return timed(fwd, params, x, repeats=repeats), timed(fwd_bwd, params, x, repeats=repeats)


def bench_dense(x, model_dim, ffn_dim, repeats):
    keys = jax.random.split(jax.random.key(1), 2)
    mlp = {"w1": jax.random.normal(keys[0], (model_dim, ffn_dim)) * 0.02, "b1": jnp.zeros(ffn_dim),
           "w2": jax.random.normal(keys[1], (ffn_dim, model_dim)) * 0.02, "b2": jnp.zeros(model_dim)}
    fwd = jax.jit(moe_lib.dense_mlp)
    fwd_bwd = jax.jit(jax.grad(lambda p, x: jnp.sum(moe_lib.dense_mlp(p, x) ** 2), argnums=(0, 1)))
    return timed(fwd, mlp, x, repeats=repeats), timed(fwd_bwd, mlp, x, repeats=repeats)


def main(argv):
    del argv
    f = flags.FLAGS
    records = []
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"M={f.model_dim} F={f.ffn_dim} top-1 cf=1.0 float32")
    header = f"{'S':>6} {'E':>4} {'path':>9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd vs einsum':>14} {'fwd+bwd vs einsum':>18} {'fwd+bwd vs dense':>17}"
    print(header)
    print("-" * len(header))
    for num_tokens in map(int, f.tokens):
        x = jax.random.normal(jax.random.key(0), (num_tokens, f.model_dim))
        dense = bench_dense(x, f.model_dim, f.ffn_dim, f.repeats)
        records.append({"S": num_tokens, "E": 0, "path": "dense", "fwd_ms": dense[0], "fwd_bwd_ms": dense[1]})
        for num_experts in map(int, f.experts):
            params = layer_params(jax.random.key(num_experts), num_experts, f.model_dim, f.ffn_dim)
            results = {path: bench_moe(path, x, params, f.repeats) for path in f.paths}
            base = results.get("einsum")
            for path, (fwd, fwd_bwd) in [*results.items(), ("dense", dense)]:
                vs_einsum = (f"{base[0] / fwd:>13.2f}x {base[1] / fwd_bwd:>17.2f}x" if base
                             else f"{'-':>14} {'-':>18}")
                print(f"{num_tokens:>6} {num_experts:>4} {path:>9} {fwd:>9.1f} {fwd_bwd:>11.1f} {vs_einsum} "
                      f"{fwd_bwd / dense[1]:>16.2f}x", flush=True)
                if path != "dense":
                    records.append({"S": num_tokens, "E": num_experts, "path": path, "fwd_ms": fwd,
                                    "fwd_bwd_ms": fwd_bwd})
    if f.json:
        with open(f.json, "w") as out:
            json.dump(records, out, indent=1)
        print(f"wrote {len(records)} records to {f.json}")


if __name__ == "__main__":
    app.run(main)
