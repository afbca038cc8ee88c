"""Inference for the (MoE) GPT: KV-cache prefill and decode, sampling, and the MoE serving path.

Batches of prompts of different lengths are LEFT-padded to the longest one, P. The model's KV cache
has one write index for the whole batch, so left padding is what lets every row write its next
token into the same cache slot; each row keeps its own positions (position = slot - its padding)
and a `valid [B, Tmax]` mask hides its padding slots from attention. Padding therefore changes
neither the keys a real token sees nor its position, and a prompt decodes to the same tokens alone
or inside a batch.

Serving MoE path. Serving is the training model with its predict config (`serving_config`, as the
Flax lm1b example derives its decode config): no dropout, parameters in the serving dtype, and for
MoE layers `drop_tokens=False`, no gating noise and the dispatch path `moe_path`, by default
"serve" (moe_jax.dispatch): each token copy reads only its own expert's weights while the step has
few copies (decode; weight reads bound it), the dropless grouped matmul otherwise (prefill). The
layer, its parameters and its routing are the training layer's own (moe_jax.moe.MoELayer); any
dispatch path of moe_jax.dispatch.PATHS can serve ("einsum", "gather", ... as benchmark baselines).
A token's output does not depend on the rest of the batch, since nothing is dropped. A model whose
router is not causal (expert-choice: each expert picks among the whole group's tokens) cannot be
served token by token: `serving_config` raises a ValueError that says so.

Compilation: one compiled prefill per (B, P, Tmax) and one compiled decode loop per (B, Tmax,
new tokens). The decode loop is a `lax.fori_loop` over the decode step inside one jit, not a Python
loop over a jitted step: it saves the per-call dispatch cost of every token.

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
  serving_params(params, cfg, router_state=None) -> params (trained selection biases in the gates)
  cast_params(params, dtype) -> params (floating leaves cast; router gates stay float32)
  pad_prompts(prompts, *, vocab_size, max_seq_len, max_new_tokens) -> (tokens [B, P], lengths [B])
  prefill(params, tokens, lengths, *, cfg, max_len) -> (logits [B, V], DecodeState)
  decode_step(params, state, tokens [B], *, cfg) -> (logits [B, V], DecodeState)
  decode_tokens(params, state, logits, rng, temperature, top_p, *, cfg, num_tokens) -> new tokens [B, num_tokens]
  sample_tokens(logits [B, V], rng, temperature, top_p) -> [B] int32 (temperature 0: greedy)
  Generator(params, cfg, *, dtype, moe_path, parallel, router_state)
      .generate(prompts, max_new_tokens, ...) -> Generation
`cfg` is a serving config throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moe_jax import dispatch as dispatch_lib
from moe_jax import parallel as parallel_lib
from moe_jax.config import ModelConfig, replace_moe
from moe_jax.model import GPT
from moe_jax.parallel import ParallelConfig
from moe_jax import routers as routers_lib

DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------------------------
# Configuration and parameters
# ----------------------------------------------------------------------------------------------

def serving_config(cfg: ModelConfig, *, dtype: str = "float32", moe_path: str = "serve") -> ModelConfig:
    """The inference twin of a training config: no dropout, parameters and compute in `dtype`, and
    for MoE models no dropped tokens (drop_tokens=False, and no overflow of the expert-parallel
    rows exchange), no gating noise and dispatch path `moe_path` (a name of moe_jax.dispatch.PATHS;
    "serve" is the fast one)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for inference; use one of {DTYPES}")
    if moe_path not in dispatch_lib.PATHS:
        raise ValueError(f"moe_path={moe_path!r} is unknown; use one of {tuple(dispatch_lib.PATHS)} "
                         "('serve' is the fast one)")
    cfg = cfg.replace(dropout=0.0, param_dtype=dtype, compute_dtype=dtype)
    if cfg.moe is None:
        return cfg
    if cfg.moe.router in routers_lib.NON_CAUSAL_ROUTERS:
        # each expert picks among all the tokens of its group: a prompt's routing would read tokens
        # not generated yet, and decoding one token at a time would route differently from training
        raise ValueError(f"moe.router={cfg.moe.router!r} routes each token by looking at the whole group of "
                         "tokens, later ones included, so this model cannot generate token by token; generate "
                         "with a model trained with a causal router such as moe.router='topk'")
    # row_exchange_factor inf: under expert parallelism the rows exchange never overflows either;
    # bias_update_rate 0: trained selection biases travel in the gate parameters (serving_params)
    return replace_moe(cfg, drop_tokens=False, noisy_gate_policy=None, dispatch=moe_path,
                       row_exchange_factor=float("inf"), bias_update_rate=0.0)


