"""The MoE layer: gate, experts, top-k routing, Residual-MoE.

Math lives in pure functions over a parameter dict so that jit, shard_map and the kernels can call
them directly; `MoELayer` is a thin Flax Linen module that creates the parameters and calls them.

Parameters of one layer (E experts, model dim M, expert FFN dim F):
  gate     {kernel [M, E]}                      bias-free, logits in float32
  experts  {w1 [E, M, F], b1 [E, F], w2 [E, F, M], b2 [E, M]}
  residual {mlp: {w1 [M, F], b1 [F], w2 [F, M], b2 [M]}, coef: {kernel [M, 2], bias [2]}}  (Residual-MoE)

Residual-MoE (DeepSpeed's use_residual): y = moe(x) * c[..., 0] + mlp(x) * c[..., 1] with
c = softmax(x @ coef.kernel + coef.bias, axis=-1), the per-token mixing coefficient.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax import parallel as parallel_lib
from moe_jax.config import MoEConfig
from moe_jax.gating import Routing, top_k_gating

JITTER_EPS = 1e-2


def gate_logits(gate: dict, x: jax.Array, *, moe: MoEConfig, train: bool,
                rng: Optional[jax.Array]) -> jax.Array:
    """x [S, M] -> logits [S, E] in float32. The Jitter policy scales the gate input by
    U(1 - 1e-2, 1 + 1e-2) while training."""
    x = x.astype(jnp.float32)
    if train and moe.noisy_gate_policy == "Jitter" and rng is not None:
        x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - JITTER_EPS, 1.0 + JITTER_EPS)
    return x @ gate["kernel"].astype(jnp.float32)


def route(gate: dict, x: jax.Array, *, moe: MoEConfig, train: bool, rng: Optional[jax.Array],
          drop_tokens: Optional[bool] = None) -> Routing:
    """The gate module: logits (with Jitter), RSample noise, then DeepSpeed's top-k gating.
    Without an rng the routing is deterministic (no jitter, RTS, RSample or second-expert sampling)."""
    rng_jitter, rng_rsample, rng_gating = jax.random.split(rng, 3) if rng is not None else (None,) * 3
    logits = gate_logits(gate, x, moe=moe, train=train, rng=rng_jitter)
    rsample_noise = None
    if train and moe.noisy_gate_policy == "RSample" and rng_rsample is not None:
        rsample_noise = jax.random.gumbel(rng_rsample, logits.shape)
    if drop_tokens is None:
        drop_tokens = moe.drop_tokens and moe.dispatch != "dropless"
    gating_fn = top_k_gating
    if moe.dispatch == "kernel":  # the fused gating kernel (its jnp reference off GPU)
        from moe_jax.kernels.gating import ops as gating_kernel

        gating_fn = gating_kernel.top_k_gating
    return gating_fn(
        logits, k=moe.k,
        capacity_factor=moe.capacity_factor if train else moe.eval_capacity_factor,
        min_capacity=moe.min_capacity, drop_tokens=drop_tokens, use_rts=moe.use_rts,
        second_expert_sampling=moe.second_expert_sampling, drop_policy=moe.drop_policy,
        rng=rng_gating, rsample_noise=rsample_noise)


def dense_mlp(mlp: dict, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    hidden = dispatch_lib.gelu(x @ mlp["w1"].astype(dtype) + mlp["b1"].astype(dtype))
    return hidden @ mlp["w2"].astype(dtype) + mlp["b2"].astype(dtype)


def residual_coefficient(coef: dict, x: jax.Array) -> jax.Array:
    """[S, 2] per-token mixing weights, softmax over the last axis (computed in float32)."""
    logits = x.astype(jnp.float32) @ coef["kernel"].astype(jnp.float32) + coef["bias"].astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1)


def routing_stats(routing: Routing) -> dict:
    return {
        "aux_loss": routing.aux_loss,
        "z_loss": routing.z_loss,
        "expert_counts": routing.expert_counts,
        "kept_counts": routing.kept_counts(),
        "dropped_fraction": routing.dropped_fraction,
    }


def moe_forward(params: dict, x: jax.Array, *, moe: MoEConfig, train: bool,
                rng: Optional[jax.Array] = None, path: Optional[str] = None,
                parallel: Optional["parallel_lib.ParallelConfig"] = None) -> tuple[jax.Array, dict]:
    """One MoE layer on x [..., M] (all leading axes are tokens, as DeepSpeed flattens them).

    Returns (y [..., M], stats) with stats = aux_loss, z_loss, expert_counts [E], kept_counts [E],
    dropped_fraction. With `parallel`, x is [B, T, M] sharded over the batch axes and routing and
    dispatch run per shard under shard_map (moe_jax.parallel); otherwise on all tokens at once.
    """
    shape = x.shape
    if parallel is not None:
        moe = moe if path is None else dataclasses.replace(moe, dispatch=path)
        y, stats = parallel_lib.sharded_moe(params, x, moe=moe, train=train, rng=rng, par=parallel, route_fn=route)
    else:
        tokens = x.reshape(-1, shape[-1])
        routing = route(params["gate"], tokens, moe=moe, train=train, rng=rng)
        y = dispatch_lib.dispatch(path or moe.dispatch, tokens, routing, params["experts"]).reshape(shape)
        stats = routing_stats(routing)
    if moe.residual:
        coef = residual_coefficient(params["residual"]["coef"], x).astype(y.dtype)
        y = y * coef[..., :1] + dense_mlp(params["residual"]["mlp"], x) * coef[..., 1:]
    return y, stats


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


class MLP(nn.Module):
    """GPT FFN: M -> F (GELU) -> M."""

    ffn_size: int
    init_std: float
    out_std: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        params = mlp_params(self, x.shape[-1], self.ffn_size, self.init_std, self.out_std, self.param_dtype)
        return dense_mlp(params, x)


def mlp_params(module: nn.Module, model_dim: int, ffn_size: int, init_std: float, out_std: float,
               param_dtype) -> dict:
    return {
        "w1": module.param("w1", _normal(init_std), (model_dim, ffn_size), param_dtype),
        "b1": module.param("b1", nn.initializers.zeros, (ffn_size,), param_dtype),
        "w2": module.param("w2", _normal(out_std), (ffn_size, model_dim), param_dtype),
        "b2": module.param("b2", nn.initializers.zeros, (model_dim,), param_dtype),
    }


class Experts(nn.Module):
    num_experts: int
    ffn_size: int
    init_std: float
    out_std: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, model_dim: int) -> dict:
        e, f, m = self.num_experts, self.ffn_size, model_dim
        return {
            "w1": self.param("w1", _normal(self.init_std), (e, m, f), self.param_dtype),
            "b1": self.param("b1", nn.initializers.zeros, (e, f), self.param_dtype),
            "w2": self.param("w2", _normal(self.out_std), (e, f, m), self.param_dtype),
            "b2": self.param("b2", nn.initializers.zeros, (e, m), self.param_dtype),
        }


class MoELayer(nn.Module):
    """Creates one MoE layer's parameters and runs `moe_forward`. Uses the 'gating' rng stream
    (jitter, RTS, noise) when the caller provides it."""

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
            "gate": {"kernel": self.param("gate", _normal(self.init_std), (model_dim, self.num_experts),
                                          jnp.float32)},
            "experts": Experts(self.num_experts, self.ffn_size, self.init_std, self.out_std,
                               self.param_dtype, name="experts")(model_dim),
        }
        if self.moe.residual:
            mlp_module = _ParamScope(name="residual_mlp")
            params["residual"] = {
                "mlp": mlp_module.make(model_dim, self.ffn_size, self.init_std, self.out_std, self.param_dtype),
                "coef": {
                    "kernel": self.param("coef_kernel", _normal(self.init_std), (model_dim, 2), self.param_dtype),
                    "bias": self.param("coef_bias", nn.initializers.zeros, (2,), self.param_dtype),
                },
            }
        rng = self.make_rng("gating") if self.has_rng("gating") else None
        return moe_forward(params, x, moe=self.moe, train=train, rng=rng, parallel=self.parallel)


class _ParamScope(nn.Module):
    """A named scope for a group of MLP parameters."""

    @nn.compact
    def make(self, model_dim, ffn_size, init_std, out_std, param_dtype) -> dict:
        return mlp_params(self, model_dim, ffn_size, init_std, out_std, param_dtype)
