"""Inference for the (MoE) GPT: KV-cache prefill and decode, sampling, and the MoE serving path.

Batches of prompts of different lengths are LEFT-padded to the longest one, P. The model's KV cache
has one write index for the whole batch, so left padding is what lets every row write its next
token into the same cache slot; each row keeps its own positions (position = slot - its padding)
and a `valid [B, Tmax]` mask hides its padding slots from attention. Padding therefore changes
neither the keys a real token sees nor its position, and a prompt decodes to the same tokens alone
or inside a batch.

Serving MoE path ("serve", the default). The training layer routes with a capacity C and, to keep
shapes static, runs every expert on a [E, C, M] buffer. Serving never drops a token: routing uses
`drop_tokens=False` and no gating noise (no rng), so a token's output does not depend on what else
is in the batch. With no dropping the static capacity is C = S, so the one-hot einsum and the
token-gather buffer both run E * S expert rows and, worse at decode, read every expert's weights
every step (decode is bound by weight reads). The serving path uses the mapping table
(expert_index, weight) to touch only what a step needs:
  * 2 * S * k <= E (decode): per-copy expert weights. Each of the S * k token copies slices its own
    expert's w1/w2 and runs one FFN row: S * k FFN rows and S * k expert matrices read, never all E
    (`dispatch_copies`).
  * otherwise (prefill, large batches): `moe_jax.dispatch.dispatch_dropless`, copies sorted by
    expert and a grouped matmul (row tiles on CPU, ragged_dot on GPU): S * k rows plus tile padding.
The layer is swapped in with `flax.linen.intercept_methods` around the unchanged `GPT` module, so
attention, the cache and the layer norms are the model's own code; `moe_path` "einsum", "gather"
or "dropless" run the model's own layer with drop_tokens=False instead (benchmark baselines).

Compilation: one compiled prefill per (B, P, Tmax) and one compiled decode loop per (B, Tmax,
new tokens). The decode loop is a `lax.fori_loop` over the decode step inside one jit: measured on
2 CPU cores (4 layers, hidden 128, 8 experts, batch 1) it took 0.8 ms per token against 1.0-1.2 ms
for a Python loop over a jitted decode step (donated cache) and sampler, whose difference is the
per-call dispatch cost.

Expert-parallel decode: `Generator(..., parallel=ParallelConfig(mesh))` places the parameters by
`moe_jax.parallel`'s partition rules (experts split over the expert axes) and runs prefill and
decode with the model's own MoE layers on the mesh: each step's tokens are routed per shard with the
no-drop capacity (C = tokens on the shard, nothing dropped), exchanged with all_to_all, run by the
experts' owners and sent back. The batch (and the KV cache) is split over the batch axes, so it is
filled up to a multiple of their size with copies of the last prompt (dropped from the output).
A lighter decode exchange (all-gather the step's few tokens, each shard runs the copies it owns,
psum_scatter back) would avoid the [E, C, M] buffers; it is not built.

Public API:
  serving_config(cfg, *, dtype="float32", moe_path="serve") -> ModelConfig
  cast_params(params, dtype) -> params (floating leaves cast; router gates stay float32)
  pad_prompts(prompts, *, vocab_size, max_seq_len, max_new_tokens) -> (tokens [B, P], lengths [B])
  prefill(params, tokens, lengths, *, cfg, max_len, moe_path) -> (logits [B, V], DecodeState)
  decode_step(params, state, tokens [B], *, cfg, moe_path) -> (logits [B, V], DecodeState)
  decode_tokens(params, state, logits, rng, temperature, top_p, *, cfg, num_tokens, moe_path)
      -> new tokens [B, num_tokens]
  sample_tokens(logits [B, V], rng, temperature, top_p) -> [B] int32 (temperature 0: greedy)
  serve_moe(params, x [..., M], *, moe, dispatch_fn) -> (y [..., M], stats); dispatch_copies; dispatch_serving
  serving_interceptor(dispatch_fn) -> the interceptor that swaps the model's MoE layers for serve_moe
  Generator(params, cfg, *, dtype, moe_path).generate(prompts, max_new_tokens, ...) -> Generation
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moe_jax import dispatch as dispatch_lib
from moe_jax import moe as moe_lib
from moe_jax import parallel as parallel_lib
from moe_jax.config import ModelConfig, replace_moe
from moe_jax.gating import Routing
from moe_jax.model import GPT
from moe_jax.parallel import ParallelConfig

MOE_PATHS = ("serve", "einsum", "gather", "dropless")
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------------------------
# Configuration and parameters
# ----------------------------------------------------------------------------------------------

def _check_moe_path(moe_path: str) -> None:
    if moe_path not in MOE_PATHS:
        raise ValueError(f"moe_path={moe_path!r} is unknown; use one of {MOE_PATHS} ('serve' is the fast one)")


def serving_config(cfg: ModelConfig, *, dtype: str = "float32", moe_path: str = "serve") -> ModelConfig:
    """The inference twin of a training config: no dropout, parameters and compute in `dtype`, and
    for MoE models no dropped tokens (drop_tokens=False) and no gating noise. For moe_path
    "einsum" / "gather" / "dropless" the model's own layer runs with that dispatch; for "serve"
    the layer is replaced at call time (module docstring) and the dispatch field is not read."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for inference; use one of {DTYPES}")
    _check_moe_path(moe_path)
    cfg = cfg.replace(dropout=0.0, param_dtype=dtype, compute_dtype=dtype)
    if cfg.moe is None:
        return cfg
    dispatch = cfg.moe.dispatch if moe_path == "serve" else moe_path
    return replace_moe(cfg, drop_tokens=False, noisy_gate_policy=None, dispatch=dispatch)