def serving_params(params: dict, cfg: ModelConfig, router_state: Optional[dict] = None) -> dict:
    """The parameters a serving model reads: those of the training config `cfg`, plus, for a model
    trained with aux-loss-free balancing, each MoE layer's trained selection bias [E] (the train
    state's router_state) inside its gate ({kernel, selection_bias}), where the router reads it.
    A ValueError when such a model comes without its router_state: its experts would be chosen
    without the biases it was trained with."""
    if cfg.moe is None or cfg.moe.bias_update_rate <= 0 or not any(cfg.layer_experts()):
        return params
    if not router_state:
        raise ValueError(f"this model was trained with aux-loss-free balancing (moe.bias_update_rate="
                         f"{cfg.moe.bias_update_rate}), so its routers choose experts with trained selection "
                         "biases; pass its router_state (checkpoint.load_router_state(workdir)) too")
    out = dict(params)
    for block, tree in router_state.items():
        if block not in params or "moe" not in params[block]:
            raise ValueError(f"router_state has {block!r}, which is not an MoE layer of this model")
        layer = dict(params[block])
        layer["moe"] = {**layer["moe"], "gate": {**layer["moe"]["gate"],
                                                 "selection_bias": jnp.asarray(tree["moe"]["selection_bias"],
                                                                               jnp.float32)}}
        out[block] = layer
    return out


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
             parallel: Optional[ParallelConfig] = None):
    """GPT with the cache. On a mesh (`parallel`) MoE layers whose experts are split over the
    expert group run moe_jax.parallel's exchange with the no-drop capacity of the serving config."""
    return GPT(cfg, parallel).apply({"params": params}, tokens, train=False, cache=cache, positions=positions)


def init_cache(cfg: ModelConfig, pad: jax.Array, max_len: int) -> list:
    """Empty per-layer caches for rows left-padded by `pad` [B] slots, max_len slots each."""
    batch = pad.shape[0]
    shape = (batch, max_len, cfg.num_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.compute_dtype)
    valid = jnp.arange(max_len)[None, :] >= pad[:, None]
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32),
             "valid": valid} for _ in range(cfg.num_layers)]


def prefill(params: dict, tokens: jax.Array, lengths: jax.Array, *, cfg: ModelConfig, max_len: int,
            parallel: Optional[ParallelConfig] = None) -> tuple[jax.Array, DecodeState]:
    """Runs left-padded prompts through the model, filling a cache of max_len slots (at least P plus
    the tokens still to decode: the cache write clamps silently past its end).

    tokens [B, P] int32 (row b: P - lengths[b] padding tokens, then its prompt), lengths [B] int32.
    Returns (logits of each prompt's last token [B, V] float32, DecodeState).
    """
    prompt_len = tokens.shape[1]
    pad = prompt_len - lengths
    positions = jnp.maximum(jnp.arange(prompt_len)[None, :] - pad[:, None], 0)
    logits, _, cache = _forward(params, tokens, positions, init_cache(cfg, pad, max_len), cfg=cfg, parallel=parallel)
    return logits[:, -1], DecodeState(cache=cache, position=lengths.astype(jnp.int32))


def decode_step(params: dict, state: DecodeState, tokens: jax.Array, *, cfg: ModelConfig,
                parallel: Optional[ParallelConfig] = None) -> tuple[jax.Array, DecodeState]:
    """Feeds one token per row: tokens [B] int32 -> (next-token logits [B, V] float32, new state)."""
    logits, _, cache = _forward(params, tokens[:, None], state.position[:, None], state.cache, cfg=cfg,
                                parallel=parallel)
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
                  top_p: jax.Array, *, cfg: ModelConfig, num_tokens: int,
                  parallel: Optional[ParallelConfig] = None) -> jax.Array:
    """Samples num_tokens new tokens per row, starting from the prefill's last logits [B, V].
    num_tokens - 1 decode steps in one lax.fori_loop. Step i samples with fold_in(rng, i).
    Returns [B, num_tokens] int32."""
    first = sample_tokens(logits, jax.random.fold_in(rng, 0), temperature, top_p)
    out = jnp.zeros((first.shape[0], num_tokens), jnp.int32).at[:, 0].set(first)

    def body(i, carry):
        state, token, out = carry
        logits, state = decode_step(params, state, token, cfg=cfg, parallel=parallel)
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
                 parallel: Optional[ParallelConfig] = None, router_state: Optional[dict] = None):
        """params and cfg as trained; router_state: the train state's selection biases, needed
        (and only read) for a model trained with aux-loss-free balancing (`serving_params`)."""
        params = serving_params(params, cfg, router_state)
        self.cfg = serving_config(cfg, dtype=dtype, moe_path=moe_path)
        self.parallel = parallel
        self.params = cast_params(params, dtype)
        if parallel is not None:  # experts split over the expert axes, the rest as in training
            parallel_lib.validate(self.cfg, parallel, parallel.batch_size_divisor)  # prompts are filled up to it
            specs = parallel_lib.param_specs(self.params, parallel)
            self.params = jax.device_put(self.params, parallel_lib.shardings(specs, parallel.mesh))
        self._compiled: dict = {}

    def _executables(self, tokens, lengths, rng, num_tokens: int):
        key = (tokens.shape, num_tokens)
        if key not in self._compiled and self.parallel is not None:
            # on a mesh: jitted functions that follow their inputs' shardings (no AOT executables)
            max_len = tokens.shape[1] + num_tokens
            self._compiled[key] = (
                jax.jit(functools.partial(prefill, cfg=self.cfg, max_len=max_len,
                                          parallel=self.parallel)),
                jax.jit(functools.partial(decode_tokens, cfg=self.cfg, num_tokens=num_tokens,
                                          parallel=self.parallel)))
        if key not in self._compiled:
            max_len = tokens.shape[1] + num_tokens
            prefill_fn = jax.jit(functools.partial(prefill, cfg=self.cfg, max_len=max_len))
            prefill_exe = prefill_fn.lower(self.params, tokens, lengths).compile()
            logits, state = jax.eval_shape(prefill_fn, self.params, tokens, lengths)
            decode_fn = jax.jit(functools.partial(decode_tokens, cfg=self.cfg, num_tokens=num_tokens))
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

