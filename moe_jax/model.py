"""GPT-3-style decoder with MoE blocks where the config's placement and pyramid say.

Pre-LN blocks, learned positions, GELU FFNs, tied input/output embeddings. A block is MoE when
`cfg.layer_experts()[i] > 0`; then its FFN is a `MoELayer` (top-k, Residual-MoE, ...).

Flax API: Linen. Its parameters are a plain nested dict, which is exactly what jit, shard_map,
optax and Orbax take, with no graph split/merge step; named rng streams ('dropout' and 'gating')
make the random parts of training explicit and reproducible; a heterogeneous stack (different
expert counts per layer) is an ordinary Python loop. The numerics live in pure functions
(`moe_jax.moe.moe_forward`, `attention`, ...) that the modules only feed with parameters.

Public API:
  init_params(rng, cfg) -> params
  count_params(cfg) -> ParamCount (total and active per token, from abstract shapes)
  apply(params, tokens, cfg, *, train, rngs=None, parallel=None, router_state=None, replay=None,
        record_routing=False) -> (logits [B, T, V] float32, aux)
  lm_loss(logits, targets, mask=None) -> mean cross-entropy
aux = {"aux_loss": sum over MoE layers, "z_loss": sum, "layers": ((layer index, stats), ...)}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import experts as experts_lib
from moe_jax import grad_precision
from moe_jax import tied_embedding
from moe_jax.config import ModelConfig
from moe_jax.moe import MLP, ROUTER_STATE, ROUTING_RECORD, ROUTING_REPLAY, MoELayer
from moe_jax.parallel import ParallelConfig


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_offset: int | jax.Array = 0,
                     kv_valid: Optional[jax.Array] = None) -> jax.Array:
    """q [B, Tq, H, D], k/v [B, Tk, H, D] -> [B, Tq, H, D]. Query i sits at absolute position
    q_offset + i and sees keys at positions <= its own (and kv_valid [B, Tk] where given).
    Scores and softmax in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    q_pos = jnp.arange(q.shape[1])[:, None] + q_offset
    k_pos = jnp.arange(k.shape[1])[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, None, :]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
    num_heads: int
    init_std: float
    out_std: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, cache: Optional[dict] = None) -> tuple[jax.Array, Optional[dict]]:
        """x [B, T, M]. With a cache {k, v [B, Tmax, H, D], index}, attends over cached keys too and
        returns the updated cache (inference). The caller keeps index + T <= Tmax: a write past the
        end clamps silently (dynamic_update_slice), as moe_jax.inference ensures."""
        batch, length, model_dim = x.shape
        head_dim = model_dim // self.num_heads
        dtype = x.dtype
        w_qkv = self.param("qkv_kernel", nn.initializers.normal(self.init_std), (model_dim, 3 * model_dim),
                           self.param_dtype)
        b_qkv = self.param("qkv_bias", nn.initializers.zeros, (3 * model_dim,), self.param_dtype)
        w_out = self.param("out_kernel", nn.initializers.normal(self.out_std), (model_dim, model_dim),
                           self.param_dtype)
        b_out = self.param("out_bias", nn.initializers.zeros, (model_dim,), self.param_dtype)
        qkv = grad_precision.add_bias(grad_precision.matmul("btm,mf->btf", x, w_qkv, dtype), b_qkv)
        # Columns are head-major (head, q/k/v, dim): splitting them over tensor ranks gives each rank
        # whole heads' q, k and v, so attention runs on local heads with no all-gather.
        qkv = qkv.reshape(batch, length, self.num_heads, 3, head_dim)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        if cache is None:
            out = causal_attention(q, k, v)
            new_cache = None
        else:
            index = cache["index"]
            keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, axis=1)
            out = causal_attention(q, keys.astype(dtype), values.astype(dtype), q_offset=index,
                                   kv_valid=cache.get("valid"))
            new_cache = {**cache, "k": keys, "v": values, "index": index + length}
        out = out.reshape(batch, length, model_dim)
        return grad_precision.add_bias(grad_precision.matmul("btm,mf->btf", out, w_out, dtype), b_out), new_cache


class Block(nn.Module):
    cfg: ModelConfig
    num_experts: int  # 0: dense FFN
    parallel: Optional[ParallelConfig] = None

    @nn.compact
    def __call__(self, x, train: bool, cache: Optional[dict] = None):  # positional: nn.remat's static train
        cfg = self.cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # GPT-2/Megatron scaled output init
        deterministic = not train or cfg.dropout == 0.0
        h = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype, name="ln1")(x)
        h, new_cache = Attention(cfg.num_heads, cfg.init_std, out_std, param_dtype, name="attn")(
            h.astype(x.dtype), cache=cache)
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        h = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype, name="ln2")(x).astype(x.dtype)
        if self.num_experts:
            h, stats = MoELayer(cfg.moe, self.num_experts, cfg.expert_ffn_size, cfg.init_std, out_std,
                                param_dtype, self.parallel, name="moe")(h, train=train)
        else:
            h, stats = MLP(cfg.ffn_size, cfg.init_std, out_std, param_dtype, name="mlp")(h), None
        x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        return x, stats, new_cache


# model.remat: what each block keeps for the backward pass (ModelConfig.remat)
_REMAT_POLICIES = {
    "block": lambda: jax.checkpoint_policies.nothing_saveable,
    "moe": lambda: jax.checkpoint_policies.save_only_these_names(experts_lib.ROUTING, experts_lib.EXPERT_INPUT),
}


