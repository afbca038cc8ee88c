"""Pallas (Triton backend) kernels that move token rows by the mapping table (reference.py has the
spec of each). All three are pure data movement: each output row is read once and written once.

  gather_rows   one program per [block_rows, block_cols] tile of the output: loads its rows'
                sources and gathers them from x (masked loads give the zero rows of empty slots).
  combine_rows  one program per [block_rows, block_cols] tile of y: for each of the k choices,
                gathers the copies' rows and accumulates weight * row in float32.
  row_dots      one program per block of tokens, looping over the model dim: the combine weights'
                gradient <dy[s], rows[position[s, j]]>.

Gathered indices are clamped into range and masked, so out-of-range rows are never read. The
tiled operands and results are padded to whole tiles and the result sliced (platform.py: the
Triton backend does not mask edge tiles): padded table rows are empty copies, padded columns zero.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe_jax.kernels import platform


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile of one program: block_rows rows x block_cols columns (powers of two)."""

    block_rows: int = 32
    block_cols: int = 256
    num_warps: int = 4

    def fit(self, rows: int, cols: int) -> tuple[int, int]:
        """Tiles no larger than the (power-of-two rounded) array."""
        return (min(self.block_rows, platform.next_power_of_2(rows)),
                min(self.block_cols, platform.next_power_of_2(cols)))


def _gather(ref, row_index, column, num_rows, num_cols, row_valid):
    """ref[row_index[i], column[i, c]] as a [rows, cols] float32 tile; 0 where invalid."""
    valid = row_valid[:, None] & (column < num_cols)
    safe_rows = jnp.broadcast_to(jnp.clip(row_index, 0, num_rows - 1)[:, None], column.shape)
    safe_cols = jnp.minimum(column, num_cols - 1)
    return pltriton.load(ref.at[safe_rows, safe_cols], mask=valid, other=0).astype(jnp.float32)


def _columns(block_rows, block_cols):
    """Column indices of this program's tile (grid axis 1 walks the model dim)."""
    return pl.program_id(1) * block_cols + jax.lax.broadcasted_iota(
        jnp.int32, (block_rows, block_cols), 1)


def _gather_rows_kernel(source_ref, *refs, has_scale):
    if has_scale:
        scale_ref, x_ref, out_ref = refs
    else:
        x_ref, out_ref = refs
    num_tokens, model_dim = x_ref.shape
    block_rows, block_cols = out_ref.shape
    source = source_ref[...]
    rows = _gather(x_ref, source, _columns(block_rows, block_cols), num_tokens, model_dim,
                   (source >= 0) & (source < num_tokens))
    if has_scale:
        rows = rows * scale_ref[...].astype(jnp.float32)[:, None]
    out_ref[...] = rows.astype(out_ref.dtype)


def _combine_rows_kernel(position_ref, *refs, has_weight):
    if has_weight:
        weight_ref, rows_ref, out_ref = refs
    else:
        rows_ref, out_ref = refs
    num_rows, model_dim = rows_ref.shape
    block_tokens, block_cols = out_ref.shape
    column = _columns(block_tokens, block_cols)
    total = jnp.zeros((block_tokens, block_cols), jnp.float32)
    for choice in range(position_ref.shape[1]):
        position = position_ref[:, choice]
        picked = _gather(rows_ref, position, column, num_rows, model_dim,
                         (position >= 0) & (position < num_rows))
        if has_weight:
            picked = picked * weight_ref[:, choice].astype(jnp.float32)[:, None]
        total = total + picked
    out_ref[...] = total.astype(out_ref.dtype)


def _row_dots_kernel(position_ref, a_ref, rows_ref, out_ref, *, block_cols):
    num_tokens, model_dim = a_ref.shape
    num_rows = rows_ref.shape[0]
    block_tokens, k = out_ref.shape
    first_token = pl.program_id(0) * block_tokens
    token = first_token + jax.lax.broadcasted_iota(jnp.int32, (block_tokens,), 0)
    positions = [position_ref[:, choice] for choice in range(k)]
    kept = [(p >= 0) & (p < num_rows) for p in positions]

    def accumulate(chunk, totals):
        column = chunk * block_cols + jax.lax.broadcasted_iota(jnp.int32, (block_tokens, block_cols), 1)
        a = _gather(a_ref, token, column, num_tokens, model_dim, token < num_tokens)
        return tuple(total + jnp.sum(a * _gather(rows_ref, p, column, num_rows, model_dim, valid), axis=1)
                     for total, p, valid in zip(totals, positions, kept))

    totals = jax.lax.fori_loop(0, pl.cdiv(model_dim, block_cols), accumulate,
                               tuple(jnp.zeros((block_tokens,), jnp.float32) for _ in range(k)))
    for choice, total in enumerate(totals):
        out_ref[:, choice] = total


