"""The experts' FFNs: batched over a capacity buffer, or grouped over expert-sorted rows.

    expert_ffn(experts, buffer [E, C, M]) -> [E, C, M]          every expert on its own C rows
    grouped_ffn_ragged(experts, rows [N, M], sorted_expert [N], group_sizes [E]) -> [N, M]
    grouped_ffn_tiles(...)                                        the same, by row tiles

`experts` is {w1 [E, M, F], b1 [E, F], w2 [E, F, M], b2 [E, M]}. The grouped forms take rows
sorted by expert with group_sizes[e] rows of expert e; rows past sum(group_sizes) (empty rows a
caller appends, with an in-range expert id) get unspecified outputs and touch no other row.
`jax.lax.ragged_dot` is the GPU choice (on CPU XLA expands it to a dense masked matmul, E times
the work); row tiles are the CPU choice: each group padded to a multiple of a row tile and one
matmul per used tile with that tile's expert weights, in a loop over the used tiles only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moe_jax.kernels.grouped_matmul import ops as gmm_ops
from moe_jax.kernels.platform import next_power_of_2


def gelu(x: jax.Array) -> jax.Array:
    """GPT-2/3's tanh approximation of GELU."""
    return jax.nn.gelu(x, approximate=True)


# The name of the experts' hidden activations (before and after the GELU), the [rows, F] values
# model.remat="moe" recomputes in the backward pass instead of keeping (jax.ad_checkpoint names)
EXPERT_ACTIVATION = "moe_expert_activation"


# The experts' inputs (the exchanged tokens: capacity buffer, sorted rows or row tiles) and the
# routing table: what model.remat="moe" keeps for the backward pass (moe_jax.model)
EXPERT_INPUT = "moe_expert_input"
ROUTING = "moe_routing"


def expert_input(rows: jax.Array) -> jax.Array:
    return checkpoint_name(rows, EXPERT_INPUT)


def activation(hidden: jax.Array) -> jax.Array:
    """GELU of the experts' pre-activations, both named EXPERT_ACTIVATION."""
    return checkpoint_name(gelu(checkpoint_name(hidden, EXPERT_ACTIVATION)), EXPERT_ACTIVATION)


def expert_ffn(experts: dict, buffer: jax.Array) -> jax.Array:
    """Every expert's FFN on its own rows: buffer [E, C, M] -> [E, C, M]."""
    dtype = buffer.dtype
    buffer = expert_input(buffer)
    hidden = jnp.einsum("ecm,emf->ecf", buffer, experts["w1"].astype(dtype)) + experts["b1"][:, None, :].astype(dtype)
    hidden = activation(hidden)
    return jnp.einsum("ecf,efm->ecm", hidden, experts["w2"].astype(dtype)) + experts["b2"][:, None, :].astype(dtype)


def grouped_ffn_ragged(experts: dict, rows: jax.Array, sorted_expert: jax.Array,
                       group_sizes: jax.Array) -> jax.Array:
    """Expert FFN on expert-sorted rows [N, M] with jax.lax.ragged_dot."""
    dtype = rows.dtype
    rows = expert_input(rows)
    hidden = jax.lax.ragged_dot(rows, experts["w1"].astype(dtype), group_sizes)
    hidden = activation(hidden + experts["b1"].astype(dtype)[sorted_expert])
    out = jax.lax.ragged_dot(hidden, experts["w2"].astype(dtype), group_sizes)
    return out + experts["b2"].astype(dtype)[sorted_expert]


def grouped_ffn_pallas(experts: dict, rows: jax.Array, sorted_expert: jax.Array, group_sizes: jax.Array,
                       interpret: bool | None = None) -> jax.Array:
    """Expert FFN on expert-sorted rows [N, M] with the Pallas grouped matmul (moe_jax.kernels;
    forward and backward kernels): on an H200 it ran at 68% of the bf16 peak where
    jax.lax.ragged_dot ran at 2% (WORKSPACE.md, GPU results). `interpret` as the kernels' platform.mode
    (off GPU: their jnp reference, i.e. ragged_dot)."""
    dtype = rows.dtype
    hidden = gmm_ops.grouped_matmul(rows, experts["w1"].astype(dtype), group_sizes, interpret=interpret)
    hidden = activation(hidden + experts["b1"].astype(dtype)[sorted_expert])
    out = gmm_ops.grouped_matmul(hidden, experts["w2"].astype(dtype), group_sizes, interpret=interpret)
    return out + experts["b2"].astype(dtype)[sorted_expert]


@jax.custom_vjp
def tiled_matmul(tiles: jax.Array, weights: jax.Array, tile_expert: jax.Array, used_tiles: jax.Array) -> jax.Array:
    """tiles [Nt, T, K] @ weights[tile_expert[t]] [K, N] -> [Nt, T, N] for t < used_tiles (zeros after).

    A fori_loop over the used tiles only, each writing its block in place; the backward pass is a
    second loop that accumulates each tile's weight gradient into its expert's slice in place
    (autodiff of a scan would add a full [E, K, N] zero-padded gradient per tile)."""
    return _tiled_matmul_fwd(tiles, weights, tile_expert, used_tiles)[0]


