r"""Times one MoE layer per dispatch path on this machine, and the tiny PR-MoE training step.

  python experiments/bench_moe_layer.py [--json FILE] [--tokens=1024,4096,16384] [--experts=8,32,64]
      [--paths=einsum,gather,dropless] [--autodiff] [--tile_divisors=1,4,8] [--model_steps=5]

For each tokens S and experts E (M=512, FFN=2048, top-1, cf=1.0, float32): forward, backward and
forward+backward milliseconds of the whole layer (gate, routing, dispatch, experts, combine) for
each path, and of a dense FFN with the same FLOPs per token (the floor: a top-1 MoE layer does one
expert FFN per token). The backward is timed on its own: a jitted forward returns the VJP closure
(its residuals), a second jit runs it, so bwd is not fwd+bwd - fwd (the fused step can beat the
sum). Ratios are to the einsum path and to the dense floor, all measured in the same run. The
one-hot einsum path costs O(S^2 * M) (E * C is about S); the mapping table O(S * k * M).

With --autodiff, "gather/ad" and "dropless/ad" rows time the same paths with the inverse-map VJPs
off (the autodiff baselines of experiments/dispatch_autodiff.py: scatter-adds), the code before them.

The last lines time the training step (moe_jax.train_lib.train_step under jax.jit, AdamW, batch
16 x 128) of the tiny PR-MoE preset with its default dispatch path, with the inverse-map VJPs and
without, next to the dense tiny model, in tokens per second.

With --tile_divisors=d,..., "dropless@tile/d" rows time the dropless path with row tiles near the
mean group size / d (a power of two, at least 8; moe_jax.experts.default_tile takes d = 2, within
[16, 256]): larger tiles pad more rows, smaller ones make more and smaller matmuls.
"""

import contextlib
import functools
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from experiments import dispatch_autodiff
from moe_jax import config as config_lib
from moe_jax import experts as experts_lib
from moe_jax import moe as moe_lib
from moe_jax import train_lib
from moe_jax.config import MoEConfig

flags.DEFINE_string("json", None, "Write the records to this file.")
flags.DEFINE_list("tokens", ["1024", "4096", "16384"], "Token counts S.")
flags.DEFINE_list("experts", ["8", "32", "64"], "Expert counts E.")
flags.DEFINE_list("paths", ["einsum", "gather", "dropless"], "Dispatch paths.")
flags.DEFINE_bool("autodiff", False, "Also time gather and dropless with autodiff's backward (no custom VJPs).")
flags.DEFINE_list("tile_divisors", [], "Also time dropless with row tiles near mean group size / d, per d.")
flags.DEFINE_integer("model_dim", 512, "M.")
flags.DEFINE_integer("ffn_dim", 2048, "F.")
flags.DEFINE_integer("repeats", 3, "Timed rounds, each path once per round (the minimum is reported).")
flags.DEFINE_string("model", "tiny+pr-moe", "Preset whose training step is timed; empty to skip.")
flags.DEFINE_integer("model_steps", 5, "Timed training steps (the minimum is reported).")
flags.DEFINE_integer("batch", 16, "Training batch size.")
flags.DEFINE_integer("seq_len", 128, "Training sequence length.")

AUTODIFF = "/ad"  # suffix of a path name timed without the inverse-map VJPs
TILE = "@tile/"  # "dropless@tile/4": the dropless path with row tiles near mean group / 4
PARTS = ("fwd", "bwd", "fwd+bwd")


@contextlib.contextmanager
def tile_divisor(divisor: int | None):
    """Traces inside pick dropless row tiles near mean group size / divisor (None: the default)."""
    saved = experts_lib.default_tile
    if divisor is not None:
        experts_lib.default_tile = functools.partial(saved, divisor=divisor, smallest=8, largest=None)
    try:
        yield
    finally:
        experts_lib.default_tile = saved


