"""The node-deduplicated exchange (`mesh.exchange="node_dedup"`): each token crosses to a node once.

The flat and hierarchical exchanges move one row per (token, expert) copy: a top-2 token whose two
experts sit on the same remote node crosses the inter-node links twice. Here, on an expert group
split over G nodes (`expert_node`) of L devices each (`expert_replica` x `expert`), a layer runs:

  1. inter-node: each device sends each node the distinct tokens that have a kept copy there,
     once, with the token's combine weights for that node's E/G experts (all_to_all over
     `expert_node`, between devices of the same place in their nodes);
  2. intra-node: the receiving device turns those rows into copies for the node's experts and
     exchanges them within the node as the flat exchange does (all_to_all over the intra-node axes),
     the experts run, the outputs come back;
  3. the receiving device sums each row's copies with their weights (one row per token and node)
     and sends it back over `expert_node`; the source adds its nodes' rows.

Capacity. A source device sends a node at most C_node = min(S, ceil(f * C * E * reach / (k * G)))
rows (S its tokens, C the layer's expert capacity, reach = the most nodes a token can use: min(k, G),
and under group-limited routing at most m groups' nodes, f = `moe.node_capacity_factor`): C * E / k
is the tokens the capacity factor admits, reach / G the share of them a node receives when routing
is balanced. Expert-choice routing (each expert takes C tokens) sends a node up to C * E / G rows.
Tokens past a node's C_node are dropped for that node (their copies there count as dropped, as the
rows exchange's overflow does); with no token dropping (C = S) C_node = S and nothing is. The intra-node stage
needs no new bound: a device receives at most C copies per expert from each of G sources.

What it saves: the inter-node stage carries G * C_node rows per device where the hierarchical one
carries the whole E * C capacity buffer, a ratio of reach / k. Unrestricted top-2 on 2 nodes keeps
the bytes (reach = k = 2) and drops fewer copies per byte; group-limited top-2 (m = 1) halves them.

Capacity-buffer dispatch paths only (the path's pack and unpack are not used: the weights travel
with the rows); tensor ranks repeat the same work (as the flat exchange).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from moe_jax.config import MoEConfig
from moe_jax.parallel import INTRA_NODE_AXES, ParallelConfig
from moe_jax.routing import Routing


def node_capacity(num_tokens: int, capacity: int, num_experts: int, k: int, nodes: int, *, groups: int = 0,
                  group_limit: int = 0, factor: float = 1.0, column_per_expert: bool = False) -> int:
    """Rows a device sends each node (module docstring). groups / group_limit: moe.route_groups /
    route_group_limit (a group spans ceil(nodes / groups) nodes); column_per_expert: expert-choice
    routing, whose E / G experts on a node take C tokens each."""
    if capacity >= num_tokens:  # no token dropping: no node may drop either
        return num_tokens
    if column_per_expert:
        return max(1, min(num_tokens, math.ceil(factor * capacity * num_experts / nodes)))
    reach = min(k, nodes)
    if group_limit:
        reach = min(reach, group_limit * -(-nodes // groups))
    return max(1, min(num_tokens, math.ceil(factor * capacity * num_experts * reach / (k * nodes))))


def exchange(tokens: jax.Array, routing: Routing, experts: dict, par: ParallelConfig, moe: MoEConfig,
             expert_ffn: Callable[[dict, jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Local tokens [S, M] -> (y [S, M], overflow [S, k]: kept copies dropped at a node's capacity),
    through experts split over the whole expert group. expert_ffn(experts, [E_local, rows, M])."""
    nodes = par.mesh.shape["expert_node"]
    local = math.prod(par.mesh.shape[a] for a in INTRA_NODE_AXES)
    num_tokens, model_dim = tokens.shape
    num_experts, k = routing.num_experts, routing.k
    per_node = num_experts // nodes
    cap = node_capacity(num_tokens, routing.capacity, num_experts, k, nodes, groups=moe.route_groups,
                        group_limit=moe.route_group_limit, factor=moe.node_capacity_factor,
                        column_per_expert=routing.column_per_expert)
    # 1. the distinct tokens per destination node, in token order, at most `cap` each
    node = routing.expert_index // per_node  # [S, k]
    wanted = jnp.any(jax.nn.one_hot(node, nodes, dtype=jnp.bool_) & routing.kept[..., None], axis=1)  # [S, G]
    place = jnp.cumsum(wanted, axis=0, dtype=jnp.int32) - 1
    sent = wanted & (place < cap)
    place = jnp.where(sent, place, cap)  # cap: out of range, dropped by the scatters
    node_axis = jnp.broadcast_to(jnp.arange(nodes)[None, :], place.shape)
    rows = jnp.zeros((nodes, cap, model_dim), tokens.dtype).at[node_axis, place].set(
        jnp.broadcast_to(tokens[:, None, :], (num_tokens, nodes, model_dim)), mode="drop")
    copy_place = jnp.take_along_axis(place, node, axis=1)  # [S, k] the copy's row on its node
    copy_sent = routing.kept & (copy_place < cap)
    local_expert = routing.expert_index % per_node
    target = (node, jnp.where(copy_sent, copy_place, cap), local_expert)
    weights = jnp.zeros((nodes, cap, per_node), jnp.float32).at[target].add(
        jnp.where(copy_sent, routing.weight, 0.0).astype(jnp.float32), mode="drop")
    chosen = jnp.zeros((nodes, cap, per_node), jnp.bool_).at[target].set(copy_sent, mode="drop")
    # [G (source node), cap, ...] after the exchange
    rows, weights, chosen = (jax.lax.all_to_all(a, "expert_node", 0, 0, tiled=True) for a in (rows, weights, chosen))
    # 2. copies for this node's experts, exchanged within the node
    received = rows.reshape(nodes * cap, model_dim)
    chosen = chosen.reshape(nodes * cap, per_node)
    slot = jnp.cumsum(chosen, axis=0, dtype=jnp.int32) - 1  # a source keeps <= C copies per expert
    depth = nodes * routing.capacity
    slot = jnp.where(chosen, slot, depth)
    expert_axis = jnp.broadcast_to(jnp.arange(per_node)[None, :], slot.shape)
    buffer = jnp.zeros((per_node, depth, model_dim), tokens.dtype).at[expert_axis, slot].set(
        jnp.broadcast_to(received[:, None, :], (nodes * cap, per_node, model_dim)), mode="drop")
    experts_here = per_node // local
    buffer = jax.lax.all_to_all(buffer.reshape(local, experts_here, depth, model_dim), INTRA_NODE_AXES, 0, 0,
                                tiled=True)
    out = expert_ffn(experts, buffer.transpose(1, 0, 2, 3).reshape(experts_here, local * depth, model_dim))
    out = out.reshape(experts_here, local, depth, model_dim).transpose(1, 0, 2, 3)
    out = jax.lax.all_to_all(out, INTRA_NODE_AXES, 0, 0, tiled=True).reshape(per_node, depth, model_dim)
    # 3. one row per (token, node): the node's copies summed with their weights, sent back
    per_copy = out[expert_axis, jnp.minimum(slot, depth - 1)]  # [G * cap, E/G, M]
    scale = jnp.where(chosen, weights.reshape(nodes * cap, per_node), 0.0).astype(out.dtype)
    combined = jnp.einsum("rem,re->rm", per_copy, scale).reshape(nodes, cap, model_dim)
    back = jax.lax.all_to_all(combined, "expert_node", 0, 0, tiled=True)  # [G (node it went to), cap, M]
    picked = back[node_axis, jnp.minimum(place, cap - 1)]  # [S, G, M]
    y = jnp.sum(jnp.where(sent[..., None], picked, 0), axis=1)
    return y, routing.kept & ~copy_sent
