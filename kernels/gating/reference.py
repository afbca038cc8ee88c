"""Pure-jnp specification of the fused gating op (top-1 / top-2 with capacity dropping).

    fused_gating(logits [S, E], noise [S, E] | None, scores [S, E] | None, *, k, capacity)
        -> GatingOutputs

The kernels in kernel.py and triton_kernel.py compute exactly this; moe_jax.gating.top_k_gating
computes the same (tests hold them equal). `noise` is the routing noise that DeepSpeed adds to the
logits: for k=1 the RSample noise (the expert is argmax(logits + noise)); for k=2 the Gumbel noise
of the second choice (argmax(logits + noise) with the first masked). `scores` are the random token
selection (RTS) scores, k=1 only: an over-full expert keeps the C tokens whose score at that expert
is highest (ties: earlier token first) instead of the first C; kept tokens take slots in token
order either way. With drop_tokens=False the caller passes capacity = S: nothing can be dropped.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class GatingOutputs(NamedTuple):
    """The mapping table and the router's statistics (field meanings as moe_jax.routing.Routing)."""

    expert_index: jax.Array  # [S, k] int32
    slot: jax.Array  # [S, k] int32, 0 where dropped
    weight: jax.Array  # [S, k] float32, 0 where dropped
    kept: jax.Array  # [S, k] bool
    expert_counts: jax.Array  # [E] int32, copies routed to each expert before dropping
    aux_loss: jax.Array  # scalar: E * sum(gate_fraction * token_fraction)
    z_loss: jax.Array  # scalar
    dropped_fraction: jax.Array  # scalar
    gate_fraction: jax.Array  # [E] float32, mean gate probability (the aux loss's `me`)
    token_fraction: jax.Array  # [E] float32, fraction of first choices (the aux loss's `ce`)


def rank_within_expert(expert: jax.Array, priority: jax.Array, num_experts: int) -> jax.Array:
    """expert [S] int32, priority [S] -> [S] int32: each token's rank among the tokens of its expert
    by decreasing priority, ties to the earlier token (one stable sort, no [E, S] top-k)."""
    num_tokens = expert.shape[0]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    sorted_expert, _, sorted_token = jax.lax.sort((expert, -priority, token), num_keys=2, is_stable=True)
    counts = jnp.zeros(num_experts, jnp.int32).at[expert].add(1)
    group_start = jnp.cumsum(counts) - counts
    rank_in_sorted_order = token - group_start[sorted_expert]  # token doubles as the sorted position
    return jnp.zeros(num_tokens, jnp.int32).at[sorted_token].set(rank_in_sorted_order)


def fused_gating(logits: jax.Array, noise: Optional[jax.Array] = None, scores: Optional[jax.Array] = None,
                 *, k: int, capacity: int) -> GatingOutputs:
    """logits [S, E] (cast to float32), noise [S, E] or None, scores [S, E] or None (k=1 only);
    k in (1, 2); capacity C >= 1."""
    if k not in (1, 2):
        raise ValueError(f"fused gating handles k=1 and k=2; got k={k}")
    if scores is not None and k != 1:
        raise ValueError(f"random token selection scores are for k=1; got k={k}")
    logits = logits.astype(jnp.float32)
    num_tokens, num_experts = logits.shape
    gates = jax.nn.softmax(logits, axis=-1)
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    me = jnp.mean(gates, axis=0)

    if k == 1:
        first = jnp.argmax(gates if noise is None else logits + noise, axis=-1).astype(jnp.int32)
        experts = [first]
    else:
        first = jnp.argmax(gates, axis=-1).astype(jnp.int32)
        noisy = logits if noise is None else logits + noise
        is_first = jnp.arange(num_experts)[None, :] == first[:, None]
        second = jnp.argmax(jnp.where(is_first, -jnp.inf, noisy), axis=-1).astype(jnp.int32)
        experts = [first, second]

    # Slots: a copy's position among the copies sent to its expert, all first choices before any
    # second choice, each choice in token order.
    masks = [jax.nn.one_hot(e, num_experts, dtype=jnp.int32) for e in experts]
    offset = jnp.zeros(num_experts, jnp.int32)
    slots = []
    for expert, mask in zip(experts, masks):
        position = jnp.cumsum(mask, axis=0) - 1 + offset
        slots.append(jnp.take_along_axis(position, expert[:, None], axis=1)[:, 0])
        offset = offset + jnp.sum(mask, axis=0)
    expert_index = jnp.stack(experts, axis=1)
    slot = jnp.stack(slots, axis=1)
    kept = slot < capacity
    if scores is not None:
        priority = jnp.take_along_axis(scores.astype(jnp.float32), expert_index, axis=1)[:, 0]
        kept = (rank_within_expert(expert_index[:, 0], priority, num_experts) < capacity)[:, None]
        kept_hot = masks[0] * kept.astype(jnp.int32)
        slot = jnp.take_along_axis(jnp.cumsum(kept_hot, axis=0) - 1, expert_index, axis=1)
    probs = jnp.take_along_axis(gates, expert_index, axis=1) * kept
    if k == 1:
        weight = probs
    else:
        weight = probs / jnp.maximum(jnp.sum(probs, axis=1, keepdims=True), jnp.finfo(jnp.float32).eps)
    ce = jnp.mean(masks[0].astype(jnp.float32), axis=0)  # first choices only, for k=1 and k=2
    return GatingOutputs(
        expert_index=expert_index, slot=jnp.where(kept, slot, 0).astype(jnp.int32),
        weight=weight.astype(jnp.float32), kept=kept, expert_counts=offset,
        aux_loss=num_experts * jnp.sum(me * ce), z_loss=z_loss,
        dropped_fraction=1.0 - jnp.mean(kept.astype(jnp.float32)), gate_fraction=me, token_fraction=ce)


def differentiable_outputs(logits: jax.Array, expert_index: jax.Array, kept: jax.Array):
    """(weight [S, k], aux_loss, z_loss, gate_fraction [E]) as functions of the logits with the
    discrete routing fixed.

    The kernels' backward pass is jax.vjp of this: the experts, slots and drops carry no gradient,
    exactly as in the reference (argmax, cumsum and comparisons have zero derivative)."""
    logits = logits.astype(jnp.float32)
    num_experts = logits.shape[1]
    gates = jax.nn.softmax(logits, axis=-1)
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    me = jnp.mean(gates, axis=0)
    ce = jnp.mean(jax.nn.one_hot(expert_index[:, 0], num_experts, dtype=jnp.float32), axis=0)
    probs = jnp.take_along_axis(gates, expert_index, axis=1) * kept
    weight = probs
    if expert_index.shape[1] == 2:
        weight = probs / jnp.maximum(jnp.sum(probs, axis=1, keepdims=True), jnp.finfo(jnp.float32).eps)
    return weight, num_experts * jnp.sum(me * ce), z_loss, me
