"""Routers and the mapping table they return: one registry, DeepSpeed's top-k router first.

A router turns gate logits into a `Routing`. Every router has one signature,

    routing = ROUTERS[name](logits [S, E] float32, *, moe, train, rng, drop_tokens)

(`moe` a moe_jax.config.MoEConfig, `rng` None for deterministic routing, `drop_tokens` False when
the dispatch path has no capacity), and is chosen by `MoEConfig.router`. A router that supports
aux-loss-free balancing (MoEConfig.bias_update_rate) also takes `selection_bias` [E], a bias on the
scores that choose experts, never on the combine weights. Adding one is a function,
a `@register_router("name")` line and its tests: dispatch paths, the expert-parallel exchange, the
aux-loss reduction and the metrics read only the `Routing` fields below, never a router's internals.

Top-k gating with DeepSpeed's semantics, returning the dense token-to-expert mapping table.

`top_k_gating(logits [S, E], ...)` reproduces `deepspeed.moe.sharded_moe.top1gating`,
`top2gating` and `topkgating` (DeepSpeed 0.19.8; tested against its own outputs in
tests/data/deepspeed_gating.npz) and returns a `Routing`:

  expert_index [S, k] int32  the k experts of each token (choice order: first, second, ...)
  slot         [S, k] int32  position of that copy in its expert's buffer (0 where dropped)
  weight       [S, k] f32    combine weight (0 where dropped)
  kept         [S, k] bool   whether the copy fits in its expert's capacity

Semantics (REFERENCE.md):
  * capacity C = max(ceil(S / E * k * cf), min_capacity) evaluated in float32 as DeepSpeed does;
    with drop_tokens=False nothing is dropped and the static buffer size is C = S (no expert can
    receive more than S copies, since a token's k experts are distinct).
  * k=1: expert = argmax softmax (of logits + Gumbel noise under RSample); weight = raw softmax
    probability. Over-full experts keep their first C tokens, or with random token selection
    (use_rts) the C tokens with the highest uniform score. Kept tokens are packed in token order.
    DeepSpeed's non-RTS survivor choice is torch.topk over equal values (unspecified order); this
    implementation keeps the first C tokens, which is what its cumsum slots intend.
  * k=2: second expert = argmax of logits (+ Gumbel noise when second_expert_sampling) with the first
    masked. All first choices take slots before any second choice. Dropping is positional. The two
    weights are renormalised after dropping: g_i / max(g_1 + g_2, eps).
  * k>2: experts = top-k of the raw logits; drop policy "probs" keeps, per expert, the C copies with
    the highest softmax probability (what DeepSpeed 0.19.8 outputs: its golden vectors rank by
    probability, not by logit), or "position" (first come); slots in token order; weights = softmax
    renormalised over the surviving experts. DeepSpeed's no-drop path for k>2 is broken; this one
    works.
  * aux loss: E * sum_e mean_s(gates)[e] * mean_s(first-choice mask)[e] for k=1,2;
    E^2 / k * mean_e(mean_s(gates) * mean_s(top-k mask)) for k>2.
  * router z-loss (ST-MoE): mean_s logsumexp(logits)^2, reported always, weighted by the caller.

The random parts can be passed as arrays (rts_scores, gumbel, rsample_noise) to replay a run
exactly; otherwise they are drawn from `rng`, and with neither the routing is deterministic
(no RTS, no sampling).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# the one definition of a copy's rank among its expert's copies (also the fused kernel's spec)
from moe_jax.kernels.gating.reference import rank_within_expert



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


def _slots_in_token_order(mask: jax.Array) -> jax.Array:
    """mask [S, E] (0/1) -> position of each marked token among the marked tokens of its column."""
    return jnp.cumsum(mask, axis=0) - 1


def _take(matrix: jax.Array, index: jax.Array) -> jax.Array:
    """matrix [S, E], index [S, k] -> matrix[s, index[s, i]]."""
    return jnp.take_along_axis(matrix, index, axis=1)


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
    selection_bias: Optional[jax.Array] = None,
) -> Routing:
    """Routes S tokens to k of E experts with DeepSpeed's semantics (module docstring).

    Args:
      logits: [S, E] gate logits (computed in float32).
      k: experts per token.
      capacity_factor: the factor in C = ceil(S / E * k * cf) (pass the eval factor when evaluating).
      min_capacity: lower bound of C.
      drop_tokens: False: no token is dropped (static buffer size C = S).
      use_rts: k=1: random token selection among an over-full expert's tokens.
      second_expert_sampling: k=2: Gumbel noise on the logits when picking the second expert.
      drop_policy: k>2: "probs" (keep highest logits) or "position" (keep first come).
      rng: draws rts_scores / gumbel when they are needed and not given.
      rts_scores: [S, E] uniform [0, 1) RTS priorities (only [s, chosen expert] is read).
      gumbel: [S, E] Gumbel noise for the second choice of top-2.
      rsample_noise: [S, E] noise added to the logits for the top-1 choice (RSample policy).
      selection_bias: [E] added to the logits for choosing the experts only (aux-loss-free
        balancing); the combine weights and the aux loss's gate fractions stay softmax(logits).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [S, E]; got shape {logits.shape}")
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be between 1 and the number of experts ({num_experts})")
    if drop_policy not in ("probs", "position"):
        raise ValueError(f"drop_policy={drop_policy!r}; use 'probs' or 'position'")
    logits = logits.astype(jnp.float32)
    rng_rts, rng_gumbel = jax.random.split(rng) if rng is not None else (None, None)
    if k == 1 and use_rts and drop_tokens and rts_scores is None and rng_rts is not None:
        rts_scores = jax.random.uniform(rng_rts, logits.shape)
    if k == 2 and second_expert_sampling and gumbel is None and rng_gumbel is not None:
        gumbel = jax.random.gumbel(rng_gumbel, logits.shape)

    gates = jax.nn.softmax(logits, axis=-1)
    selection = logits if selection_bias is None else logits + selection_bias.astype(jnp.float32)
    if drop_tokens:
        capacity = compute_capacity(num_tokens, num_experts, capacity_factor, min_capacity, k)
    else:
        capacity = num_tokens
    me = jnp.mean(gates, axis=0)
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)

    if k == 1:
        choose_from = gates if rsample_noise is None else selection + rsample_noise
        if rsample_noise is None and selection_bias is not None:
            choose_from = selection
        expert_index = jnp.argmax(choose_from, axis=-1).astype(jnp.int32)[:, None]
        mask = jax.nn.one_hot(expert_index[:, 0], num_experts, dtype=jnp.int32)
        ce = jnp.mean(mask.astype(jnp.float32), axis=0)
        choices = mask
        aux_scale = float(num_experts)
        if not drop_tokens:
            kept_mask = mask
        elif use_rts and rts_scores is not None:
            priority = _take(rts_scores.astype(jnp.float32), expert_index)[:, 0]
            rank = rank_within_expert(expert_index[:, 0], priority, num_experts)
            kept_mask = mask * (rank < capacity)[:, None]
        else:
            kept_mask = mask * (_slots_in_token_order(mask) < capacity)
        kept = _take(kept_mask, expert_index) > 0
        slot = _take(_slots_in_token_order(kept_mask), expert_index)
        weight = _take(gates, expert_index) * kept
        expert_counts = jnp.sum(mask, axis=0)
    elif k == 2:
        first = jnp.argmax(gates if selection_bias is None else selection, axis=-1).astype(jnp.int32)
        mask1 = jax.nn.one_hot(first, num_experts, dtype=jnp.int32)
        noisy = selection if gumbel is None else selection + gumbel
        second = jnp.argmax(jnp.where(mask1 > 0, -jnp.inf, noisy), axis=-1).astype(jnp.int32)
        mask2 = jax.nn.one_hot(second, num_experts, dtype=jnp.int32)
        location1 = _slots_in_token_order(mask1)
        location2 = _slots_in_token_order(mask2) + jnp.sum(mask1, axis=0, keepdims=True)
        ce = jnp.mean(mask1.astype(jnp.float32), axis=0)  # first choices only
        choices = mask1
        aux_scale = float(num_experts)  # DeepSpeed: mean(me * ce) * E * E
        expert_index = jnp.stack([first, second], axis=1)
        slot = jnp.stack([_take(location1, first[:, None])[:, 0], _take(location2, second[:, None])[:, 0]], 1)
        kept = slot < capacity
        probs = _take(gates, expert_index) * kept
        denom = jnp.maximum(jnp.sum(probs, axis=1, keepdims=True), jnp.finfo(jnp.float32).eps)
        weight = probs / denom
        expert_counts = jnp.sum(mask1 + mask2, axis=0)
    else:
        _, expert_index = jax.lax.top_k(selection, k)
        expert_index = expert_index.astype(jnp.int32)
        mask = jnp.zeros((num_tokens, num_experts), jnp.int32).at[
            jnp.arange(num_tokens)[:, None], expert_index].set(1)
        ce = jnp.mean(mask.astype(jnp.float32), axis=0)
        choices = mask
        aux_scale = num_experts / k  # DeepSpeed: mean(me * ce) * E^2 / k
        if not drop_tokens:
            kept_mask = mask
        elif drop_policy == "probs":
            flat_expert = expert_index.reshape(-1)
            rank = rank_within_expert(flat_expert, _take(gates, expert_index).reshape(-1), num_experts)
            kept_copy = (rank < capacity).reshape(num_tokens, k)
            kept_mask = jnp.zeros_like(mask).at[jnp.arange(num_tokens)[:, None], expert_index].set(
                kept_copy.astype(jnp.int32))
        else:
            kept_mask = mask * (_slots_in_token_order(mask) < capacity)
        kept = _take(kept_mask, expert_index) > 0
        slot = _take(_slots_in_token_order(kept_mask), expert_index)
        probs = _take(gates, expert_index) * kept
        denom = jnp.maximum(jnp.sum(probs, axis=1, keepdims=True), jnp.finfo(jnp.float32).eps)
        weight = probs / denom
        expert_counts = jnp.sum(mask, axis=0)

    slot = jnp.where(kept, slot, 0).astype(jnp.int32)
    dropped_fraction = 1.0 - jnp.mean(kept.astype(jnp.float32))
    return Routing(
        expert_index=expert_index, slot=slot, weight=weight.astype(jnp.float32), kept=kept,
        aux_loss=aux_scale * jnp.sum(me * ce), z_loss=z_loss, expert_counts=expert_counts.astype(jnp.int32),
        dropped_fraction=dropped_fraction, gate_fraction=me, token_fraction=ce, capacity=capacity,
        num_experts=num_experts, aux_scale=aux_scale, renormalized=k > 1, token_gates=gates,
        token_choices=choices.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# The router registry
# ----------------------------------------------------------------------------------------------

Router = Callable[..., Routing]
ROUTERS: dict[str, Router] = {}
NON_CAUSAL_ROUTERS: set[str] = set()  # routers whose choice for a token reads later tokens
ROUTER_IMPLS: dict[str, tuple[str, ...]] = {}  # router -> the MoEConfig.router_impl values it implements


def register_router(name: str, *, causal: bool = True, impls: tuple[str, ...] = ("jnp",)) -> Callable[[Router], Router]:
    """Adds a router to ROUTERS under `name` (the value of MoEConfig.router that selects it).
    causal=False: a token's routing depends on other tokens of its group, later ones included, so
    the router cannot decode token by token (moe_jax.inference refuses it). impls: the values of
    MoEConfig.router_impl it runs (the config refuses the others rather than ignore them)."""

    def add(fn: Router) -> Router:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is registered twice")
        ROUTERS[name] = fn
        ROUTER_IMPLS[name] = tuple(impls)
        if not causal:
            NON_CAUSAL_ROUTERS.add(name)
        return fn

    return add


@register_router("topk", impls=("jnp", "kernel"))
def topk_router(logits: jax.Array, *, moe, train: bool, rng: Optional[jax.Array], drop_tokens: bool,
                selection_bias: Optional[jax.Array] = None) -> Routing:
    """DeepSpeed's top-k gating (`top_k_gating`) with the RSample policy's Gumbel noise on the top-1
    choice while training, and the training or eval capacity factor. moe.router_impl="kernel" runs
    the fused gating kernel (moe_jax.kernels.gating; its jnp reference off GPU), same outputs.
    selection_bias [E]: aux-loss-free balancing's bias on the choice (jnp router only)."""
    rng_rsample, rng_gating = jax.random.split(rng) if rng is not None else (None, None)
    rsample_noise = None
    if train and moe.noisy_gate_policy == "RSample" and rng_rsample is not None:
        rsample_noise = jax.random.gumbel(rng_rsample, logits.shape)
    gating_fn = top_k_gating
    extra = {} if selection_bias is None else {"selection_bias": selection_bias}
    if moe.router_impl == "kernel":
        from moe_jax.kernels.gating import ops as gating_kernel  # lazy: the kernels import this module

        gating_fn = gating_kernel.top_k_gating
    return gating_fn(
        logits, k=moe.k, capacity_factor=moe.capacity_factor if train else moe.eval_capacity_factor,
        min_capacity=moe.min_capacity, drop_tokens=drop_tokens, use_rts=moe.use_rts,
        second_expert_sampling=moe.second_expert_sampling, drop_policy=moe.drop_policy,
        rng=rng_gating, rsample_noise=rsample_noise, **extra)


from moe_jax import routers as _routers  # noqa: E402,F401  registers the routers defined there
