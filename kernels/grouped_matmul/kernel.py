"""Grouped matmul over expert-sorted rows in Pallas (Triton backend); reference.py is the spec.

gmm: the rows are cut into [block_m] tiles. A tile that straddles a group boundary is visited once
per group it touches (a "pair" of tile and group); each visit multiplies the whole tile by that
group's weights and stores only the group's rows. So every output row is written exactly once,
with no atomics and no padding copy of the input, at the cost of at most one extra tile visit per
group (with G groups of about block_m rows, up to 2x the FLOPs; large groups cost almost nothing).
The rows past sum(group_sizes) form one more segment that is written as zeros. The pair list is
computed in XLA from group_sizes ([G] ints), with a static bound of ceil(N / block_m) + G pairs;
pairs past the real count do nothing.

The launch is one-dimensional and banded: `group_width` consecutive pairs sweep all the output
column blocks before the next band starts, so a band's lhs tiles and its groups' weight columns
stay in L2 while they are reused.

tgmm (the weights' gradient): one program per (group, block_k, block_n) tile of the [G, K, Nout]
output (padded to whole tiles and sliced: the Triton backend does not mask edge tiles); it loops
over its group's row tiles (a dynamic trip count) and accumulates lhs_tile.T @ grad_tile in float32.
Rows outside the group are masked to zero.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from moe_jax.kernels import platform

_MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16). gmm: [block_m, block_k] x [block_k, block_n] steps;
    tgmm: a [block_k, block_n] output tile accumulated over block_m-row chunks."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_width: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def fit(self, rows: int, inner: int, cols: int) -> tuple[int, int, int]:
        def clamp(block, size):
            return max(_MIN_DOT, min(block, platform.next_power_of_2(size)))

        return clamp(self.block_m, rows), clamp(self.block_k, inner), clamp(self.block_n, cols)


def schedule(group_sizes: jax.Array, num_rows: int, block_m: int):
    """The (tile, group) pairs of gmm. Returns (pair_group, pair_tile, row_lo, row_hi), each
    [ceil(num_rows / block_m) + G] int32: the pair's group (G: the zero tail), its row tile and
    the row range [row_lo, row_hi) it writes (empty for unused pairs)."""
    num_groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    segment_start = jnp.concatenate([starts, ends[-1:]])  # segment G: rows past the last group
    segment_end = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    first_tile = segment_start // block_m
    tiles = jnp.where(segment_end > segment_start, (segment_end - 1) // block_m - first_tile + 1, 0)
    pair_end = jnp.cumsum(tiles)
    num_pairs = pl.cdiv(num_rows, block_m) + num_groups
    pair = jnp.arange(num_pairs, dtype=jnp.int32)
    segment = jnp.searchsorted(pair_end, pair, side="right").astype(jnp.int32)
    used = segment <= num_groups
    segment = jnp.minimum(segment, num_groups)
    tile = first_tile[segment] + pair - (pair_end - tiles)[segment]
    row_lo = jnp.where(used, jnp.maximum(segment_start[segment], tile * block_m), 0)
    row_hi = jnp.where(used, jnp.minimum(segment_end[segment], (tile + 1) * block_m), 0)
    return segment, tile, row_lo, row_hi


def _gmm_kernel(group_ref, tile_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, block_m, block_n,
                block_k, group_width, transpose_rhs):
    inner = lhs_ref.shape[1]
    num_groups = rhs_ref.shape[0]
    cols = out_ref.shape[1]
    num_pairs = group_ref.shape[0]
    col_blocks = pl.cdiv(cols, block_n)
    # Banded launch order (module docstring): pid -> (pair, column block).
    pid = pl.program_id(0)
    band_programs = group_width * col_blocks
    first_pair = (pid // band_programs) * group_width
    width = jnp.minimum(num_pairs - first_pair, group_width)
    pair = first_pair + (pid % band_programs) % width
    col_block = (pid % band_programs) // width
    row_lo, row_hi = lo_ref[pair], hi_ref[pair]

    @pl.when(row_hi > row_lo)
    def _():
        group = group_ref[pair]
        first_row = tile_ref[pair] * block_m
        row = first_row + jax.lax.broadcasted_iota(jnp.int32, (block_m,), 0)
        row_mask = (row >= row_lo) & (row < row_hi)
        first_col = col_block * block_n
        col_mask = first_col + jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0) < cols
        weight_group = jnp.minimum(group, num_groups - 1)  # the zero tail reads any group

        def step(k_block, acc):
            first_k = k_block * block_k
            k_mask = first_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0) < inner
            a = pltriton.load(lhs_ref.at[pl.ds(first_row, block_m), pl.ds(first_k, block_k)],
                              mask=row_mask[:, None] & k_mask[None, :], other=0)
            if transpose_rhs:
                b = pltriton.load(
                    rhs_ref.at[weight_group, pl.ds(first_col, block_n), pl.ds(first_k, block_k)],
                    mask=col_mask[:, None] & k_mask[None, :], other=0)
                return acc + jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                 preferred_element_type=jnp.float32)
            b = pltriton.load(
                rhs_ref.at[weight_group, pl.ds(first_k, block_k), pl.ds(first_col, block_n)],
                mask=k_mask[:, None] & col_mask[None, :], other=0)
            return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

        zeros = jnp.zeros((block_m, block_n), jnp.float32)
        acc = jax.lax.cond(group < num_groups,
                           lambda: jax.lax.fori_loop(0, pl.cdiv(inner, block_k), step, zeros),
                           lambda: zeros)
        pltriton.store(out_ref.at[pl.ds(first_row, block_m), pl.ds(first_col, block_n)],
                       acc.astype(out_ref.dtype), mask=row_mask[:, None] & col_mask[None, :])


def _tgmm_kernel(start_ref, end_ref, lhs_ref, grad_ref, out_ref, *, block_m):
    inner = lhs_ref.shape[1]
    cols = grad_ref.shape[1]
    block_k, block_n = out_ref.shape
    group = pl.program_id(0)
    first_k = pl.program_id(1) * block_k
    first_col = pl.program_id(2) * block_n
    k_mask = first_k + jax.lax.broadcasted_iota(jnp.int32, (block_k,), 0) < inner
    col_mask = first_col + jax.lax.broadcasted_iota(jnp.int32, (block_n,), 0) < cols
    start, end = start_ref[group], end_ref[group]

    def step(tile, acc):
        first_row = tile * block_m
        row = first_row + jax.lax.broadcasted_iota(jnp.int32, (block_m,), 0)
        row_mask = (row >= start) & (row < end)
        a = pltriton.load(lhs_ref.at[pl.ds(first_row, block_m), pl.ds(first_k, block_k)],
                          mask=row_mask[:, None] & k_mask[None, :], other=0)
        g = pltriton.load(grad_ref.at[pl.ds(first_row, block_m), pl.ds(first_col, block_n)],
                          mask=row_mask[:, None] & col_mask[None, :], other=0)
        return acc + jax.lax.dot_general(a, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(start // block_m, pl.cdiv(end, block_m), step,
                            jnp.zeros((block_k, block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


_ANY = pl.BlockSpec(memory_space=pl.ANY)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "block_sizes", "interpret"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """lhs [N, K], rhs [G, K, Nout] ([G, Nout, K] if transpose_rhs), group_sizes [G] -> [N, Nout]."""
    num_rows, inner = lhs.shape
    cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    block_m, block_k, block_n = block_sizes.fit(num_rows, inner, cols)
    metadata = schedule(group_sizes, num_rows, block_m)
    num_pairs = metadata[0].shape[0]
    return pl.pallas_call(
        functools.partial(_gmm_kernel, block_m=block_m, block_n=block_n, block_k=block_k,
                          group_width=block_sizes.group_width, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((num_rows, cols), lhs.dtype),
        grid=(num_pairs * pl.cdiv(cols, block_n),),
        in_specs=[_ANY] * 6,
        out_specs=_ANY,
        compiler_params=platform.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret, name="gmm",
    )(*metadata, lhs, rhs)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, *,
         block_sizes: BlockSizes = BlockSizes(), interpret: bool = False) -> jax.Array:
    """lhs [N, K], grad [N, Nout], group_sizes [G] -> [G, K, Nout]: per group lhs_g.T @ grad_g."""
    num_rows, inner = lhs.shape
    cols = grad.shape[1]
    num_groups = group_sizes.shape[0]
    block_m, block_k, block_n = block_sizes.fit(num_rows, inner, cols)
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    # The output in whole tiles (platform.py: edge tiles are not masked); the loads mask K and Nout.
    padded_inner, padded_cols = platform.round_up(inner, block_k), platform.round_up(cols, block_n)
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, block_m=block_m),
        out_shape=jax.ShapeDtypeStruct((num_groups, padded_inner, padded_cols), lhs.dtype),
        grid=(num_groups, padded_inner // block_k, padded_cols // block_n),
        in_specs=[_ANY] * 4,
        out_specs=pl.BlockSpec((None, block_k, block_n), lambda g, i, j: (g, i, j)),
        compiler_params=platform.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret, name="tgmm",
    )(starts, ends, lhs, grad)
    return out[:, :inner, :cols]
