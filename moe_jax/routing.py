"""The mapping table every router returns (`Routing`), its statistics and DeepSpeed's capacity.

A router (moe_jax.routers) turns gate logits into a `Routing`; dispatch paths, the expert-parallel
exchange, the aux-loss reduction and the metrics read only its fields, never a router's internals.
`routing_stats` gives a layer's statistics (STAT_NAMES), reduced over mesh axes under shard_map;
`compute_capacity` is DeepSpeed's expert capacity (deepspeed/moe/sharded_moe.py `_capacity`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Routing:
    """The mapping table: where each token's k copies go and with what weight.

    Token-major: row s holds token s's k copies. A router that is not token-major fits it too:
    with expert-choice routing (each expert picks its C tokens, so a token gets 0..E experts) the
    table has k = E columns, column e standing for expert e (expert_index[s, e] = e), kept[s, e]
    telling whether expert e picked token s, slot its position in e's buffer and weight its combine
    weight (0 where not picked). Consumers never assume kept copies are a prefix of a row, that a
    token has any kept copy, or that k is small; they read capacity, num_experts and the fields.
    The aux loss is aux_scale * sum_e(gate_fraction[e] * token_fraction[e]); under expert
    parallelism the two fractions are averaged over all shards before the product
    (`routing_stats(..., axes=...)`), so a router defines its balance loss through them.
    """

    expert_index: jax.Array  # [S, k] int32
    slot: jax.Array  # [S, k] int32
    weight: jax.Array  # [S, k] float32
    kept: jax.Array  # [S, k] bool
    aux_loss: jax.Array  # scalar
    z_loss: jax.Array  # scalar
    expert_counts: jax.Array  # [E] int32, copies routed to each expert before dropping
    dropped_fraction: jax.Array  # scalar: dropped copies / (S * k)
    gate_fraction: jax.Array  # [E] mean gate probability per expert (aux loss term `me`)
    token_fraction: jax.Array  # [E] fraction of tokens choosing each expert (aux loss term `ce`)
    capacity: int = struct.field(pytree_node=False)
    num_experts: int = struct.field(pytree_node=False)
    aux_scale: float = struct.field(pytree_node=False, default=1.0)  # aux = scale * sum(me * ce)
    # combine weights: the kept copies' gate probabilities renormalised to sum to 1 per token (True),
    # or the raw gate probabilities (False); routing replay (moe_jax.routing_trace) follows the rule
    renormalized: bool = struct.field(pytree_node=False, default=False)
    # the function of the gate logits whose values the combine weights are ("softmax"; "sigmoid":
    # each expert's own score, DeepSeek-V3); routing replay recomputes the weights with it
    score_fn: str = struct.field(pytree_node=False, default="softmax")
    # column e stands for expert e and a column not kept is no copy at all (expert-choice), rather
    # than a routed copy that was dropped (token-major routers)
    column_per_expert: bool = struct.field(pytree_node=False, default=False)
    # Per token, the terms whose means are the two fractions: the sequence-level balance loss
    # averages the product per sequence (routing_stats). None: the router reports the means only.
    token_gates: Optional[jax.Array] = None  # [S, E] float32
    token_choices: Optional[jax.Array] = None  # [S, E] float32

    @property
    def num_tokens(self) -> int:
        return self.expert_index.shape[0]

    @property
    def k(self) -> int:
        return self.expert_index.shape[1]

    def kept_counts(self) -> jax.Array:
        """[E] copies each expert actually processes."""
        return jnp.zeros(self.num_experts, jnp.int32).at[self.expert_index.reshape(-1)].add(
            self.kept.reshape(-1).astype(jnp.int32))

    def flat_position(self) -> jax.Array:
        """[S, k] row of each copy in the flattened [E * C] buffer; E * C (out of range) where dropped."""
        position = self.expert_index * self.capacity + self.slot
        return jnp.where(self.kept, position, self.num_experts * self.capacity)

    def to_dense(self, capacity: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
        """DeepSpeed's layout: combine_weights [S, E, C] float32 and dispatch_mask [S, E, C] bool."""
        capacity = self.capacity if capacity is None else capacity
        expert_hot = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)  # [S,k,E]
        slot_hot = jax.nn.one_hot(jnp.where(self.kept, self.slot, capacity), capacity,
                                  dtype=jnp.float32)  # [S,k,C]; dropped copies are all-zero rows
        combine = jnp.einsum("ske,skc->sec", expert_hot * self.weight[..., None], slot_hot)
        dispatch = jnp.einsum("ske,skc->sec", expert_hot, slot_hot) > 0
        return combine, dispatch


