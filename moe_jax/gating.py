"""Top-k gating with DeepSpeed's semantics, returning the dense token-to-expert mapping table
(moe_jax.routing.Routing); the router registry that selects it is moe_jax.routers.

`top_k_gating(logits [S, E], ...)` reproduces `deepspeed.moe.sharded_moe.top1gating`,
`top2gating` and `topkgating` (DeepSpeed 0.19.8; tested against its own outputs in
tests/data/deepspeed_gating.npz) and returns a `Routing`:

  expert_index [S, k] int32  the k experts of each token (choice order: first, second, ...)
  slot         [S, k] int32  position of that copy in its expert's buffer (0 where dropped)
  weight       [S, k] f32    combine weight (0 where dropped)
  kept         [S, k] bool   whether the copy fits in its expert's capacity

Semantics (DeepSpeed 0.19.8, deepspeed/moe/sharded_moe.py; `_capacity` for the capacity):
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

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# the one definition of a copy's rank among its expert's copies (also the fused kernel's spec)
from moe_jax.kernels.gating.reference import rank_within_expert
from moe_jax.routing import Routing, compute_capacity


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
    capacity = compute_capacity(num_tokens, num_experts, capacity_factor, min_capacity, k) if drop_tokens \
        else num_tokens
    if k == 1:
        choice = _top1(gates, selection, capacity, drop_tokens, use_rts, rts_scores, rsample_noise,
                       biased=selection_bias is not None)
    elif k == 2:
        choice = _top2(gates, selection, capacity, gumbel, biased=selection_bias is not None)
    else:
        choice = _topk(gates, selection, capacity, k, drop_tokens, drop_policy)
    me = jnp.mean(gates, axis=0)
    ce = jnp.mean(choice.first_choices.astype(jnp.float32), axis=0)
    return Routing(
        expert_index=choice.expert_index, slot=jnp.where(choice.kept, choice.slot, 0).astype(jnp.int32),
        weight=choice.weight.astype(jnp.float32), kept=choice.kept, aux_loss=choice.aux_scale * jnp.sum(me * ce),
        z_loss=jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2), expert_counts=choice.expert_counts.astype(jnp.int32),
        dropped_fraction=1.0 - jnp.mean(choice.kept.astype(jnp.float32)), gate_fraction=me, token_fraction=ce,
        capacity=capacity, num_experts=num_experts, aux_scale=choice.aux_scale, renormalized=k > 1,
        token_gates=gates, token_choices=choice.first_choices.astype(jnp.float32))


class _Choice(NamedTuple):
    """One k branch's decisions: the Routing fields it sets, and the [S, E] 0/1 choices whose mean is
    the aux loss's token fraction (the first choices for k <= 2, all k for k > 2)."""

    expert_index: jax.Array  # [S, k] int32
    slot: jax.Array  # [S, k]
    kept: jax.Array  # [S, k] bool
    weight: jax.Array  # [S, k]
    expert_counts: jax.Array  # [E] copies routed before dropping
    first_choices: jax.Array  # [S, E] int32
    aux_scale: float


