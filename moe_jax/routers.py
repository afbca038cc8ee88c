"""The router registry: every router of MoEConfig.router, DeepSpeed's top-k first.

A router turns gate logits into a moe_jax.routing.Routing. Every router has one signature,

    routing = ROUTERS[name](logits [S, E] float32, *, moe, train, rng, drop_tokens)

(`moe` a moe_jax.config.MoEConfig, `rng` None for deterministic routing, `drop_tokens` False when
the dispatch path has no capacity), and is chosen by `MoEConfig.router`. A router that supports
aux-loss-free balancing (MoEConfig.bias_update_rate) or group-limited routing also takes
`selection_bias` [E], a bias on the scores that choose experts, never on the combine weights.
Adding one is a function and a `@register_router("name")` line in this file: the router contract
test (tests/test_router_contract.py) runs every registered router through the same checks, and
dispatch paths, the exchange, the aux-loss reduction and the metrics read only the Routing fields.

  * "topk": DeepSpeed's top-1 / top-2 / top-k gating (moe_jax.gating), or its fused kernel
    (moe_jax.kernels.gating) with moe.router_impl="kernel".
  * "sigmoid" (DeepSeek-V3): sigmoid affinities, top-k on affinity + selection bias, weights
    normalised over the chosen experts (`sigmoid_gating`).
  * "expert_choice" (Zhou et al., 2022, "Mixture-of-Experts with Expert Choice Routing"): each
    expert takes the C tokens of the group with the highest gate probability for it, so a token
    gets 0..E experts and every expert is exactly full. The group is all the tokens routed together
    (a batch, or one shard's batch under expert parallelism), whatever their position: in a causal
    language model a token's experts depend on later tokens of the group. Training and evaluation
    on whole sequences are well defined, token-by-token generation is not (moe_jax.inference
    refuses such models).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from moe_jax import gating
from moe_jax.kernels.gating import ops as gating_kernel
from moe_jax.routing import Routing, compute_capacity


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
    """DeepSpeed's top-k gating (`moe_jax.gating.top_k_gating`) with the RSample policy's Gumbel noise on the top-1
    choice while training, and the training or eval capacity factor. moe.router_impl="kernel" runs
    the fused gating kernel (moe_jax.kernels.gating; its jnp reference off GPU), same outputs.
    selection_bias [E]: aux-loss-free balancing's bias on the choice (jnp router only)."""
    rng_rsample, rng_gating = jax.random.split(rng) if rng is not None else (None, None)
    rsample_noise = None
    if train and moe.noisy_gate_policy == "RSample" and rng_rsample is not None:
        rsample_noise = jax.random.gumbel(rng_rsample, logits.shape)
    gating_fn = gating_kernel.top_k_gating if moe.router_impl == "kernel" else gating.top_k_gating
    extra = {} if selection_bias is None else {"selection_bias": selection_bias}
    return gating_fn(
        logits, k=moe.k, capacity_factor=moe.capacity_factor if train else moe.eval_capacity_factor,
        min_capacity=moe.min_capacity, drop_tokens=drop_tokens, use_rts=moe.use_rts,
        second_expert_sampling=moe.second_expert_sampling, drop_policy=moe.drop_policy,
        rng=rng_gating, rsample_noise=rsample_noise, **extra)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """Tokens per expert: C = ceil(S * cf / E) (float32 arithmetic, as `routing.compute_capacity`),
    at least min_capacity, at most S (an expert cannot take a token twice)."""
    return min(compute_capacity(num_tokens, num_experts, capacity_factor, min_capacity), num_tokens)