STAT_NAMES = ("aux_loss", "z_loss", "expert_counts", "kept_counts", "dropped_fraction", "unrouted_fraction",
              "router_entropy")


def unrouted_fraction(routing: Routing) -> jax.Array:
    """Fraction of tokens with no kept copy: the MoE part of their layer outputs 0 (top-k: every
    copy dropped; expert-choice: no expert took the token)."""
    return jnp.mean(~jnp.any(routing.kept, axis=1), dtype=jnp.float32)


BALANCE_LOSS_SCOPES = ("global", "per_shard", "sequence")


def sequence_aux_loss(routing: Routing, seq_len: int) -> jax.Array:
    """The balance loss per sequence of seq_len consecutive tokens, averaged over sequences."""
    if routing.token_gates is None or routing.token_choices is None:
        raise ValueError("this router reports no per-token gate and choice terms, so it has no sequence-level "
                         "balance loss; set moe.balance_loss_scope='global'")
    shape = (-1, seq_len, routing.num_experts)
    gates = routing.token_gates.reshape(shape).mean(axis=1)  # [B, E]
    choices = routing.token_choices.reshape(shape).mean(axis=1)
    return routing.aux_scale * jnp.mean(jnp.sum(gates * choices, axis=-1))


def routing_stats(routing: Routing, axes: Optional[str | Sequence[str]] = None, *, scope: str = "global",
                  seq_len: Optional[int] = None) -> dict:
    """The layer's statistics (STAT_NAMES): aux_loss, z_loss, expert_counts [E], kept_counts [E],
    dropped_fraction, unrouted_fraction.

    With `axes` (inside shard_map) they are reduced over those mesh axes: counts summed, z_loss and
    the fractions averaged. The aux loss by `scope` (MoEConfig.balance_loss_scope): "global" averages
    the gate and token fractions over all shards before the product (the loss of one device on all
    the tokens); "per_shard" averages each shard's own loss (DeepSpeed's, where each rank's l_aux
    sees its local tokens only; on one device the same as global); "sequence" takes the loss of each
    sequence of seq_len tokens and averages them."""
    if scope not in BALANCE_LOSS_SCOPES:
        raise ValueError(f"moe.balance_loss_scope={scope!r} is unknown; use one of {BALANCE_LOSS_SCOPES}")
    aux_loss = routing.aux_loss if scope != "sequence" else sequence_aux_loss(routing, seq_len)
    if axes is None:
        return {"aux_loss": aux_loss, "z_loss": routing.z_loss, "expert_counts": routing.expert_counts,
                "kept_counts": routing.kept_counts(), "dropped_fraction": routing.dropped_fraction,
                "unrouted_fraction": unrouted_fraction(routing), "router_entropy": router_entropy(routing)}
    if scope == "global":
        gate_fraction = jax.lax.pmean(routing.gate_fraction, axes)
        token_fraction = jax.lax.pmean(routing.token_fraction, axes)
        aux_loss = routing.aux_scale * jnp.sum(gate_fraction * token_fraction)
    else:
        aux_loss = jax.lax.pmean(aux_loss, axes)
    return {
        "aux_loss": aux_loss,
        "z_loss": jax.lax.pmean(routing.z_loss, axes),
        "expert_counts": jax.lax.psum(routing.expert_counts, axes),
        "kept_counts": jax.lax.psum(routing.kept_counts(), axes),
        "dropped_fraction": jax.lax.pmean(routing.dropped_fraction, axes),
        "unrouted_fraction": jax.lax.pmean(unrouted_fraction(routing), axes),
        "router_entropy": jax.lax.pmean(router_entropy(routing), axes),
    }


def router_entropy(routing: Routing) -> jax.Array:
    """Mean entropy (nats) of the tokens' gate distributions: log E undecided, 0 certain; NaN without token_gates."""
    if routing.token_gates is None:
        return jnp.full((), jnp.nan, jnp.float32)
    gates = routing.token_gates.astype(jnp.float32)
    return jnp.mean(-jnp.sum(gates * jnp.log(jnp.maximum(gates, 1e-30)), axis=-1))


def compute_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int,
                     k: int = 1) -> int:
    """DeepSpeed's `_capacity`: ceil(S / E * (k * cf)) in float32, at least min_capacity."""
    factor = np.float32(capacity_factor * k)  # torch.tensor(capacity_factor * k): python product, then f32
    capacity = int(np.ceil(np.float32(num_tokens / num_experts) * factor))
    return max(capacity, int(min_capacity))
