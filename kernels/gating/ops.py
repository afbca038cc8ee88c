"""Public entry of the fused gating op: a drop-in for moe_jax.gating.top_k_gating.

    routing = top_k_gating(logits [S, E], k=..., capacity_factor=..., ...)   -> moe_jax.routing.Routing

Same arguments and the same Routing as the reference router. Which implementation runs:

  * k in (1, 2): the fused kernel. On a GPU the jax-triton kernel when jax_triton imports, else
    the Pallas one; `impl` forces "pallas", "triton" or "reference"; `interpret` as platform.mode
    (CPU default: the pure-jnp reference.fused_gating).
  * random token selection (RTS: k=1, use_rts, drop_tokens, with rts_scores or an rng): the scores
    are a kernel input, drawn from the rng exactly as the reference draws them. Only the Pallas
    kernel implements RTS, so on a GPU it runs there even when jax-triton is available; asking for
    impl="triton" with RTS is an error.
  * k > 2 (top-k over raw logits with the "probs" drop policy needs a per-expert sort):
    moe_jax.gating.top_k_gating itself.

Gradients: the routing decisions (experts, slots, drops) are piecewise constant; the weights,
aux loss, z-loss and gate fractions are differentiable in the logits. The backward pass is jax.vjp of
reference.differentiable_outputs with the kernel's decisions fixed, so training through the kernel
gives the reference's gradients.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import gating as gating_lib
from moe_jax.kernels import platform
from moe_jax.kernels.gating import kernel, reference, triton_kernel
from moe_jax import routing as routing_lib

IMPLS = ("pallas", "triton", "reference")


def _resolve_impl(impl: Optional[str], interpret: Optional[bool], rts: bool = False) -> tuple[str, bool]:
    """(implementation, interpret) from the caller's choice, the backend and whether RTS is on."""
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; use one of {IMPLS} or None")
    if impl == "triton" and rts:
        raise ValueError("the jax-triton gating kernel has no random token selection; use impl='pallas' "
                         "(or None) with use_rts=True, or use_rts=False with impl='triton'")
    if impl == "reference":
        return "reference", False
    run = platform.mode(interpret)
    if run == platform.INTERPRET:
        if impl == "triton":
            raise ValueError("the jax-triton kernel has no interpret mode; use impl='pallas' with "
                             "interpret=True, or run on a GPU")
        return "pallas", True
    if run == platform.REFERENCE:
        return "reference", False
    if impl is None:
        impl = "triton" if triton_kernel.available() and not rts else "pallas"
    return impl, False


def _run(impl: str, interpret: bool, block_sizes, logits, noise, scores, k,
         capacity) -> reference.GatingOutputs:
    if impl == "reference":
        return reference.fused_gating(logits, noise, scores, k=k, capacity=capacity)
    if impl == "triton":
        return triton_kernel.fused_gating(logits, noise, k=k, capacity=capacity, block_sizes=block_sizes)
    return kernel.fused_gating(logits, noise, scores, k=k, capacity=capacity, block_sizes=block_sizes,
                               interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 6, 7))
def _fused(impl, interpret, block_sizes, logits, noise, scores, k, capacity):
    return _run(impl, interpret, block_sizes, logits, noise, scores, k, capacity)


def _fused_fwd(impl, interpret, block_sizes, logits, noise, scores, k, capacity):
    outputs = _run(impl, interpret, block_sizes, logits, noise, scores, k, capacity)
    return outputs, (logits, outputs.expert_index, outputs.kept)


def _fused_bwd(impl, interpret, block_sizes, k, capacity, residuals, cotangents):
    logits, expert_index, kept = residuals
    _, vjp = jax.vjp(lambda lg: reference.differentiable_outputs(lg, expert_index, kept), logits)
    (d_logits,) = vjp((cotangents.weight, cotangents.aux_loss, cotangents.z_loss, cotangents.gate_fraction))
    # The noise only moves argmaxes and the RTS scores only choose which copies are kept: no gradient.
    return d_logits.astype(logits.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def top_k_gating(
    logits: jax.Array,
    *,
    k: int,
    capacity_factor: float,
    min_capacity: int = 4,
    drop_tokens: bool = True,
    use_rts: bool = False,
    second_expert_sampling: bool = False,
    drop_policy: str = "probs",
    rng: Optional[jax.Array] = None,
    rts_scores: Optional[jax.Array] = None,
    gumbel: Optional[jax.Array] = None,
    rsample_noise: Optional[jax.Array] = None,
    impl: Optional[str] = None,
    interpret: Optional[bool] = None,
    block_sizes: kernel.BlockSizes = kernel.BlockSizes(),
) -> routing_lib.Routing:
    """moe_jax.gating.top_k_gating (see its docstring for every argument) through the fused kernel.

    Extra arguments: impl ("pallas", "triton", "reference" or None: the best available),
    interpret (platform.mode), block_sizes (kernel.BlockSizes).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [S, E]; got shape {logits.shape}")
    num_tokens, num_experts = logits.shape
    if k > 2:
        return gating_lib.top_k_gating(
            logits, k=k, capacity_factor=capacity_factor, min_capacity=min_capacity,
            drop_tokens=drop_tokens, use_rts=use_rts, second_expert_sampling=second_expert_sampling,
            drop_policy=drop_policy, rng=rng, rts_scores=rts_scores, gumbel=gumbel,
            rsample_noise=rsample_noise)
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be between 1 and the number of experts ({num_experts})")
    # The reference's draws, split for split, so a given rng routes identically.
    rng_rts, rng_gumbel = jax.random.split(rng) if rng is not None else (None, None)
    rts = k == 1 and use_rts and drop_tokens and (rts_scores is not None or rng is not None)
    if rts and rts_scores is None:
        rts_scores = jax.random.uniform(rng_rts, logits.shape)
    if k == 2 and second_expert_sampling and gumbel is None and rng is not None:
        gumbel = jax.random.gumbel(rng_gumbel, logits.shape)
    noise = rsample_noise if k == 1 else gumbel
    if drop_tokens:
        capacity = routing_lib.compute_capacity(num_tokens, num_experts, capacity_factor, min_capacity, k)
    else:
        capacity = num_tokens
    impl, interpret = _resolve_impl(impl, interpret, rts)
    logits = logits.astype(jnp.float32)
    noise = None if noise is None else jax.lax.stop_gradient(noise.astype(jnp.float32))
    scores = jax.lax.stop_gradient(rts_scores.astype(jnp.float32)) if rts else None
    outputs = _fused(impl, interpret, block_sizes, logits, noise, scores, k, capacity)
    return routing_lib.Routing(
        expert_index=outputs.expert_index, slot=outputs.slot, weight=outputs.weight, kept=outputs.kept,
        aux_loss=outputs.aux_loss, z_loss=outputs.z_loss, expert_counts=outputs.expert_counts,
        dropped_fraction=outputs.dropped_fraction, gate_fraction=outputs.gate_fraction,
        token_fraction=outputs.token_fraction, capacity=capacity, num_experts=num_experts,
        aux_scale=float(num_experts), renormalized=k > 1,
        # the per-token terms of the two fractions, as moe_jax.gating.top_k_gating defines them (the
        # sequence-level balance loss and the router entropy read them): the softmax, and the first choice
        token_gates=jax.nn.softmax(logits, axis=-1),
        token_choices=jax.nn.one_hot(outputs.expert_index[:, 0], num_experts, dtype=jnp.float32))