def _kept_in_token_order(kept_mask: jax.Array, expert_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(kept [S, k], slot [S, k]) of the copies that kept_mask [S, E] keeps, packed in token order."""
    return _take(kept_mask, expert_index) > 0, _take(_slots_in_token_order(kept_mask), expert_index)


def _renormalized(gates: jax.Array, expert_index: jax.Array, kept: jax.Array) -> jax.Array:
    """The kept copies' gate probabilities renormalised per token: g_i / max(sum kept g, eps)."""
    probs = _take(gates, expert_index) * kept
    return probs / jnp.maximum(jnp.sum(probs, axis=1, keepdims=True), jnp.finfo(jnp.float32).eps)


def _top1(gates, selection, capacity: int, drop_tokens: bool, use_rts: bool, rts_scores, rsample_noise,
          biased: bool) -> _Choice:
    """DeepSpeed's top1gating: the argmax expert (of the noisy logits under RSample), the raw gate
    probability as weight; an over-full expert keeps its first C tokens, or with RTS the C with the
    highest random score."""
    num_experts = gates.shape[1]
    choose_from = gates if rsample_noise is None else selection + rsample_noise
    if rsample_noise is None and biased:
        choose_from = selection
    expert_index = jnp.argmax(choose_from, axis=-1).astype(jnp.int32)[:, None]
    mask = jax.nn.one_hot(expert_index[:, 0], num_experts, dtype=jnp.int32)
    if not drop_tokens:
        kept_mask = mask
    elif use_rts and rts_scores is not None:
        priority = _take(rts_scores.astype(jnp.float32), expert_index)[:, 0]
        rank = rank_within_expert(expert_index[:, 0], priority, num_experts)
        kept_mask = mask * (rank < capacity)[:, None]
    else:
        kept_mask = mask * (_slots_in_token_order(mask) < capacity)
    kept, slot = _kept_in_token_order(kept_mask, expert_index)
    return _Choice(expert_index, slot, kept, _take(gates, expert_index) * kept, jnp.sum(mask, axis=0), mask,
                   float(num_experts))


def _top2(gates, selection, capacity: int, gumbel, biased: bool) -> _Choice:
    """DeepSpeed's top2gating: the argmax expert, then the argmax of the (Gumbel-noised) logits
    without it; every first choice takes a slot before any second choice; dropping is positional
    (with drop_tokens=False the capacity is S, so nothing drops)."""
    num_experts = gates.shape[1]
    first = jnp.argmax(selection if biased else gates, axis=-1).astype(jnp.int32)
    mask1 = jax.nn.one_hot(first, num_experts, dtype=jnp.int32)
    noisy = selection if gumbel is None else selection + gumbel
    second = jnp.argmax(jnp.where(mask1 > 0, -jnp.inf, noisy), axis=-1).astype(jnp.int32)
    mask2 = jax.nn.one_hot(second, num_experts, dtype=jnp.int32)
    location1 = _slots_in_token_order(mask1)
    location2 = _slots_in_token_order(mask2) + jnp.sum(mask1, axis=0, keepdims=True)
    expert_index = jnp.stack([first, second], axis=1)
    slot = jnp.stack([_take(location1, first[:, None])[:, 0], _take(location2, second[:, None])[:, 0]], 1)
    kept = slot < capacity
    # DeepSpeed: mean(me * ce) * E * E, ce over the first choices only
    return _Choice(expert_index, slot, kept, _renormalized(gates, expert_index, kept),
                   jnp.sum(mask1 + mask2, axis=0), mask1, float(num_experts))


def _topk(gates, selection, capacity: int, k: int, drop_tokens: bool, drop_policy: str) -> _Choice:
    """DeepSpeed's topkgating: the k best raw logits; an over-full expert keeps the C copies with the
    highest gate probability ("probs") or its first C ("position"); weights renormalised."""
    num_tokens, num_experts = gates.shape
    _, expert_index = jax.lax.top_k(selection, k)
    expert_index = expert_index.astype(jnp.int32)
    rows = jnp.arange(num_tokens)[:, None]
    mask = jnp.zeros((num_tokens, num_experts), jnp.int32).at[rows, expert_index].set(1)
    if not drop_tokens:
        kept_mask = mask
    elif drop_policy == "probs":
        rank = rank_within_expert(expert_index.reshape(-1), _take(gates, expert_index).reshape(-1), num_experts)
        kept_copy = (rank < capacity).reshape(num_tokens, k)
        kept_mask = jnp.zeros_like(mask).at[rows, expert_index].set(kept_copy.astype(jnp.int32))
    else:
        kept_mask = mask * (_slots_in_token_order(mask) < capacity)
    kept, slot = _kept_in_token_order(kept_mask, expert_index)
    # DeepSpeed: mean(me * ce) * E^2 / k
    return _Choice(expert_index, slot, kept, _renormalized(gates, expert_index, kept), jnp.sum(mask, axis=0),
                   mask, num_experts / k)