def cast_params(params: dict, dtype: str) -> dict:
    """Floating parameters cast to `dtype`, except the routers' gate kernels, which stay float32 as
    the model creates them: routing is an argmax over gate logits and bf16 gate weights would flip
    near-tied choices relative to the trained model."""
    target = jnp.dtype(dtype)

    def cast(path, leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        is_gate = any(getattr(key, "key", None) == "gate" for key in path)
        return leaf.astype(jnp.float32 if is_gate else target)

    return jax.tree_util.tree_map_with_path(cast, params)


# ----------------------------------------------------------------------------------------------
# The serving MoE path
# ----------------------------------------------------------------------------------------------

def dispatch_copies(x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    """x [S, M] -> y [S, M]: each of the S * k token copies runs one FFN row with its own expert's
    weights, sliced by expert_index, so only the chosen experts' weights are read: the decode path.
    Copies the routing dropped have weight 0, so this equals the other dispatch paths.

    A lax.map over copies, not one batched [N, M] x [N, M, F] product over gathered weights: on
    XLA:CPU the batched form matched the loop up to N = 8 copies and was 4-5x slower from N = 16.
    """
    num_tokens, k = routing.expert_index.shape
    dtype = x.dtype

    def one_copy(args):
        row, expert = args  # [M], scalar
        w = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, expert, keepdims=False).astype(dtype), experts)
        return dispatch_lib.gelu(row @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]

    # Token-major copies: row n is token n // k, its (n % k)-th choice.
    out = jax.lax.map(one_copy, (jnp.repeat(x, k, axis=0), routing.expert_index.reshape(-1)))
    return jnp.einsum("skm,sk->sm", out.reshape(num_tokens, k, -1), routing.weight.astype(dtype))


