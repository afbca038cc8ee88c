"""The MoE layer: gate, experts, top-k routing, Residual-MoE.

Math lives in pure functions over a parameter dict so that jit, shard_map and the kernels can call
them directly; `MoELayer` is a thin Flax Linen module that creates the parameters and calls them.

Parameters of one layer (E experts, model dim M, expert FFN dim F):
  gate     {kernel [M, E]}                      bias-free, logits in float32
  experts  {w1 [E, M, F], b1 [E, F], w2 [E, F, M], b2 [E, M]}
  residual {mlp: {w1 [M, F], b1 [F], w2 [F, M], b2 [M]}, coef: {kernel [M, 2], bias [2]}}  (Residual-MoE)
  shared   {w1 [M, n F], b1 [n F], w2 [n F, M], b2 [M]}  (n = moe.shared_experts, DeepSeekMoE)

Residual-MoE (DeepSpeed's use_residual): y = moe(x) * c[..., 0] + mlp(x) * c[..., 1] with
c = softmax(x @ coef.kernel + coef.bias, axis=-1), the per-token mixing coefficient.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moe_jax import dispatch as dispatch_lib
from moe_jax import experts as experts_lib
from moe_jax import grad_precision
from moe_jax import exchange as exchange_lib
from moe_jax import parallel as parallel_lib
from moe_jax import routing_trace
from moe_jax.config import MoEConfig
from moe_jax.routing import Routing
from moe_jax import routing as routing_lib
from moe_jax import routers as routers_lib

JITTER_EPS = 1e-2
ROUTER_STATE = "router_state"  # variable collection of the routers' non-parameter state
ROUTING_REPLAY = "routing_replay"  # variable collection of recorded routing codes to replay
ROUTING_RECORD = "routing_record"  # collection that receives each MoE layer's routing code


def gate_logits(gate: dict, x: jax.Array, *, moe: MoEConfig, train: bool,
                rng: Optional[jax.Array]) -> jax.Array:
    """x [S, M] -> logits [S, E] in float32. The Jitter policy scales the gate input by
    U(1 - 1e-2, 1 + 1e-2) while training."""
    x = x.astype(jnp.float32)
    if train and moe.noisy_gate_policy == "Jitter" and rng is not None:
        x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - JITTER_EPS, 1.0 + JITTER_EPS)
    return x @ gate["kernel"].astype(jnp.float32)


def route(gate: dict, x: jax.Array, *, moe: MoEConfig, train: bool, rng: Optional[jax.Array],
          drop_tokens: Optional[bool] = None, replay: Optional[jax.Array] = None) -> Routing:
    """The gate: logits (with Jitter), then the configured router (moe.router, a name of
    moe_jax.routers.ROUTERS). drop_tokens defaults to moe.drop_tokens, and is False whenever the
    dispatch path has no capacity. Without an rng the routing is deterministic (no jitter, RTS,
    RSample or second-expert sampling). gate: {kernel [M, E]} and, with aux-loss-free balancing,
    selection_bias [E] (moe_forward puts it there), which only the choice of experts reads.
    replay [S, k]: a recorded routing code that replaces the router's assignment
    (moe_jax.routing_trace.replay)."""
    rng_jitter, rng_router = jax.random.split(rng) if rng is not None else (None, None)
    logits = gate_logits(gate, x, moe=moe, train=train, rng=rng_jitter)
    if drop_tokens is None:
        drop_tokens = moe.drop_tokens and dispatch_lib.get_path(moe.dispatch).uses_capacity
    extra = {"selection_bias": gate["selection_bias"]} if "selection_bias" in gate else {}
    if moe.route_group_limit:  # group-limited routing: the other groups' experts cannot be chosen
        per_group = logits.shape[-1] // moe.route_groups
        if moe.router == "topk" and moe.k > moe.route_group_limit * per_group:
            raise ValueError(f"moe.k={moe.k} experts cannot come from moe.route_group_limit={moe.route_group_limit} "
                             f"groups of {per_group}; raise the limit or use fewer, larger groups")
        bias = extra.get("selection_bias", jnp.zeros((), jnp.float32))
        extra["selection_bias"] = bias + group_limit_mask(logits + bias, moe.route_groups, moe.route_group_limit)
    routing = routers_lib.ROUTERS[moe.router](logits, moe=moe, train=train, rng=rng_router, drop_tokens=drop_tokens,
                                             **extra)
    if replay is not None:
        routing = routing_trace.replay(routing, replay, logits)
    # model.remat="moe" keeps the routing table (moe_jax.experts.ROUTING): never routed twice
    return routing.replace(**{field: checkpoint_name(getattr(routing, field), experts_lib.ROUTING)
                              for field in ("expert_index", "slot", "weight", "kept")})


def group_limit_mask(scores: jax.Array, groups: int, limit: int) -> jax.Array:
    """[S, E] 0 for the experts of each token's `limit` best groups, -inf elsewhere. The E experts
    form `groups` contiguous groups (expert e in group e // (E / groups), the expert_node-major
    layout of the expert axes); a group's score for a token is its best expert's score."""
    num_tokens, num_experts = scores.shape
    if num_experts % groups:
        raise ValueError(f"moe.route_groups={groups} must divide the layer's {num_experts} experts")
    best = jnp.max(scores.reshape(num_tokens, groups, num_experts // groups), axis=-1)  # [S, G]
    _, chosen = jax.lax.top_k(jax.lax.stop_gradient(best), limit)  # [S, m]
    allowed = jnp.any(chosen[:, :, None] == jnp.arange(groups)[None, None, :], axis=1)  # [S, G]
    allowed = jnp.repeat(allowed, num_experts // groups, axis=1)
    return jnp.where(allowed, 0.0, -jnp.inf).astype(jnp.float32)


def dense_mlp(mlp: dict, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    hidden = grad_precision.matmul("...m,mf->...f", x, mlp["w1"], dtype)
    hidden = experts_lib.gelu(grad_precision.add_bias(hidden, mlp["b1"]))
    return grad_precision.add_bias(grad_precision.matmul("...f,fm->...m", hidden, mlp["w2"], dtype), mlp["b2"])


def residual_coefficient(coef: dict, x: jax.Array) -> jax.Array:
    """[S, 2] per-token mixing weights, softmax over the last axis (computed in float32)."""
    logits = x.astype(jnp.float32) @ coef["kernel"].astype(jnp.float32) + coef["bias"].astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def moe_forward(params: dict, x: jax.Array, *, moe: MoEConfig, train: bool,
                rng: Optional[jax.Array] = None, path: Optional[str] = None,
                parallel: Optional["parallel_lib.ParallelConfig"] = None,
                selection_bias: Optional[jax.Array] = None, replay: Optional[jax.Array] = None,
                record: bool = False) -> tuple[jax.Array, dict]:
    """One MoE layer on x [..., M] (all leading axes are tokens, as DeepSpeed flattens them).

    Returns (y [..., M], stats) with stats = moe_jax.routing.STAT_NAMES (aux_loss, z_loss,
    expert_counts [E], kept_counts [E], dropped_fraction, unrouted_fraction). With `parallel`, x is
    [B, T, M] sharded over the batch axes and routing and dispatch run per shard under shard_map
    (moe_jax.parallel); otherwise on all tokens at once. selection_bias [E]: aux-loss-free
    balancing's bias on the choice of experts (not differentiated: it is state, not a parameter).
    replay [..., k] (x's token axes): route with a recorded code (moe_jax.routing_trace); record:
    stats also hold "routing_code" [..., k], the code of the routing that ran.
    """
    shape = x.shape
    if selection_bias is not None:  # travels with the gate, so the sharded router reads it too
        gate = {**params["gate"], "selection_bias": jax.lax.stop_gradient(selection_bias).astype(jnp.float32)}
        params = {**params, "gate": gate}
    if path is not None:
        moe = dataclasses.replace(moe, dispatch=path)
    if parallel is not None:
        y, stats = exchange_lib.sharded_moe(params, x, moe=moe, train=train, rng=rng, par=parallel, route_fn=route,
                                            replay=replay, record=record)
    else:
        tokens = x.reshape(-1, shape[-1])
        flat_replay = None if replay is None else replay.reshape(tokens.shape[0], -1)
        routing = route(params["gate"], tokens, moe=moe, train=train, rng=rng, replay=flat_replay)
        y = dispatch_lib.dispatch(moe.dispatch, tokens, routing, params["experts"]).reshape(shape)
        seq_len = shape[-2] if len(shape) > 2 else tokens.shape[0]  # x [B, T, M]; x [S, M] is one sequence
        stats = routing_lib.routing_stats(routing, scope=moe.balance_loss_scope, seq_len=seq_len)
        if record:
            stats["routing_code"] = routing_trace.encode(routing).reshape(*shape[:-1], routing.k)
    if moe.residual:
        coef = residual_coefficient(params["residual"]["coef"], x).astype(y.dtype)
        y = y * coef[..., :1] + dense_mlp(params["residual"]["mlp"], x) * coef[..., 1:]
    if moe.shared_experts:  # always-on experts: y + sum of n experts' FFNs = one MLP n times as wide
        y = y + dense_mlp(params["shared"], x)
    return y, stats


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def init_mlp(rng: jax.Array, model_dim: int, ffn_size: int, init_std: float, out_std: float, param_dtype) -> dict:
    """A dense FFN's parameters {w1 [M, F], b1 [F], w2 [F, M], b2 [M]} (GPT-2 init, zero biases)."""
    rng_w1, rng_w2 = jax.random.split(rng)
    return {
        "w1": _normal(init_std)(rng_w1, (model_dim, ffn_size), param_dtype),
        "b1": jnp.zeros((ffn_size,), param_dtype),
        "w2": _normal(out_std)(rng_w2, (ffn_size, model_dim), param_dtype),
        "b2": jnp.zeros((model_dim,), param_dtype),
    }


def init_experts(rng: jax.Array, num_experts: int, model_dim: int, ffn_size: int, init_std: float, out_std: float,
                 param_dtype) -> dict:
    """E experts' parameters {w1 [E, M, F], b1 [E, F], w2 [E, F, M], b2 [E, M]}, each expert drawn
    independently."""
    rng_w1, rng_w2 = jax.random.split(rng)
    e, f, m = num_experts, ffn_size, model_dim
    return {
        "w1": _normal(init_std)(rng_w1, (e, m, f), param_dtype),
        "b1": jnp.zeros((e, f), param_dtype),
        "w2": _normal(out_std)(rng_w2, (e, f, m), param_dtype),
        "b2": jnp.zeros((e, m), param_dtype),
    }


def init_residual(rng: jax.Array, model_dim: int, ffn_size: int, init_std: float, out_std: float,
                  param_dtype) -> dict:
    """Residual-MoE's dense MLP and mixing coefficient {mlp: {...}, coef: {kernel [M, 2], bias [2]}}."""
    rng_mlp, rng_coef = jax.random.split(rng)
    return {
        "mlp": init_mlp(rng_mlp, model_dim, ffn_size, init_std, out_std, param_dtype),
        "coef": {"kernel": _normal(init_std)(rng_coef, (model_dim, 2), param_dtype),
                 "bias": jnp.zeros((2,), param_dtype)},
    }


class MLP(nn.Module):
    """GPT FFN: M -> F (GELU) -> M."""

    ffn_size: int
    init_std: float
    out_std: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        params = {
            "w1": self.param("w1", _normal(self.init_std), (x.shape[-1], self.ffn_size), self.param_dtype),
            "b1": self.param("b1", nn.initializers.zeros, (self.ffn_size,), self.param_dtype),
            "w2": self.param("w2", _normal(self.out_std), (self.ffn_size, x.shape[-1]), self.param_dtype),
            "b2": self.param("b2", nn.initializers.zeros, (x.shape[-1],), self.param_dtype),
        }
        return dense_mlp(params, x)


class MoELayer(nn.Module):
    """One MoE layer for training and serving: creates its parameters in `moe_forward`'s layout
    (gate, experts, residual: the module docstring) and runs `moe_forward` on exactly them. Uses the
    'gating' rng stream (jitter, RTS, noise) when the caller provides it. Serving is the same layer
    with the serving config (moe_jax.inference.serving_config: dispatch "serve", no dropping).

    With aux-loss-free balancing (moe.bias_update_rate > 0) the layer reads its per-expert
    selection bias [E] from the ROUTER_STATE variable collection (zeros at initialisation); the
    training step updates it (moe_jax.balancing), never the optimizer."""

    moe: MoEConfig
    num_experts: int
    ffn_size: int
    init_std: float
    out_std: float
    param_dtype: jnp.dtype = jnp.float32
    parallel: Optional[parallel_lib.ParallelConfig] = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
        model_dim = x.shape[-1]
        params = {
            # the gate stays float32 whatever param_dtype is: routing is an argmax over its logits
            "gate": self.param("gate", lambda rng: {"kernel": _normal(self.init_std)(
                rng, (model_dim, self.num_experts), jnp.float32)}),
            "experts": self.param("experts", init_experts, self.num_experts, model_dim, self.ffn_size,
                                  self.init_std, self.out_std, self.param_dtype),
        }
        if self.moe.residual:
            params["residual"] = self.param("residual", init_residual, model_dim, self.ffn_size, self.init_std,
                                            self.out_std, self.param_dtype)
        if self.moe.shared_experts:
            params["shared"] = self.param("shared", init_mlp, model_dim, self.moe.shared_experts * self.ffn_size,
                                          self.init_std, self.out_std, self.param_dtype)
        rng = self.make_rng("gating") if self.has_rng("gating") else None
        bias = None
        if self.moe.bias_update_rate > 0:
            if not (self.is_initializing() or self.has_variable(ROUTER_STATE, "selection_bias")):
                raise ValueError(f"moe.bias_update_rate={self.moe.bias_update_rate}: the model's {ROUTER_STATE!r} "
                                 "variables are missing; pass the train state's router_state to the model "
                                 "(moe_jax.model.apply(..., router_state=state['router_state']))")
            bias = self.variable(ROUTER_STATE, "selection_bias", jnp.zeros, (self.num_experts,), jnp.float32).value
        # routing replay and recording (moe_jax.routing_trace): a ROUTING_REPLAY variable "code"
        # replaces the gate's choice; a mutable ROUTING_RECORD collection receives the code that ran
        replay = self.get_variable(ROUTING_REPLAY, "code") if self.has_variable(ROUTING_REPLAY, "code") else None
        record = self.is_mutable_collection(ROUTING_RECORD)
        y, stats = moe_forward(params, x, moe=self.moe, train=train, rng=rng, parallel=self.parallel,
                               selection_bias=bias, replay=replay, record=record)
        if record:
            self.sow(ROUTING_RECORD, "code", stats.pop("routing_code"), reduce_fn=lambda _, new: new,
                     init_fn=lambda: None)
        return y, stats
