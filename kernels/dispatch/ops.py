"""Public entry of the dispatch op: permute tokens into the experts' buffer and combine them back.

    buffer = permute(x [S, M], position [S, k], num_rows=R)          -> [R, M]
    y      = unpermute(rows [R, M], position [S, k], weight [S, k])  -> [S, M]

`position[s, j]` is the buffer row of token s's j-th copy; a value outside [0, R) marks a dropped
copy. Two layouts use it:

  * the capacity buffer [E, C, M] of the gather path: position = expert * C + slot
    (`dispatch_to_buffer` / `combine_from_buffer`, equal to moe_jax.dispatch.gather_to_buffer /
    combine_from_buffer);
  * the expert-sorted compact layout of the grouped matmul: position = start[expert] + slot,
    start = exclusive cumsum of the kept counts (moe_layer.py). Kept slots are dense per expert,
    so this needs no sort.

Both ops are linear in their row inputs, so their backward passes are the same kernels transposed
(`jax.custom_vjp`): d_x = combine(d_buffer, position, weight=1); for unpermute,
d_rows = gather(dy, row_source, row_scale=weight) and d_weight = row_dots(dy, rows, position).
`interpret` chooses the implementation as platform.mode (CPU default: the jnp reference).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.kernels import platform
from moe_jax.kernels.dispatch import kernel, reference
from moe_jax.kernels.dispatch.kernel import BlockSizes


def _valid(position: jax.Array, num_rows: int) -> jax.Array:
    """position with every out-of-range value (dropped copy) mapped to num_rows."""
    return jnp.where((position >= 0) & (position < num_rows), position, num_rows).astype(jnp.int32)


def row_sources(position: jax.Array, num_rows: int) -> jax.Array:
    """position [S, k] -> [R] int32: the token whose copy fills each row, S for an empty row."""
    num_tokens, k = position.shape
    token = jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), k)
    return jnp.full((num_rows,), num_tokens, jnp.int32).at[_valid(position, num_rows).reshape(-1)].set(
        token, mode="drop")


def row_weights(position: jax.Array, weight: jax.Array, num_rows: int) -> jax.Array:
    """position, weight [S, k] -> [R] float32: each row's combine weight, 0 for an empty row."""
    return jnp.zeros((num_rows,), jnp.float32).at[_valid(position, num_rows).reshape(-1)].set(
        weight.reshape(-1).astype(jnp.float32), mode="drop")


def _gather_rows(run, block_sizes, x, row_source, row_scale=None):
    if run == platform.REFERENCE:
        return reference.gather_rows(x, row_source, row_scale)
    return kernel.gather_rows(x, row_source, row_scale, block_sizes=block_sizes,
                              interpret=run == platform.INTERPRET)


def _combine_rows(run, block_sizes, rows, position, weight=None):
    if run == platform.REFERENCE:
        return reference.combine_rows(rows, position, weight)
    return kernel.combine_rows(rows, position, weight, block_sizes=block_sizes,
                               interpret=run == platform.INTERPRET)


def _row_dots(run, block_sizes, a, rows, position):
    if run == platform.REFERENCE:
        return reference.row_dots(a, rows, position)
    return kernel.row_dots(a, rows, position, block_sizes=block_sizes, interpret=run == platform.INTERPRET)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _permute(x, position, num_rows, run, block_sizes):
    return _gather_rows(run, block_sizes, x, row_sources(position, num_rows))


def _permute_fwd(x, position, num_rows, run, block_sizes):
    return _permute(x, position, num_rows, run, block_sizes), position


def _permute_bwd(num_rows, run, block_sizes, position, d_buffer):
    return _combine_rows(run, block_sizes, d_buffer, _valid(position, num_rows)), None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _unpermute(rows, position, weight, run, block_sizes):
    return _combine_rows(run, block_sizes, rows, position, weight)


def _unpermute_fwd(rows, position, weight, run, block_sizes):
    return _unpermute(rows, position, weight, run, block_sizes), (rows, position, weight)


def _unpermute_bwd(run, block_sizes, residuals, dy):
    rows, position, weight = residuals
    num_rows = rows.shape[0]
    d_rows = _gather_rows(run, block_sizes, dy, row_sources(position, num_rows),
                          row_weights(position, weight, num_rows))
    d_weight = _row_dots(run, block_sizes, dy, rows, position).astype(weight.dtype)
    return d_rows.astype(rows.dtype), None, d_weight


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def permute(x: jax.Array, position: jax.Array, *, num_rows: int, interpret: Optional[bool] = None,
            block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """x [S, M] -> [num_rows, M]: row position[s, j] holds x[s]; rows no copy fills are zero."""
    return _permute(x, position.astype(jnp.int32), num_rows, platform.mode(interpret), block_sizes)


def unpermute(rows: jax.Array, position: jax.Array, weight: jax.Array, *,
              interpret: Optional[bool] = None, block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """rows [R, M] -> y [S, M] = sum_j weight[s, j] * rows[position[s, j]] over kept copies."""
    return _unpermute(rows, position.astype(jnp.int32), weight, platform.mode(interpret), block_sizes)


def buffer_position(expert_index: jax.Array, slot: jax.Array, kept: jax.Array, *, num_experts: int,
                    capacity: int) -> jax.Array:
    """[S, k] row of each copy in the flat [E * C] capacity buffer, E * C where dropped."""
    return jnp.where(kept, expert_index * capacity + slot, num_experts * capacity).astype(jnp.int32)


def dispatch_to_buffer(x: jax.Array, expert_index: jax.Array, slot: jax.Array, kept: jax.Array, *,
                       num_experts: int, capacity: int, interpret: Optional[bool] = None,
                       block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """x [S, M] -> the experts' input buffer [E, C, M] (empty slots are zero rows)."""
    position = buffer_position(expert_index, slot, kept, num_experts=num_experts, capacity=capacity)
    buffer = permute(x, position, num_rows=num_experts * capacity, interpret=interpret,
                     block_sizes=block_sizes)
    return buffer.reshape(num_experts, capacity, x.shape[1])


def combine_from_buffer(buffer: jax.Array, expert_index: jax.Array, slot: jax.Array, kept: jax.Array,
                        weight: jax.Array, *, interpret: Optional[bool] = None,
                        block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """buffer [E, C, M] -> y [S, M] = sum over each token's kept copies of weight * expert output."""
    num_experts, capacity, model_dim = buffer.shape
    position = buffer_position(expert_index, slot, kept, num_experts=num_experts, capacity=capacity)
    return unpermute(buffer.reshape(-1, model_dim), position, weight, interpret=interpret,
                     block_sizes=block_sizes)