def race(calls, repeats):
    """{name: (fn, args)} -> {name: best milliseconds}. Every function is compiled first, then the
    repetitions take turns (one call of each per round), so a change in the machine's load while
    they run (these cores are shared) hits all of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e3 for name, seconds in best.items()}


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


def compiled(fn, *args):
    """(fn compiled for args now, args): traced at this point, so under the current VJP switch."""
    return jax.jit(fn).lower(*args).compile(), args


def fwd_bwd_calls(forward, loss, params, x):
    """{fwd, bwd, fwd+bwd: (compiled fn, args)} for forward(params, x) and grad(loss) w.r.t. both."""
    _, pullback = jax.jit(lambda p, x: jax.vjp(loss, p, x))(params, x)
    return {"fwd": compiled(forward, params, x),
            "bwd": compiled(lambda pullback: pullback(jnp.ones((), jnp.float32)), pullback),
            "fwd+bwd": compiled(jax.grad(loss, argnums=(0, 1)), params, x)}


def moe_calls(path, x, params):
    """fwd_bwd_calls of the MoE layer by `path` (a name ending in /ad: without the inverse-map VJPs)."""
    dispatch, _, divisor = path.removesuffix(AUTODIFF).partition(TILE)
    if path.endswith(AUTODIFF):  # the path registered by experiments/dispatch_autodiff.py
        dispatch += dispatch_autodiff.SUFFIX
    moe = MoEConfig(experts=params["experts"]["w1"].shape[0], k=1, capacity_factor=1.0, min_capacity=4,
                    use_rts=False, dispatch=dispatch)

    def forward(params, x):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True)
        return y, stats["aux_loss"]

    def loss(params, x):
        y, aux = forward(params, x)
        return jnp.sum(y * y) + 0.01 * aux

    with tile_divisor(int(divisor) if divisor else None):
        return fwd_bwd_calls(forward, loss, params, x)


def dense_calls(x, model_dim, ffn_dim):
    keys = jax.random.split(jax.random.key(1), 2)
    mlp = {"w1": jax.random.normal(keys[0], (model_dim, ffn_dim)) * 0.02, "b1": jnp.zeros(ffn_dim),
           "w2": jax.random.normal(keys[1], (ffn_dim, model_dim)) * 0.02, "b2": jnp.zeros(model_dim)}
    return fwd_bwd_calls(moe_lib.dense_mlp, lambda p, x: jnp.sum(moe_lib.dense_mlp(p, x) ** 2), mlp, x)


def train_step_call(preset, batch_size, seq_len, use_custom_vjp=True):
    """(compiled training step of a preset, its args); use_custom_vjp=False runs its dispatch path's
    autodiff baseline (experiments/dispatch_autodiff.py)."""
    model_cfg = config_lib.preset(preset)
    if not use_custom_vjp:
        model_cfg = config_lib.replace_moe(model_cfg, dispatch=model_cfg.moe.dispatch + dispatch_autodiff.SUFFIX)
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig())
    state = train_lib.init_state(jax.random.key(0), model_cfg, optimizer)
    tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len + 1), 0, model_cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    args = (state, batch, jax.random.key(2))
    return compiled(functools.partial(train_lib.train_step, model_cfg=model_cfg, optimizer=optimizer), *args)


def main(argv):
    del argv
    f = flags.FLAGS
    records = []
    paths = list(f.paths)
    if f.autodiff:
        paths += [p + AUTODIFF for p in ("gather", "dropless") if p in f.paths]
    if f.tile_divisors and jax.default_backend() != "cpu":
        raise app.UsageError(f"--tile_divisors={','.join(f.tile_divisors)} times the row tiles of the CPU "
                             f"dropless path; on {jax.default_backend()} dropless runs jax.lax.ragged_dot "
                             "without tiles: drop the flag")
    for d in f.tile_divisors:
        if not d.isdigit() or int(d) < 1:
            raise app.UsageError(f"--tile_divisors has {d!r}; each divisor is a positive integer "
                                 "(2 is the default tile)")
    paths += [f"dropless{TILE}{int(d)}" for d in f.tile_divisors]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"M={f.model_dim} F={f.ffn_dim} top-1 cf=1.0 float32")
    header = (f"{'S':>6} {'E':>4} {'path':>16} {'fwd ms':>8} {'bwd ms':>8} {'fwd+bwd ms':>11} "
              f"{'fwd+bwd vs einsum':>18} {'fwd vs dense':>13} {'bwd vs dense':>13} {'fwd+bwd vs dense':>17}")
    print(header)
    print("-" * len(header))
    for num_tokens in map(int, f.tokens):
        x = jax.random.normal(jax.random.key(0), (num_tokens, f.model_dim))
        for num_experts in map(int, f.experts):
            params = layer_params(jax.random.key(num_experts), num_experts, f.model_dim, f.ffn_dim)
            calls = {("dense", part): call for part, call in dense_calls(x, f.model_dim, f.ffn_dim).items()}
            for path in paths:
                calls.update({(path, part): call for part, call in moe_calls(path, x, params).items()})
            ms = race(calls, f.repeats)
            dense = [ms["dense", part] for part in PARTS]
            for path in [*paths, "dense"]:
                fwd, bwd, fwd_bwd = (ms[path, part] for part in PARTS)
                vs_einsum = f"{fwd_bwd / ms['einsum', 'fwd+bwd']:>17.2f}x" if "einsum" in paths else f"{'-':>18}"
                print(f"{num_tokens:>6} {num_experts:>4} {path:>16} {fwd:>8.1f} {bwd:>8.1f} {fwd_bwd:>11.1f} "
                      f"{vs_einsum} {fwd / dense[0]:>12.2f}x {bwd / dense[1]:>12.2f}x {fwd_bwd / dense[2]:>16.2f}x",
                      flush=True)
                records.append({"S": num_tokens, "E": num_experts, "path": path, "fwd_ms": fwd, "bwd_ms": bwd,
                                "fwd_bwd_ms": fwd_bwd})
    if f.model:
        print(f"\ntraining step, batch {f.batch} x {f.seq_len} (float32, AdamW), best of {f.model_steps}:")
        runs = {("tiny", True): "dense model", (f.model, False): "autodiff backward",
                (f.model, True): "inverse-map VJPs"}
        ms = race({run: train_step_call(*run[:1], f.batch, f.seq_len, run[1]) for run in runs}, f.model_steps)
        for (preset, use_custom_vjp), label in runs.items():
            tokens_per_s = f.batch * f.seq_len / (ms[preset, use_custom_vjp] / 1e3)
            print(f"  {preset:>12} {label:>18}: {ms[preset, use_custom_vjp]:8.1f} ms/step "
                  f"{tokens_per_s:10.0f} tokens/s", flush=True)
            records.append({"model": preset, "custom_vjp": use_custom_vjp, "step_ms": ms[preset, use_custom_vjp],
                            "tokens_per_s": tokens_per_s})
    if f.json:
        with open(f.json, "w") as out:
            json.dump(records, out, indent=1)
        print(f"wrote {len(records)} records to {f.json}")


if __name__ == "__main__":
    app.run(main)