def _tiled_matmul_fwd(tiles, weights, tile_expert, used_tiles):
    num_tiles, tile, _ = tiles.shape
    out = jnp.zeros((num_tiles, tile, weights.shape[2]), tiles.dtype)

    def body(t, out):
        w = jax.lax.dynamic_index_in_dim(weights, tile_expert[t], keepdims=False)
        block = jax.lax.dynamic_index_in_dim(tiles, t, keepdims=False) @ w
        return jax.lax.dynamic_update_index_in_dim(out, block.astype(out.dtype), t, 0)

    out = jax.lax.fori_loop(0, used_tiles, body, out)
    return out, (tiles, weights, tile_expert, used_tiles)


def _tiled_matmul_bwd(residuals, d_out):
    tiles, weights, tile_expert, used_tiles = residuals

    def body(t, carry):
        d_tiles, d_weights = carry
        expert = tile_expert[t]
        w = jax.lax.dynamic_index_in_dim(weights, expert, keepdims=False)
        g = jax.lax.dynamic_index_in_dim(d_out, t, keepdims=False)
        block = jax.lax.dynamic_index_in_dim(tiles, t, keepdims=False)
        d_tiles = jax.lax.dynamic_update_index_in_dim(d_tiles, (g @ w.T).astype(d_tiles.dtype), t, 0)
        d_w = jax.lax.dynamic_index_in_dim(d_weights, expert, keepdims=False) + (block.T @ g).astype(d_weights.dtype)
        return d_tiles, jax.lax.dynamic_update_index_in_dim(d_weights, d_w, expert, 0)

    d_tiles, d_weights = jax.lax.fori_loop(0, used_tiles, body, (jnp.zeros_like(tiles), jnp.zeros_like(weights)))
    return d_tiles, d_weights, None, None


tiled_matmul.defvjp(_tiled_matmul_fwd, _tiled_matmul_bwd)


def default_tile(num_rows: int, num_experts: int, divisor: int = 2, smallest: int = 16,
                 largest: int | None = 256) -> int:
    """Row tile: a power of two near the mean group size / divisor, in [smallest, largest] (padding
    costs at most E * (tile - 1) rows; small tiles make small matmuls)."""
    mean_group = max(1, num_rows // max(1, num_experts))
    tile = max(smallest, next_power_of_2(mean_group) // divisor)
    return int(tile if largest is None else min(largest, tile))


def tile_layout(sorted_expert: jax.Array, group_sizes: jax.Array, tile: int):
    """Where expert-sorted rows go when each group is padded to a multiple of `tile` rows.

    Returns (destination [N]: each sorted row's row in the tiles, source [Nt * T]: each tile row's
    sorted row, N where it is padding, tile_expert [Nt], used_tiles: the tiles that hold rows, a
    traced scalar). Nt is a static bound: N rows plus at most tile - 1 padding rows per group."""
    num_rows = sorted_expert.shape[0]
    num_experts = group_sizes.shape[0]
    padded_sizes = (group_sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded_sizes)
    padded_start = padded_end - padded_sizes
    group_start = jnp.cumsum(group_sizes) - group_sizes
    destination = padded_start[sorted_expert] + jnp.arange(num_rows, dtype=jnp.int32) - group_start[sorted_expert]
    num_tiles = (num_rows + num_experts * (tile - 1) + tile - 1) // tile  # static upper bound
    source = jnp.full((num_tiles * tile,), num_rows, jnp.int32).at[destination].set(
        jnp.arange(num_rows, dtype=jnp.int32))
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(num_tiles) * tile, side="right"),
                              num_experts - 1).astype(jnp.int32)
    used_tiles = (padded_end[-1] // tile).astype(jnp.int32)
    return destination.astype(jnp.int32), source, tile_expert, used_tiles


def tiled_ffn(experts: dict, tiles: jax.Array, tile_expert: jax.Array, used_tiles: jax.Array) -> jax.Array:
    """Expert FFN on row tiles [Nt, T, M], tile t with expert tile_expert[t]'s weights -> [Nt, T, M]."""
    dtype = tiles.dtype
    tiles = expert_input(tiles)
    hidden = tiled_matmul(tiles, experts["w1"].astype(dtype), tile_expert, used_tiles)
    hidden = activation(hidden + experts["b1"].astype(dtype)[tile_expert][:, None, :])
    out = tiled_matmul(hidden, experts["w2"].astype(dtype), tile_expert, used_tiles)
    return out + experts["b2"].astype(dtype)[tile_expert][:, None, :]


def grouped_ffn_tiles(experts: dict, rows: jax.Array, sorted_expert: jax.Array,
                      group_sizes: jax.Array, tile: int | None = None) -> jax.Array:
    """Expert FFN on expert-sorted rows [N, M]: each group padded to a multiple of `tile` rows, then
    one [tile, M] x [M, F] and one [tile, F] x [F, M] matmul per used tile with its expert's weights."""
    num_rows, model_dim = rows.shape
    tile = tile or default_tile(num_rows, group_sizes.shape[0])
    destination, source, tile_expert, used_tiles = tile_layout(sorted_expert, group_sizes, tile)
    tiles = jnp.concatenate([rows, jnp.zeros((1, model_dim), rows.dtype)])[source].reshape(-1, tile, model_dim)
    out = tiled_ffn(experts, tiles, tile_expert, used_tiles)
    return out.reshape(-1, model_dim)[destination]

