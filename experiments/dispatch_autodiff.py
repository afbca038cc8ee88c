"""The autodiff baselines of two dispatch paths: gather and dropless with plain gathers, whose
backward passes autodiff writes as scatter-adds (XLA:CPU runs a scatter-add one row after another).
The library's paths differentiate the same gathers by their inverse maps (moe_jax.dispatch); these
are what they are checked against (tests/test_dispatch_vjp.py) and timed against
(experiments/bench_moe_layer.py).

Importing this module registers them as the dispatch paths "gather_autodiff" and
"dropless_autodiff" with moe_jax.dispatch.register_path, the way any new path is added, so a model
runs them with moe.dispatch="gather_autodiff".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax import experts as experts_lib
from moe_jax.routing import Routing

SUFFIX = "_autodiff"


def gather_to_buffer(x: jax.Array, routing: Routing) -> jax.Array:
    """x [S, M] -> [E, C, M] by one gather from a slot -> token map (empty slots read a zero row)."""
    num_tokens, k = routing.expert_index.shape
    rows = routing.num_experts * routing.capacity
    position = routing.flat_position().reshape(-1)
    token = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)
    # slot -> token that fills it; num_tokens (a zero row) where empty. Dropped copies point past
    # the end and are discarded by mode="drop".
    slot_token = jnp.full((rows,), num_tokens, jnp.int32).at[position].set(token, mode="drop")
    x_padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)], axis=0)
    return x_padded[slot_token].reshape(routing.num_experts, routing.capacity, x.shape[1])


def combine_from_buffer(out: jax.Array, routing: Routing) -> jax.Array:
    """out [E, C, M] -> y [S, M]: each token's kept copies' rows, weighted and summed."""
    model_dim = out.shape[-1]
    flat = jnp.concatenate([out.reshape(-1, model_dim), jnp.zeros((1, model_dim), out.dtype)], axis=0)
    rows = flat[routing.flat_position()]  # [S, k, M]; dropped copies read the zero row
    return jnp.einsum("skm,sk->sm", rows, routing.weight.astype(out.dtype))


def dispatch_gather(x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    return combine_from_buffer(experts_lib.expert_ffn(experts, gather_to_buffer(x, routing)), routing)


def dispatch_dropless(x: jax.Array, routing: Routing, experts: dict, impl: str | None = None) -> jax.Array:
    """Every copy computed: copies sorted by expert, a grouped matmul, outputs scattered back."""
    num_tokens, k = routing.expert_index.shape
    impl = impl or ("tiles" if jax.default_backend() == "cpu" else "ragged")
    if impl not in dispatch_lib.DROPLESS_IMPLS:
        raise ValueError(f"dropless impl={impl!r}; use one of {dispatch_lib.DROPLESS_IMPLS}")
    grouped = {"tiles": experts_lib.grouped_ffn_tiles, "ragged": experts_lib.grouped_ffn_ragged,
               "pallas": experts_lib.grouped_ffn_pallas}[impl]
    order, sorted_expert, group_sizes = dispatch_lib.sort_copies(routing)
    out = grouped(experts, x[order // k], sorted_expert, group_sizes)
    per_copy = jnp.zeros_like(out).at[order].set(out)  # back to (token, choice) order
    return jnp.einsum("skm,sk->sm", per_copy.reshape(num_tokens, k, -1), routing.weight.astype(x.dtype))


if "gather" + SUFFIX not in dispatch_lib.PATHS:  # imported under two module names: register once
    dispatch_lib.register_path("gather" + SUFFIX, dispatch_gather, payload="buffer", pack=gather_to_buffer,
                               unpack=combine_from_buffer)
    dispatch_lib.register_path("dropless" + SUFFIX, dispatch_dropless, uses_capacity=False, payload="rows")
