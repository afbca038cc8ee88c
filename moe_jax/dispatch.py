"""Interchangeable ways to send tokens through their experts: one signature, one result, one registry.

    y = dispatch(path, x, routing, experts)      x: [S, M], y: [S, M]

`PATHS` (name -> DispatchPath) is the only list of them; `MoEConfig.dispatch` names one. A path
says whether it works within the router's capacity (`uses_capacity`); paths without one
("dropless", "serve") get a routing with drop_tokens=False, so nothing is dropped. Adding a path is
a function with the signature above, a `register_path(...)` line and its test against the others.

`experts` is the experts' parameter dict: w1 [E, M, F], b1 [E, F], w2 [E, F, M], b2 [E, M].

  * "einsum": DeepSpeed's / GShard's one-hot baseline. Builds combine and dispatch [S, E, C] and
    moves tokens with einsum("sec,sm->ecm") and einsum("sec,ecm->sm"): O(S * E * C * M) work, and
    since E * C is about S * cf, O(S^2 * M) whatever E is.
  * "gather": the paper's mapping table. Each copy's row in the flat [E * C] buffer is
    expert * C + slot; tokens are gathered into the [E, C, M] buffer and the experts' outputs are
    gathered back and weighted: O(S * k * M + E * C * M) data movement, no [S, E, C] tensor.
  * "dropless": token copies sorted by expert, then a grouped matmul; capacity plays no part, so
    nothing is dropped when the routing was computed with drop_tokens=False (copies the routing
    dropped have weight 0, so with a dropping routing it equals the other paths). The grouped
    matmul is moe_jax.experts': `jax.lax.ragged_dot` on GPU, row tiles on CPU.
  * "serve": the inference path (moe_jax.inference selects it): per-copy expert weights when the
    step has few token copies (decode: each copy reads only its own expert's weights), else
    "dropless" (prefill). No capacity, so a token's output does not depend on the rest of the batch.
  * "kernel": the Pallas kernels' path (moe_jax.kernels.moe_layer; their jnp references off GPU).

Under expert parallelism (moe_jax.exchange) a path's registry entry says how its tokens cross
devices (`DispatchPath.payload`): the capacity buffer, only the rows that exist, or not at all
(then a mesh that splits the layer's experts is an error naming the path).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from moe_jax import experts as experts_lib
from moe_jax.kernels import moe_layer as kernel_layer
from moe_jax.routing import Routing


def einsum_to_buffer(x: jax.Array, routing: Routing) -> jax.Array:
    """x [S, M] -> the experts' input buffer [E, C, M] by the one-hot dispatch mask (DeepSpeed's)."""
    _, dispatch_mask = routing.to_dense()
    return jnp.einsum("sec,sm->ecm", dispatch_mask.astype(x.dtype), x)


def einsum_from_buffer(out: jax.Array, routing: Routing) -> jax.Array:
    """out [E, C, M] -> y [S, M] by the one-hot combine weights (DeepSpeed's)."""
    combine, _ = routing.to_dense()
    return jnp.einsum("sec,ecm->sm", combine.astype(out.dtype), out)


def dispatch_einsum(x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    return einsum_from_buffer(experts_lib.expert_ffn(experts, einsum_to_buffer(x, routing)), routing)


# Moving rows by the mapping table. The table is a partial permutation between token copies and
# buffer rows: copy n = s * k + j (token s, its j-th choice) sits in row position[s, j] or in none
# (dropped), and row r holds copy row_copy[r] or none (empty). Both directions are known, so the
# transpose of each gather is a gather by the other map, not the scatter-add autodiff would emit
# (XLA:CPU runs a scatter-add one row after another). Rows are looked up with mode="fill": an index
# past the end (a dropped copy, an empty row) reads a zero row.

# experiments/dispatch_autodiff.py keeps the plain gathers that autodiff differentiates (the
# baseline these are tested equal to and timed against).


def _take_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
    """rows [N, M], index [...] -> [..., M]; zero rows where index >= N."""
    # The barrier makes XLA compute the index once: fused into the gather, the routing's index
    # arithmetic would be redone for every one of the M elements of each row.
    index = jax.lax.optimization_barrier(index)
    return jnp.take(rows, index, axis=0, mode="fill", fill_value=0)


def _row_copies(position: jax.Array, num_rows: int) -> jax.Array:
    """position [S, k] (num_rows or more where a copy has no row) -> row_copy [num_rows]: the copy
    s * k + j held by each row, S * k where the row is empty. Assumes no two copies share a row."""
    num_copies = position.size
    return jnp.full((num_rows,), num_copies, jnp.int32).at[position.reshape(-1)].set(
        jnp.arange(num_copies, dtype=jnp.int32), mode="drop")


@jax.custom_vjp
def gather_copies(x: jax.Array, row_copy: jax.Array, position: jax.Array) -> jax.Array:
    """x [S, M] -> rows [R, M], row r = x[row_copy[r] // k] (zero where empty); k = position.shape[1].

    The backward pass reads, for each token, the rows of its k copies and sums them: d_x [S, M] =
    sum_j d_rows[position[s, j]] (dropped copies read zero)."""
    return _take_rows(x, row_copy // position.shape[1])


def _gather_copies_fwd(x, row_copy, position):
    return _take_rows(x, row_copy // position.shape[1]), position


def _gather_copies_bwd(position, d_rows):
    return _take_rows(d_rows, position).sum(axis=1), None, None


gather_copies.defvjp(_gather_copies_fwd, _gather_copies_bwd)


@jax.custom_vjp
def combine_copies(rows: jax.Array, position: jax.Array, row_copy: jax.Array, weight: jax.Array) -> jax.Array:
    """rows [R, M] -> y [S, M] = sum_j weight[s, j] * rows[position[s, j]] (dropped copies read zero).

    The backward pass sends each row the cotangent of the token whose copy it holds, times that
    copy's weight (d_rows[r] = weight[n] * d_y[n // k] with n = row_copy[r]; zero where empty), and
    gives each weight the product of its row with the token's cotangent, so the gate trains."""
    weight = weight.astype(rows.dtype)
    return jnp.einsum("skm,sk->sm", _take_rows(rows, position), weight)


def _combine_copies_fwd(rows, position, row_copy, weight):
    y = jnp.einsum("skm,sk->sm", _take_rows(rows, position), weight.astype(rows.dtype))
    return y, (rows, position, row_copy, weight)


def _combine_copies_bwd(residuals, d_y):
    rows, position, row_copy, weight = residuals
    k = position.shape[1]
    row_weight = _take_rows(weight.reshape(-1, 1).astype(rows.dtype), row_copy)  # [R, 1], 0 where empty
    d_rows = _take_rows(d_y, row_copy // k) * row_weight
    # Re-gathering the copies' rows costs one read of S * k rows; keeping them from the forward
    # pass would hold another [S, k, M] array until the backward pass.
    d_weight = jnp.einsum("skm,sm->sk", _take_rows(rows, position), d_y).astype(weight.dtype)
    return d_rows, None, None, d_weight


combine_copies.defvjp(_combine_copies_fwd, _combine_copies_bwd)


def gather_to_buffer(x: jax.Array, routing: Routing) -> jax.Array:
    """x [S, M] -> the experts' input buffer [E, C, M] (empty slots are zero rows)."""
    position = routing.flat_position()
    buffer = gather_copies(x, _row_copies(position, routing.num_experts * routing.capacity), position)
    return buffer.reshape(routing.num_experts, routing.capacity, x.shape[1])


def combine_from_buffer(out: jax.Array, routing: Routing) -> jax.Array:
    """out [E, C, M] -> y [S, M] = sum over each token's kept copies of weight * expert output.
    Differentiable in out and in routing.weight."""
    position = routing.flat_position()
    row_copy = _row_copies(position, routing.num_experts * routing.capacity)
    return combine_copies(out.reshape(-1, out.shape[-1]), position, row_copy, routing.weight)


def dispatch_gather(x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    return combine_from_buffer(experts_lib.expert_ffn(experts, gather_to_buffer(x, routing)), routing)


def sort_copies(routing: Routing):
    """Copies sorted by expert (stable). Returns (order [N], sorted_expert [N], group_sizes [E])."""
    flat_expert = routing.expert_index.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros(routing.num_experts, jnp.int32).at[flat_expert].add(1)
    return order, flat_expert[order], group_sizes


def _inverse_permutation(order: jax.Array) -> jax.Array:
    """order [N] (a permutation) -> rank [N] with rank[order[i]] = i."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)


# The experts' grouped matmul of the dropless path: "tiles" (row tiles; the CPU default), "ragged"
# (jax.lax.ragged_dot; the GPU default) or "pallas" (the Pallas grouped matmul; measured 25-40x faster
# than ragged_dot on an H200 in bf16, the default there once its backward has passed on a GPU).
DROPLESS_IMPLS = ("tiles", "ragged", "pallas")


def dispatch_dropless(x: jax.Array, routing: Routing, experts: dict, impl: str | None = None) -> jax.Array:
    """x [S, M] -> y [S, M] with every copy computed: copies sorted by expert, then a grouped matmul.

    The sort and, for "tiles", the padding to row tiles
    are one mapping table from token copies to rows: x is gathered straight into the rows the
    grouped matmul reads and the outputs are gathered straight back, so the backward pass has no
    scatter-add either."""
    num_tokens, k = routing.expert_index.shape
    impl = impl or ("tiles" if jax.default_backend() == "cpu" else "ragged")
    if impl not in DROPLESS_IMPLS:
        raise ValueError(f"dropless impl={impl!r}; use one of {DROPLESS_IMPLS}")
    grouped = {"ragged": experts_lib.grouped_ffn_ragged, "pallas": experts_lib.grouped_ffn_pallas}.get(impl)
    order, sorted_expert, group_sizes = sort_copies(routing)
    num_copies, model_dim = order.shape[0], x.shape[1]
    rank = _inverse_permutation(order)  # copy -> its row in expert-sorted order
    if grouped is not None:  # "ragged", "pallas": the grouped matmul on the expert-sorted rows
        row_copy, position = order, rank.reshape(num_tokens, k)
        out = grouped(experts, gather_copies(x, row_copy, position), sorted_expert, group_sizes)
    else:
        tile = experts_lib.default_tile(num_copies, routing.num_experts)
        destination, source, tile_expert, used_tiles = experts_lib.tile_layout(sorted_expert, group_sizes, tile)
        # Compose the two maps: copy -> sorted row -> tile row, and tile row -> sorted row -> copy.
        position = destination[rank].reshape(num_tokens, k)
        row_copy = jnp.take(order, source, mode="fill", fill_value=num_copies)
        tiles = gather_copies(x, row_copy, position).reshape(-1, tile, model_dim)
        out = experts_lib.tiled_ffn(experts, tiles, tile_expert, used_tiles).reshape(-1, model_dim)
    return combine_copies(out, position, row_copy, routing.weight)


def dispatch_copies(x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    """x [S, M] -> y [S, M]: each of the S * k token copies runs one FFN row with its own expert's
    weights, sliced by expert_index, so only the chosen experts' weights are read: the decode path.
    Copies the routing dropped have weight 0, so this equals the other dispatch paths.

    A lax.map over copies, not one batched [N, M] x [N, M, F] product over gathered weights: on
    XLA:CPU the batched form matched the loop up to N = 8 copies and was 4-5x slower from N = 16.
    """
    num_tokens, k = routing.expert_index.shape
    dtype = x.dtype

    def one_copy(args):
        row, expert = args  # [M], scalar
        w = jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, expert, keepdims=False).astype(dtype), experts)
        return experts_lib.gelu(row @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]

    # Token-major copies: row n is token n // k, its (n % k)-th choice.
    out = jax.lax.map(one_copy, (jnp.repeat(x, k, axis=0), routing.expert_index.reshape(-1)))
    return jnp.einsum("skm,sk->sm", out.reshape(num_tokens, k, -1), routing.weight.astype(dtype))


def dispatch_serving(x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    """x [S, M] -> y [S, M] by the cheaper no-drop path for this step's static token count: per-copy
    weights while the copies are at most half the experts (decode), else the dropless grouped
    matmul (prefill): per-copy work grows with the copies, the tiled grouped matmul scans the row
    tiles, and the two cost about the same near E / 2 copies."""
    if 2 * routing.num_tokens * routing.k <= routing.num_experts:
        return dispatch_copies(x, routing, experts)
    return dispatch_dropless(x, routing, experts)


def dispatch_kernel(x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    """The GPU kernels' path (moe_jax/kernels/moe_layer.py); their jnp references on CPU."""
    return kernel_layer.dispatch_kernel(x, routing, experts)


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

DispatchFn = Callable[[jax.Array, Routing, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class DispatchPath:
    """One way of running the experts: fn(x [S, M], routing, experts) -> y [S, M].

    uses_capacity: False when the path has no capacity buffer; the layer then routes with
      drop_tokens=False, so no token is dropped.
    payload: what the path sends across devices when a layer's experts are split over the expert group
      (moe_jax.exchange): "buffer" packs the [E, C, M] capacity buffer with `pack` (x, routing)
      -> [E, C, M], exchanges it and unpacks the experts' outputs with `unpack` (out [E, C, M],
      routing) -> y [S, M]; "rows" sends only the token copies that exist (the dropless exchange);
      None: the path has no expert-parallel form, and a mesh that splits experts is an error."""

    fn: DispatchFn
    uses_capacity: bool = True
    payload: Optional[str] = None  # PAYLOADS (the mesh's own `exchange` is the topology that carries it)
    pack: Optional[Callable] = None
    unpack: Optional[Callable] = None


PAYLOADS = ("buffer", "rows", None)
PATHS: dict[str, DispatchPath] = {}


def register_path(name: str, fn: DispatchFn, *, uses_capacity: bool = True, payload: Optional[str] = None,
                  pack: Optional[Callable] = None, unpack: Optional[Callable] = None) -> None:
    """Adds a dispatch path under `name` (the value of MoEConfig.dispatch that selects it)."""
    if name in PATHS:
        raise ValueError(f"dispatch path {name!r} is registered twice")
    if payload not in PAYLOADS:
        raise ValueError(f"payload={payload!r} is unknown; use one of {PAYLOADS}")
    if payload == "buffer" and (pack is None or unpack is None):
        raise ValueError(f"dispatch path {name!r}: the buffer exchange needs pack and unpack functions")
    PATHS[name] = DispatchPath(fn, uses_capacity, payload, pack, unpack)


register_path("einsum", dispatch_einsum, payload="buffer", pack=einsum_to_buffer, unpack=einsum_from_buffer)
register_path("gather", dispatch_gather, payload="buffer", pack=gather_to_buffer, unpack=combine_from_buffer)
register_path("dropless", dispatch_dropless, uses_capacity=False, payload="rows")
register_path("serve", dispatch_serving, uses_capacity=False, payload="rows")
register_path("kernel", dispatch_kernel)


def get_path(path: str) -> DispatchPath:
    try:
        return PATHS[path]
    except KeyError:
        raise ValueError(f"dispatch path {path!r} is unknown; use one of {tuple(PATHS)}") from None


def dispatch(path: str, x: jax.Array, routing: Routing, experts: dict) -> jax.Array:
    """Runs the experts on x [S, M] as `routing` says, by the named path. Returns y [S, M]."""
    return get_path(path).fn(x, routing, experts)