_ANY = pl.BlockSpec(memory_space=pl.ANY)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gather_rows(x: jax.Array, row_source: jax.Array, row_scale: Optional[jax.Array] = None, *,
                block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """x [S, M], row_source [R] int32, row_scale [R] or None -> [R, M] (reference.gather_rows)."""
    num_rows = row_source.shape[0]
    num_tokens, model_dim = x.shape
    block_rows, block_cols = block_sizes.fit(num_rows, model_dim)
    row_spec = pl.BlockSpec((block_rows,), lambda i, j: (i,))
    inputs = [platform.pad_to(row_source, (block_rows,), num_tokens)]  # padded rows: empty (no source)
    inputs += [] if row_scale is None else [platform.pad_to(row_scale, (block_rows,))]
    padded_rows, padded_cols = inputs[0].shape[0], platform.round_up(model_dim, block_cols)
    out = pl.pallas_call(
        functools.partial(_gather_rows_kernel, has_scale=row_scale is not None),
        out_shape=jax.ShapeDtypeStruct((padded_rows, padded_cols), x.dtype),
        grid=(padded_rows // block_rows, padded_cols // block_cols),
        in_specs=[row_spec] * len(inputs) + [_ANY],
        out_specs=pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j)),
        compiler_params=platform.compiler_params(block_sizes.num_warps),
        interpret=interpret, name="gather_rows",
    )(*inputs, x)
    return out[:num_rows, :model_dim]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def combine_rows(rows: jax.Array, position: jax.Array, weight: Optional[jax.Array] = None, *,
                 block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """rows [R, M], position [S, k] int32, weight [S, k] or None -> [S, M] (reference.combine_rows)."""
    num_tokens, k = position.shape
    model_dim = rows.shape[1]
    block_tokens, block_cols = block_sizes.fit(num_tokens, model_dim)
    copy_spec = pl.BlockSpec((block_tokens, k), lambda i, j: (i, 0))
    inputs = [platform.pad_to(position, (block_tokens, None), -1)]  # padded tokens: no copies
    inputs += [] if weight is None else [platform.pad_to(weight, (block_tokens, None))]
    padded_tokens, padded_cols = inputs[0].shape[0], platform.round_up(model_dim, block_cols)
    out = pl.pallas_call(
        functools.partial(_combine_rows_kernel, has_weight=weight is not None),
        out_shape=jax.ShapeDtypeStruct((padded_tokens, padded_cols), rows.dtype),
        grid=(padded_tokens // block_tokens, padded_cols // block_cols),
        in_specs=[copy_spec] * len(inputs) + [_ANY],
        out_specs=pl.BlockSpec((block_tokens, block_cols), lambda i, j: (i, j)),
        compiler_params=platform.compiler_params(block_sizes.num_warps),
        interpret=interpret, name="combine_rows",
    )(*inputs, rows)
    return out[:num_tokens, :model_dim]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def row_dots(a: jax.Array, rows: jax.Array, position: jax.Array, *,
             block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """a [S, M], rows [R, M], position [S, k] -> [S, k] float32 (reference.row_dots)."""
    num_tokens, k = position.shape
    block_tokens, block_cols = block_sizes.fit(num_tokens, a.shape[1])
    position = platform.pad_to(position, (block_tokens, None), -1)  # padded tokens: no copies
    padded_tokens = position.shape[0]
    out = pl.pallas_call(
        functools.partial(_row_dots_kernel, block_cols=block_cols),
        out_shape=jax.ShapeDtypeStruct((padded_tokens, k), jnp.float32),
        grid=(padded_tokens // block_tokens,),
        in_specs=[pl.BlockSpec((block_tokens, k), lambda i: (i, 0)), _ANY, _ANY],
        out_specs=pl.BlockSpec((block_tokens, k), lambda i: (i, 0)),
        compiler_params=platform.compiler_params(block_sizes.num_warps),
        interpret=interpret, name="row_dots",
    )(position, a, rows)
    return out[:num_tokens]
