r"""Decode latency and throughput of the MoE GPT per MoE path, against a dense model; table + plot.

  python experiments/bench_inference.py [--json FILE] [--png FILE] [--batches=1,2,4,8,16,32,64] \
      [--prompt_lens=16,128] [--experts=64] [--paths=einsum,gather,serve,kernel,dense]

Model: 4 layers, M=256, FFN 1024, 4 heads, byte vocabulary; layers 2 and 4 are top-1 MoE with E
experts (float32). Dense: the same model without experts, the same active parameters per token.
For every path, batch B and prompt length P: the prefill time, the decode time per step (one
new token for each of the B rows, `ms_per_token`; throughput = B / step time) from a
`moe_jax.inference.decode_tokens` loop of --new_tokens, and `moe_layer_ms`, one MoE layer alone on
the decode step's [B, 1, M] input. Paths:
  einsum  DeepSpeed's training layer at inference: one-hot einsum dispatch with the training capacity
          formula, C = max(ceil(S / E * eval_capacity_factor), min_capacity=4), S the tokens in the step
          (4 at decode unless B > 4 * E), dropping a step's tokens beyond C per expert.
  gather  the model's mapping-table gather dispatch with drop_tokens=False: capacity C = S, a
          [E, S, M] buffer.
  serve   moe_jax.inference's serving path: mapping table, per-copy expert weights at decode and the
          dropless grouped matmul at prefill; never drops.
  kernel  the "kernel" dispatch path (moe_jax.kernels.moe_layer) with drop_tokens=False; on a GPU
          only (elsewhere it would time the kernels' jnp references).
  dense   the dense model (E = 0 in the records); its moe_layer_ms is its FFN on the same input.
Decode is bound by reading weights: einsum and gather read every expert's weights each step, serve
only those of the S * k chosen copies. Prefill of gather at large B * P is E times the FLOPs of a
dense FFN (C = S); it is measured once.

The default (batches 1, 8, 32; prompt lengths 16, 128; E = 64) took 3.5 minutes on 2 shared CPU cores.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from moe_jax import cli
from moe_jax import dispatch as dispatch_lib
from moe_jax import inference
from moe_jax import model as model_lib
from moe_jax import moe as moe_lib
from moe_jax.config import ModelConfig, MoEConfig, replace_moe
from moe_jax.routing import compute_capacity

# every registered dispatch path (dropless is the training form of serve), and the dense model
PATHS = (*(p for p in dispatch_lib.PATHS if p != "dropless"), "dense")

flags.DEFINE_string("json", None, "Write the records to this file.")
flags.DEFINE_string("png", "bench_inference.png", "Where the plot goes.")
flags.DEFINE_list("batches", ["1", "8", "32"], "Batch sizes (rows decoded together), e.g. 1,2,4,8,16,32,64.")
flags.DEFINE_list("prompt_lens", ["16", "128"], "Prompt lengths P.")
flags.DEFINE_list("experts", ["64"], "Experts per MoE layer E.")
flags.DEFINE_list("paths", list(PATHS), f"Paths among {PATHS}.")
flags.DEFINE_integer("new_tokens", 16, "Tokens generated per timed decode loop (new_tokens - 1 decode steps).")
flags.DEFINE_integer("repeats", 2, "Timed repetitions of each measurement (the minimum is reported).")
flags.DEFINE_integer("layer_calls", 20, "Calls per timed repetition of one MoE layer.")
flags.DEFINE_integer("model_dim", 256, "M.")
flags.DEFINE_integer("ffn_dim", 1024, "FFN size of the dense FFN and of each expert.")
flags.DEFINE_integer("num_layers", 4, "Layers; every second one is MoE.")


def base_config(f, num_experts: int, max_seq_len: int) -> ModelConfig:
    moe = MoEConfig(experts=num_experts, k=1, eval_capacity_factor=1.0, min_capacity=4) if num_experts else None
    return ModelConfig(vocab_size=256, num_layers=f.num_layers, hidden_size=f.model_dim, num_heads=4,
                       ffn_size=f.ffn_dim, max_seq_len=max_seq_len, moe=moe)


def path_config(path: str, cfg: ModelConfig) -> ModelConfig:
    """The model config a benchmark path runs."""
    if path == "einsum":  # DeepSpeed's layer as trained (base_config drops tokens, has no noise or dropout)
        return replace_moe(cfg, dispatch="einsum")
    return inference.serving_config(cfg, moe_path="serve" if path == "dense" else path)


def decode_capacity(path: str, cfg: ModelConfig, batch: int):
    """The expert buffer rows per expert in one decode step of `batch` tokens (None: no buffer)."""
    if path == "einsum":
        moe = cfg.moe
        return compute_capacity(batch, moe.experts, moe.eval_capacity_factor, moe.min_capacity, moe.k)
    if path == "gather":
        return batch
    return None


def best_of(fn, repeats: int) -> float:
    """Minimum wall seconds of fn() (which blocks) over repeats."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_generation(params, cfg, batch, prompt_len, f) -> tuple[float, float]:
    """(prefill ms, decode ms per step) of `batch` random prompts of prompt_len tokens."""
    tokens = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0, cfg.vocab_size)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    rng, zero, one = jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0)
    prefill = jax.jit(inference.prefill, static_argnames=("cfg", "max_len"))
    decode = jax.jit(inference.decode_tokens, static_argnames=("cfg", "num_tokens"))
    prefill_exe = prefill.lower(params, tokens, lengths, max_len=prompt_len + f.new_tokens, cfg=cfg).compile()
    logits, state = jax.block_until_ready(prefill_exe(params, tokens, lengths))  # warm-up
    prefill_s = best_of(lambda: jax.block_until_ready(prefill_exe(params, tokens, lengths)), 1)
    decode_exe = decode.lower(params, state, logits, rng, zero, one, num_tokens=f.new_tokens, cfg=cfg).compile()
    jax.block_until_ready(decode_exe(params, state, logits, rng, zero, one))  # warm-up
    decode_s = best_of(lambda: jax.block_until_ready(decode_exe(params, state, logits, rng, zero, one)), f.repeats)
    return prefill_s * 1e3, decode_s * 1e3 / (f.new_tokens - 1)


