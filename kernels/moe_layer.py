"""The MoE layer's "kernel" dispatch path: mapping table -> permute -> grouped-matmul FFN -> combine.

    y = dispatch_kernel(x [S, M], routing, experts)     (moe_jax.dispatch's signature)

No capacity buffer and no sort: kept slots are dense per expert (0, 1, ... kept_e - 1), so the
copy (s, j) goes to row start[e] + slot of an expert-sorted [S * k, M] layout, start = exclusive
cumsum of the kept counts. The experts' FFN runs on that layout as two grouped matmuls (GELU and
the biases in between, in XLA); the combine reads each kept copy's row back with its weight.
Dropped copies occupy no row; rows past the kept total stay zero and are never read. With a
dropping routing this equals the gather path; with drop_tokens=False it is the dropless MoE.

Every step has a custom VJP built from the same kernels, so the layer trains. `interpret` as
platform.mode: the compiled kernels on a GPU, the references elsewhere, Pallas interpret mode
when True.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.kernels.dispatch import ops as dispatch_ops
from moe_jax.kernels.grouped_matmul import ops as gmm_ops


def expert_sorted_layout(expert_index: jax.Array, slot: jax.Array, kept: jax.Array, num_experts: int):
    """Mapping table -> (position [S, k] row of each copy (S * k where dropped), group_sizes [E],
    row_expert [S * k]: each row's expert, E for the unused rows past the kept total)."""
    num_rows = expert_index.size
    group_sizes = jnp.zeros(num_experts, jnp.int32).at[expert_index.reshape(-1)].add(
        kept.reshape(-1).astype(jnp.int32))
    ends = jnp.cumsum(group_sizes)
    start = ends - group_sizes
    position = jnp.where(kept, start[expert_index] + slot, num_rows).astype(jnp.int32)
    row_expert = jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")
    return position, group_sizes, row_expert.astype(jnp.int32)


def _bias_rows(bias: jax.Array, row_expert: jax.Array, dtype) -> jax.Array:
    """bias [E, D] -> [N, D] per row; zero for the unused rows (row_expert == E)."""
    return jnp.take(bias, row_expert, axis=0, mode="fill", fill_value=0).astype(dtype)


def dispatch_kernel(x: jax.Array, routing, experts: dict, *, interpret: Optional[bool] = None) -> jax.Array:
    """x [S, M], a moe_jax.routing.Routing, experts {w1 [E, M, F], b1 [E, F], w2 [E, F, M], b2 [E, M]}
    -> y [S, M] in x's dtype."""
    dtype = x.dtype
    position, group_sizes, row_expert = expert_sorted_layout(
        routing.expert_index, routing.slot, routing.kept, routing.num_experts)
    rows = dispatch_ops.permute(x, position, num_rows=row_expert.shape[0], interpret=interpret)
    hidden = gmm_ops.grouped_matmul(rows, experts["w1"].astype(dtype), group_sizes, interpret=interpret)
    hidden = jax.nn.gelu(hidden + _bias_rows(experts["b1"], row_expert, dtype), approximate=True)
    out = gmm_ops.grouped_matmul(hidden, experts["w2"].astype(dtype), group_sizes, interpret=interpret)
    out = out + _bias_rows(experts["b2"], row_expert, dtype)
    return dispatch_ops.unpermute(out, position, routing.weight, interpret=interpret)