class GPT(nn.Module):
    cfg: ModelConfig
    parallel: Optional[ParallelConfig] = None  # mesh and MoE exchange (moe_jax.parallel); None: one device

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False, cache: Optional[list] = None,
                 positions: Optional[jax.Array] = None):
        """tokens [B, T] int -> (logits [B, T, V] float32, aux[, new cache])."""
        cfg = self.cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        compute_dtype = jnp.dtype(cfg.compute_dtype)
        if tokens.shape[1] > cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.max_seq_len={cfg.max_seq_len}")
        wte = self.param("wte", nn.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.hidden_size), param_dtype)
        wpe = self.param("wpe", nn.initializers.normal(cfg.init_std), (cfg.max_seq_len, cfg.hidden_size),
                         param_dtype)
        if positions is None:  # with a cache the tokens continue at the cache's write index
            start = 0 if cache is None else cache[0]["index"]
            positions = start + jnp.arange(tokens.shape[1])[None, :]
        # on a batch-sharded mesh both uses of the tied embedding read per-device copies, so that its
        # gradient is reduced once (moe_jax.tied_embedding)
        tied = cache is None and tied_embedding.applies(self.parallel, tokens.shape[0])
        wte_copies = tied_embedding.copies(wte, self.parallel) if tied else None
        embedded = tied_embedding.lookup(wte_copies, tokens, self.parallel) if tied else wte[tokens]
        x = (embedded + wpe[positions]).astype(compute_dtype)
        x = nn.Dropout(cfg.dropout)(x, deterministic=not train or cfg.dropout == 0.0)
        layer_stats, new_cache = [], []
        block = Block if cfg.remat == "none" or cache is not None else nn.remat(
            Block, static_argnums=(2,), policy=_REMAT_POLICIES[cfg.remat]())  # (self, x, train): train static
        for i, num_experts in enumerate(cfg.layer_experts()):
            x, stats, layer_cache = block(cfg, num_experts, self.parallel, name=f"block_{i}")(
                x, train, None if cache is None else cache[i])
            new_cache.append(layer_cache)
            if stats is not None:
                layer_stats.append((i, stats))
        x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype, name="ln_f")(x)
        if tied:
            logits = tied_embedding.logits(wte_copies, x, self.parallel, compute_dtype)
        else:
            logits = grad_precision.matmul("btm,vm->btv", x.astype(compute_dtype), wte, compute_dtype,
                                           preferred_element_type=jnp.float32)
        zero = jnp.zeros((), jnp.float32)
        aux = {
            "aux_loss": sum((s["aux_loss"] for _, s in layer_stats), zero),
            "z_loss": sum((s["z_loss"] for _, s in layer_stats), zero),
            "layers": tuple(layer_stats),
        }
        if cache is not None:
            return logits, aux, new_cache
        return logits, aux


def init_params(rng: jax.Array, cfg: ModelConfig, seq_len: int = 8) -> dict:
    """Fresh parameters (a nested dict). Shapes do not depend on seq_len."""
    tokens = jnp.zeros((1, min(seq_len, cfg.max_seq_len)), jnp.int32)
    return GPT(cfg).init({"params": rng}, tokens, train=False)["params"]


def apply(params: dict, tokens: jax.Array, cfg: ModelConfig, *, train: bool = False,
          rngs: Optional[dict] = None, parallel: Optional[ParallelConfig] = None,
          router_state: Optional[dict] = None, replay: Optional[dict] = None, record_routing: bool = False):
    """Forward pass: (logits [B, T, V] float32, aux). rngs: {'dropout': key, 'gating': key}.

    router_state: the routers' selection biases under aux-loss-free balancing (moe_jax.balancing;
    the train state's "router_state"). replay: {"block_<i>": code [B, T, k]} routes those MoE layers
    with recorded codes (moe_jax.routing_trace); record_routing: aux["routing"] = {"block_<i>":
    code [B, T, k]} of every MoE layer."""
    variables = {"params": params}
    if router_state:
        variables[ROUTER_STATE] = router_state
    if replay:
        variables[ROUTING_REPLAY] = {block: {"moe": {"code": code}} for block, code in replay.items()}
    if not record_routing:
        return GPT(cfg, parallel).apply(variables, tokens, train=train, rngs=rngs or {})
    (logits, aux), recorded = GPT(cfg, parallel).apply(variables, tokens, train=train, rngs=rngs or {},
                                                       mutable=[ROUTING_RECORD])
    codes = {block: tree["moe"]["code"] for block, tree in recorded.get(ROUTING_RECORD, {}).items()}
    return logits, {**aux, "routing": codes}


# ----------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # parameters one token passes through (k experts per MoE layer)

    def __str__(self) -> str:
        return f"{_human(self.total)} total, {_human(self.active)} active per token"


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total and active parameter counts from abstract shapes (jax.eval_shape: nothing allocated)."""
    shapes = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    inactive = 0
    layer_experts = cfg.layer_experts()
    k = cfg.moe.k if cfg.moe is not None else 0
    for i, num_experts in enumerate(layer_experts):
        if num_experts:
            experts = shapes[f"block_{i}"]["moe"]["experts"]
            per_expert = sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(experts))
            inactive += (num_experts - min(k, num_experts)) * per_expert
    return ParamCount(total=int(total), active=int(total - inactive))



def lm_loss(logits: jax.Array, targets: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Mean next-token cross-entropy in nats. logits [B, T, V], targets [B, T], mask [B, T]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if mask is None:
        return jnp.mean(nll)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