def time_moe_layer(path, params, cfg, batch, f) -> float:
    """ms of one MoE layer (the first; for dense the FFN of the same block) on a [batch, 1, M] input."""
    x = jax.random.normal(jax.random.key(1), (batch, 1, cfg.hidden_size), jnp.dtype(cfg.compute_dtype))
    first = cfg.moe_layer_indices()[0] if cfg.moe is not None else 1  # dense: the same block's FFN
    block = params[f"block_{first}"]
    if path == "dense":
        layer, fn = block["mlp"], moe_lib.dense_mlp
    else:  # the model's own layer parameters and layer function, with the path's config
        layer = block["moe"]

        def fn(p, x):
            return moe_lib.moe_forward(p, x, moe=cfg.moe, train=False)[0]
    call = jax.jit(fn)
    jax.block_until_ready(call(layer, x))

    def calls():
        for _ in range(f.layer_calls):
            y = call(layer, x)
        jax.block_until_ready(y)

    return best_of(calls, f.repeats) * 1e3 / f.layer_calls


def write_records(records, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        json.dump(records, out, indent=1)
    os.replace(tmp, path)


def plot(records, path_png, title):
    fig, (ax_model, ax_layer) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", ":", "-."]
    prompt_lens = sorted({r["prompt_len"] for r in records})
    for path in PATHS:
        for experts in sorted({r["E"] for r in records if r["path"] == path}):
            label = path if path == "dense" else f"{path} E={experts}"
            for i, prompt_len in enumerate(prompt_lens):
                rows = sorted((r for r in records if r["path"] == path and r["E"] == experts
                               and r["prompt_len"] == prompt_len), key=lambda r: r["batch"])
                if rows:
                    ax_model.plot([r["batch"] for r in rows], [r["ms_per_token"] for r in rows],
                                  styles[i % len(styles)], marker="o", label=f"{label} P={prompt_len}")
            rows = sorted((r for r in records if r["path"] == path and r["E"] == experts
                           and r["prompt_len"] == prompt_lens[0]), key=lambda r: r["batch"])
            ax_layer.plot([r["batch"] for r in rows], [r["moe_layer_ms"] for r in rows], marker="o", label=label)
    for ax, ylabel in ((ax_model, "decode step, whole model (ms)"), (ax_layer, "one MoE layer, decode step (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (sequences decoded together)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        batches, prompt_lens, expert_counts = ([int(v) for v in values]
                                               for values in (f.batches, f.prompt_lens, f.experts))
    except ValueError as error:
        cli.fail(f"--batches, --prompt_lens and --experts take integers: {error}")
    unknown = sorted(set(f.paths) - set(PATHS))
    if unknown:
        cli.fail(f"--paths holds {unknown}; use some of {PATHS}")
    if min(batches + prompt_lens) < 1 or min(expert_counts) < 2 or f.new_tokens < 2:
        cli.fail("--batches and --prompt_lens must be >= 1, --experts >= 2 and --new_tokens >= 2")
    on_gpu = jax.default_backend() == "gpu"
    paths = [p for p in PATHS if p in f.paths and (p != "kernel" or on_gpu)]
    max_seq_len = max(prompt_lens) + f.new_tokens
    title = (f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}: {f.num_layers} layers, "
             f"M={f.model_dim}, FFN={f.ffn_dim}, top-1 MoE every 2nd layer, float32, "
             f"{f.new_tokens - 1} decode steps")
    print(title)
    if "kernel" in f.paths and not on_gpu:
        print(f"kernel path skipped: no GPU (backend {jax.default_backend()})")
    header = (f"{'E':>3} {'path':>7} {'batch':>5} {'P':>4} {'C':>4} {'prefill ms':>10} {'ms/token':>9} "
              f"{'tokens/s':>9} {'MoE layer ms':>12} {'layer vs einsum':>15}")
    print(header)
    print("-" * len(header))
    records = []
    jobs = [(num_experts, path) for num_experts in expert_counts for path in paths if path != "dense"]
    jobs += [(0, "dense")] if "dense" in paths else []  # the dense model does not depend on E
    for num_experts, path in jobs:
        base = base_config(f, num_experts, max_seq_len)
        cfg = path_config(path, base)
        params = jax.jit(model_lib.init_params, static_argnums=1)(jax.random.key(0), base)
        for batch in batches:
            layer_ms = time_moe_layer(path, params, cfg, batch, f)
            einsum_layer = next((r["moe_layer_ms"] for r in records if r["path"] == "einsum"
                                 and r["E"] == num_experts and r["batch"] == batch), None)
            for prompt_len in prompt_lens:
                prefill_ms, step_ms = time_generation(params, cfg, batch, prompt_len, f)
                capacity = None if path == "dense" else decode_capacity(path, cfg, batch)
                record = {"path": path, "E": num_experts, "batch": batch,
                          "prompt_len": prompt_len, "ms_per_token": step_ms, "moe_layer_ms": layer_ms,
                          "tokens_per_s": batch * 1e3 / step_ms, "prefill_ms": prefill_ms,
                          "decode_capacity": capacity}
                records.append(record)
                if f.json:  # after every row: a run stopped early keeps what it measured
                    write_records(records, f.json)
                ratio = f"{einsum_layer / layer_ms:>14.2f}x" if einsum_layer else f"{'-':>15}"
                print(f"{record['E']:>3} {path:>7} {batch:>5} {prompt_len:>4} "
                      f"{'-' if capacity is None else capacity:>4} {prefill_ms:>10.1f} {step_ms:>9.2f} "
                      f"{record['tokens_per_s']:>9.0f} {layer_ms:>12.3f} {ratio}", flush=True)
    print("\nTarget (reported, not asserted): per-token MoE-layer latency >= 3x below einsum at E=64, batch <= 8")
    einsum_layer_ms = {r["batch"]: r["moe_layer_ms"] for r in records if r["path"] == "einsum" and r["E"] == 64}
    for r in records:
        if r["path"] in ("gather", "serve", "kernel") and r["E"] == 64 and r["batch"] <= 8 \
                and r["prompt_len"] == prompt_lens[0] and r["batch"] in einsum_layer_ms:
            speedup = einsum_layer_ms[r["batch"]] / r["moe_layer_ms"]
            print(f"  {r['path']:>6} batch {r['batch']:>2}: {speedup:5.2f}x {'met' if speedup >= 3 else 'NOT met'}")
    plot(records, f.png, title)
    print(f"plot: {f.png}")
    if f.json:
        write_records(records, f.json)
        print(f"wrote {len(records)} records to {f.json}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