def dispatch_serving(x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    """x [S, M] -> y [S, M] by the cheaper no-drop path for this step's static token count: per-copy
    weights while the copies are at most half the experts (decode), else the dropless grouped
    matmul (prefill). Neither has a capacity, so no token is dropped.

    The crossover, measured on 2 CPU cores (M=256, F=1024, E=64): per-copy about 0.3 ms per copy;
    dropless about 1.2 ms at 1 copy (it scans E row tiles, skipping the empty ones), and the two
    cost the same near 32 copies."""
    if 2 * routing.num_tokens * routing.k <= routing.num_experts:
        return dispatch_copies(x, routing, experts)
    return dispatch_lib.dispatch_dropless(x, routing, experts)


def serve_moe(params: dict, x: jax.Array, *, moe, dispatch_fn=dispatch_serving) -> tuple[jax.Array, dict]:
    """The serving MoE layer: `moe_jax.moe.moe_forward`'s math (params in its layout: gate, experts,
    residual) with deterministic no-drop routing and `dispatch_fn` (x [S, M], routing, experts)
    -> [S, M] moving the tokens. x [..., M] -> (y [..., M], stats)."""
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    routing = moe_lib.route(params["gate"], tokens, moe=moe, train=False, rng=None, drop_tokens=False)
    y = dispatch_fn(tokens, routing, params["experts"])
    if moe.residual:
        coef = moe_lib.residual_coefficient(params["residual"]["coef"], tokens).astype(y.dtype)
        y = y * coef[:, :1] + moe_lib.dense_mlp(params["residual"]["mlp"], tokens) * coef[:, 1:]
    return y.reshape(shape), moe_lib.routing_stats(routing)


def moe_layer_params(layer_params: dict, residual: bool) -> dict:
    """A `MoELayer`'s parameter scope (gate, experts, residual_mlp, coef_kernel, coef_bias) in the
    layout `moe_forward` and `serve_moe` take."""
    params = {"gate": {"kernel": layer_params["gate"]}, "experts": layer_params["experts"]}
    if residual:
        params["residual"] = {"mlp": layer_params["residual_mlp"],
                              "coef": {"kernel": layer_params["coef_kernel"], "bias": layer_params["coef_bias"]}}
    return params


def serving_interceptor(dispatch_fn=dispatch_serving):
    """A `flax.linen.intercept_methods` interceptor that runs every `MoELayer.__call__` as
    `serve_moe(..., dispatch_fn=dispatch_fn)` on the layer's own parameters; other calls pass through."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, moe_lib.MoELayer) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        (x,) = args
        params = moe_layer_params(module.variables["params"], module.moe.residual)
        return serve_moe(params, x, moe=module.moe, dispatch_fn=dispatch_fn)

    return interceptor


# ----------------------------------------------------------------------------------------------
# Prefill and decode
# ----------------------------------------------------------------------------------------------

@struct.dataclass
class DecodeState:
    """What decoding carries between steps.

    cache: per layer {k, v [B, Tmax, H, D], index (the shared next slot), valid [B, Tmax]}.
    position: [B] int32, the position of each row's next token (its unpadded length so far).
    """

    cache: list
    position: jax.Array


def _forward(params: dict, tokens: jax.Array, positions: jax.Array, cache: list, *, cfg: ModelConfig,
             moe_path: str, parallel: Optional[ParallelConfig] = None):
    """GPT with the cache; MoE layers by the serving path when moe_path == "serve". On a mesh
    (`parallel`) the MoE layers run the expert-parallel exchange of moe_jax.parallel with no-drop
    capacity (the serving config), whatever moe_path says."""
    call = functools.partial(GPT(cfg, parallel).apply, {"params": params}, tokens, train=False, cache=cache,
                             positions=positions)
    if cfg.moe is None or moe_path != "serve" or parallel is not None:
        return call()
    with nn.intercept_methods(serving_interceptor()):
        return call()


def init_cache(cfg: ModelConfig, pad: jax.Array, max_len: int) -> list:
    """Empty per-layer caches for rows left-padded by `pad` [B] slots, max_len slots each."""
    batch = pad.shape[0]
    shape = (batch, max_len, cfg.num_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.compute_dtype)
    valid = jnp.arange(max_len)[None, :] >= pad[:, None]
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32),
             "valid": valid} for _ in range(cfg.num_layers)]


def prefill(params: dict, tokens: jax.Array, lengths: jax.Array, *, cfg: ModelConfig, max_len: int,
            moe_path: str = "serve", parallel: Optional[ParallelConfig] = None) -> tuple[jax.Array, DecodeState]:
    """Runs left-padded prompts through the model, filling a cache of max_len slots (at least P plus
    the tokens still to decode: the cache write clamps silently past its end).

    tokens [B, P] int32 (row b: P - lengths[b] padding tokens, then its prompt), lengths [B] int32.
    Returns (logits of each prompt's last token [B, V] float32, DecodeState).
    """
    prompt_len = tokens.shape[1]
    pad = prompt_len - lengths
    positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad[:, None], 0)
    logits, _, cache = _forward(params, tokens, positions, init_cache(cfg, pad, max_len), cfg=cfg,
                                moe_path=moe_path, parallel=parallel)
    return logits[:, -1], DecodeState(cache=cache, position=lengths.astype(jnp.int32))


def decode_step(params: dict, state: DecodeState, tokens: jax.Array, *, cfg: ModelConfig,
                moe_path: str = "serve", parallel: Optional[ParallelConfig] = None) -> tuple[jax.Array, DecodeState]:
    """Feeds one token per row: tokens [B] int32 -> (next-token logits [B, V] float32, new state)."""
    logits, _, cache = _forward(params, tokens[:, None], state.position[:, None], state.cache, cfg=cfg,
                                moe_path=moe_path, parallel=parallel)
    return logits[:, 0], DecodeState(cache=cache, position=state.position + 1)


def sample_tokens(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] -> tokens [B] int32. temperature 0: greedy (argmax). Otherwise softmax(logits /
    temperature) restricted to the smallest set of most likely tokens whose mass reaches top_p
    (nucleus sampling; top_p = 1 keeps all). Row b draws with fold_in(rng, b)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)

    def nucleus(scaled):
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep a token while the mass of the tokens ranked above it is below top_p (the first always).
        kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        threshold = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled >= threshold, scaled, -jnp.inf)

    # The vocabulary sort is the costly part of a step with a large vocabulary: skip it at top_p = 1.
    scaled = jax.lax.cond(top_p < 1.0, nucleus, lambda scaled: scaled, scaled)
    keys = jax.vmap(lambda row: jax.random.fold_in(rng, row))(jnp.arange(logits.shape[0]))
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def decode_tokens(params: dict, state: DecodeState, logits: jax.Array, rng: jax.Array, temperature: jax.Array,
                  top_p: jax.Array, *, cfg: ModelConfig, num_tokens: int, moe_path: str = "serve",
                  parallel: Optional[ParallelConfig] = None) -> jax.Array:
    """Samples num_tokens new tokens per row, starting from the prefill's last logits [B, V].
    num_tokens - 1 decode steps in one lax.fori_loop. Step i samples with fold_in(rng, i).
    Returns [B, num_tokens] int32."""
    first = sample_tokens(logits, jax.random.fold_in(rng, 0), temperature, top_p)
    out = jnp.zeros((first.shape[0], num_tokens), jnp.int32).at[:, 0].set(first)

    def body(i, carry):
        state, token, out = carry
        logits, state = decode_step(params, state, token, cfg=cfg, moe_path=moe_path, parallel=parallel)
        token = sample_tokens(logits, jax.random.fold_in(rng, i), temperature, top_p)
        return state, token, out.at[:, i].set(token)

    _, _, out = jax.lax.fori_loop(1, num_tokens, body, (state, first, out))
    return out


# ----------------------------------------------------------------------------------------------
# Host side: prompts, validation, the Generator
# ----------------------------------------------------------------------------------------------

def pad_prompts(prompts: Sequence[Sequence[int]], *, vocab_size: int, max_seq_len: int,
                max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Checks prompts and left-pads them (with token 0) to the longest.

    Returns (tokens int32 [B, P], lengths int32 [B]). Raises ValueError naming the bad prompt."""
    if not 1 <= max_new_tokens < max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, {max_seq_len - 1}]: prompt and new tokens "
                         f"share the model's max_seq_len={max_seq_len}")
    if len(prompts) == 0:
        raise ValueError("no prompts given; pass a list of token-id sequences")
    rows = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if row.size + max_new_tokens > max_seq_len:
            raise ValueError(
                f"prompt {i} has {row.size} tokens and max_new_tokens={max_new_tokens}: together "
                f"{row.size + max_new_tokens} > model max_seq_len={max_seq_len}; shorten the prompt to at most "
                f"{max_seq_len - max_new_tokens} tokens or lower max_new_tokens")
        bad = row[(row < 0) | (row >= vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} holds token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")
    lengths = np.array([row.size for row in rows], np.int32)
    tokens = np.zeros((len(rows), lengths.max()), np.int32)
    for i, row in enumerate(rows):
        tokens[i, tokens.shape[1] - row.size:] = row
    return tokens, lengths


@dataclasses.dataclass(frozen=True)
class Generation:
    """The result of `Generator.generate`: new tokens per prompt and where the time went."""

    tokens: list  # list[list[int]], max_new_tokens new tokens per prompt
    compile_s: float  # 0 when this shape was compiled by an earlier call
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of prefill + decode (compilation excluded)."""
        total = sum(len(t) for t in self.tokens)
        return total / max(self.prefill_s + self.decode_s, 1e-9)


class Generator:
    """Generation with one model: serving config, cast parameters and compiled prefill/decode.

    Compiled executables are cached per (batch, padded prompt length, max_new_tokens), so a second
    call with the same shapes compiles nothing.
    """

    def __init__(self, params: dict, cfg: ModelConfig, *, dtype: str = "float32", moe_path: str = "serve",
                 parallel: Optional[ParallelConfig] = None):
        self.cfg = serving_config(cfg, dtype=dtype, moe_path=moe_path)
        self.moe_path = moe_path
        self.parallel = parallel
        self.params = cast_params(params, dtype)
        if parallel is not None:  # experts split over the expert axes, the rest as in training
            specs = parallel_lib.param_specs(self.params, parallel)
            self.params = jax.device_put(self.params, parallel_lib.shardings(specs, parallel.mesh))
        self._compiled: dict = {}

    def _executables(self, tokens, lengths, rng, num_tokens: int):
        key = (tokens.shape, num_tokens)
        if key not in self._compiled and self.parallel is not None:
            # on a mesh: jitted functions that follow their inputs' shardings (no AOT executables)
            max_len = tokens.shape[1] + num_tokens
            self._compiled[key] = (
                jax.jit(functools.partial(prefill, cfg=self.cfg, max_len=max_len, moe_path=self.moe_path,
                                          parallel=self.parallel)),
                jax.jit(functools.partial(decode_tokens, cfg=self.cfg, num_tokens=num_tokens,
                                          moe_path=self.moe_path, parallel=self.parallel)))
        if key not in self._compiled:
            max_len = tokens.shape[1] + num_tokens
            prefill_fn = jax.jit(functools.partial(prefill, cfg=self.cfg, max_len=max_len, moe_path=self.moe_path))
            prefill_exe = prefill_fn.lower(self.params, tokens, lengths).compile()
            logits, state = jax.eval_shape(prefill_fn, self.params, tokens, lengths)
            decode_fn = jax.jit(functools.partial(decode_tokens, cfg=self.cfg, num_tokens=num_tokens,
                                                  moe_path=self.moe_path))
            scalar = jax.ShapeDtypeStruct((), jnp.float32)
            decode_exe = decode_fn.lower(self.params, state, logits, rng, scalar, scalar).compile()
            self._compiled[key] = (prefill_exe, decode_exe)
        return self._compiled[key]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> Generation:
        """max_new_tokens new tokens for each prompt (a sequence of token ids). temperature 0 is
        greedy; top_p in (0, 1] is the nucleus mass. Raises ValueError for bad inputs."""
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1] (1: no nucleus cut)")
        tokens, lengths = pad_prompts(prompts, vocab_size=self.cfg.vocab_size, max_seq_len=self.cfg.max_seq_len,
                                      max_new_tokens=max_new_tokens)
        num_prompts = tokens.shape[0]
        if self.parallel is not None:  # the batch is split over the batch axes: fill it with copies
            rows = -(-num_prompts // self.parallel.batch_size_divisor) * self.parallel.batch_size_divisor
            tokens = np.concatenate([tokens, np.repeat(tokens[-1:], rows - num_prompts, axis=0)])
            lengths = np.concatenate([lengths, np.repeat(lengths[-1:], rows - num_prompts)])
        tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
        rng = jax.random.key(seed)
        start = time.perf_counter()
        prefill_exe, decode_exe = self._executables(tokens, lengths, rng, max_new_tokens)
        compiled = time.perf_counter()
        logits, state = jax.block_until_ready(prefill_exe(self.params, tokens, lengths))
        prefilled = time.perf_counter()
        new_tokens = jax.block_until_ready(decode_exe(
            self.params, state, logits, rng, jnp.float32(temperature), jnp.float32(top_p)))
        done = time.perf_counter()
        return Generation(tokens=np.asarray(new_tokens)[:num_prompts].tolist(), compile_s=compiled - start,
                          prefill_s=prefilled - compiled, decode_s=done - prefilled)