def expert_choice_gating(logits: jax.Array, *, capacity_factor: float, min_capacity: int = 0) -> Routing:
    """Expert-choice routing of S tokens over E experts.

    Args:
      logits: [S, E] gate logits.
      capacity_factor: C = ceil(S * cf / E) tokens per expert (cf = mean experts per token).
      min_capacity: lower bound of C.

    Returns the mapping table with k = E columns, column e standing for expert e (the `Routing`
    docstring): kept[s, e] says whether expert e took token s (the C highest gate probabilities of
    column e; equal probabilities: the earlier token first), weight[s, e] = the token's softmax gate
    probability for e where taken (not renormalised), slot[s, e] the token's position among e's
    tokens in token order. Nothing is dropped (every copy routed is processed): expert_counts =
    kept counts = C and dropped_fraction = 0; the tokens that no expert took are what the layer
    statistics report as `unrouted_fraction`. Balance holds by construction, so the aux loss is 0
    (aux_scale 0); gate_fraction and token_fraction are still reported.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [S, E]; got shape {logits.shape}")
    num_tokens, num_experts = logits.shape
    logits = logits.astype(jnp.float32)
    gates = jax.nn.softmax(logits, axis=-1)
    capacity = expert_choice_capacity(num_tokens, num_experts, capacity_factor, min_capacity)
    # top_k over each expert's column: O(S * E) work, no [S, E, C] tensor
    _, chosen = jax.lax.top_k(jax.lax.stop_gradient(gates).T, capacity)  # [E, C] token indices
    taken = jnp.zeros((num_experts, num_tokens), jnp.int32).at[
        jnp.arange(num_experts)[:, None], chosen].set(1).T  # [S, E]
    kept = taken > 0
    slot = jnp.where(kept, jnp.cumsum(taken, axis=0) - 1, 0).astype(jnp.int32)
    expert_counts = jnp.sum(taken, axis=0).astype(jnp.int32)
    return Routing(
        expert_index=jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (num_tokens, num_experts)),
        slot=slot, weight=gates * kept, kept=kept, aux_loss=jnp.zeros((), jnp.float32),
        z_loss=jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2), expert_counts=expert_counts,
        dropped_fraction=jnp.zeros((), jnp.float32), gate_fraction=jnp.mean(gates, axis=0),
        token_fraction=jnp.mean(taken.astype(jnp.float32), axis=0), capacity=capacity,
        num_experts=num_experts, aux_scale=0.0, column_per_expert=True, token_gates=gates,
        token_choices=taken.astype(jnp.float32))


@register_router("expert_choice", causal=False)
def expert_choice_router(logits: jax.Array, *, moe, train: bool, rng: Optional[jax.Array],
                         drop_tokens: bool) -> Routing:
    """`expert_choice_gating` with the training or eval capacity factor and moe.min_capacity.
    Capacity is the algorithm itself here, so drop_tokens does not apply (paths without a capacity
    buffer process exactly the copies the experts took); no randomness."""
    del rng, drop_tokens
    return expert_choice_gating(
        logits, capacity_factor=moe.capacity_factor if train else moe.eval_capacity_factor,
        min_capacity=moe.min_capacity)


def sigmoid_gating(logits: jax.Array, *, k: int, capacity_factor: float, min_capacity: int = 0,
                   drop_tokens: bool = True, selection_bias: Optional[jax.Array] = None) -> Routing:
    """DeepSeek-V3's routing (Liu et al., 2024, "DeepSeek-V3 Technical Report", section 2.1.2): each
    expert's affinity is its own sigmoid score s = sigmoid(logit), not a softmax share; a token's k
    experts are the top-k of s + selection_bias (the bias of aux-loss-free balancing chooses, never
    weighs); the combine weights are the chosen scores normalised to sum to 1 over the token's kept
    copies.

    Capacity as DeepSpeed's top-k (`routing.compute_capacity` with k): copies take slots in (choice,
    token) order, all first choices before any second choice, and a copy beyond capacity is dropped
    (drop_tokens=False: capacity S, nothing dropped, DeepSeek-V3's own setting). The balance loss is
    the Switch form on the normalised affinities: aux = E / k * sum_e P_e f_e, with P_e the mean of
    s_e / sum(s) and f_e the fraction of tokens choosing e (1 at perfect balance); DeepSeek-V3 keeps
    only a tiny sequence-level one (balance_loss_scope="sequence" with a small aux_loss_coef).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [S, E]; got shape {logits.shape}")
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"moe.k={k} must be in [1, {num_experts}] (the layer's expert count)")
    logits = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits)
    selection = scores if selection_bias is None else scores + selection_bias.astype(jnp.float32)
    _, expert_index = jax.lax.top_k(jax.lax.stop_gradient(selection), k)  # [S, k], best first
    expert_index = expert_index.astype(jnp.int32)
    capacity = compute_capacity(num_tokens, num_experts, capacity_factor, min_capacity, k) \
        if drop_tokens else num_tokens
    # slots in (choice, token) order: each copy's rank among its expert's copies
    flat = expert_index.T.reshape(-1)
    rank = gating.rank_within_expert(flat, jnp.zeros(flat.shape, jnp.float32), num_experts)
    slot = rank.reshape(k, num_tokens).T
    kept = slot < capacity
    chosen = jnp.take_along_axis(scores, expert_index, axis=1) * kept
    weight = chosen / jnp.maximum(jnp.sum(chosen, axis=1, keepdims=True), jnp.finfo(jnp.float32).eps)
    choices = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=1)  # [S, E]
    affinity = scores / jnp.sum(scores, axis=-1, keepdims=True)
    gate_fraction, token_fraction = jnp.mean(affinity, axis=0), jnp.mean(choices, axis=0)
    aux_scale = num_experts / k
    return Routing(
        expert_index=expert_index, slot=jnp.where(kept, slot, 0).astype(jnp.int32), weight=weight, kept=kept,
        aux_loss=aux_scale * jnp.sum(gate_fraction * token_fraction),
        z_loss=jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
        expert_counts=jnp.sum(choices, axis=0).astype(jnp.int32),
        dropped_fraction=1.0 - jnp.mean(kept.astype(jnp.float32)), gate_fraction=gate_fraction,
        token_fraction=token_fraction, capacity=capacity, num_experts=num_experts, aux_scale=aux_scale,
        renormalized=True, score_fn="sigmoid", token_gates=affinity, token_choices=choices)


@register_router("sigmoid")
def sigmoid_router(logits: jax.Array, *, moe, train: bool, rng: Optional[jax.Array], drop_tokens: bool,
                   selection_bias: Optional[jax.Array] = None) -> Routing:
    """`sigmoid_gating` with moe.k, the training or eval capacity factor and moe.min_capacity;
    deterministic (no jitter, no random token selection). With moe.bias_update_rate > 0 the
    selection bias is aux-loss-free balancing's (moe_jax.balancing)."""
    del rng
    return sigmoid_gating(logits, k=moe.k, capacity_factor=moe.capacity_factor if train else moe.eval_capacity_factor,
                          min_capacity=moe.min_capacity, drop_tokens=drop_tokens, selection_bias=selection_bias)
