"""One MoE layer under shard_map: route per shard, move tokens to their experts' devices, run, return.

`sharded_moe` is what `moe_jax.moe.moe_forward` calls on a mesh. Each shard routes its own tokens
(capacity, dropping and random token selection per shard, as in DeepSpeed), then the configured
dispatch path (`MoEConfig.dispatch`, a name of moe_jax.dispatch.PATHS) decides how tokens cross
devices, by its registry entry's `exchange`:

  "buffer"  (einsum, gather) the path packs the [E, C, M] capacity buffer with its own pack
            function, the buffer goes through all_to_all over the expert group, each device runs
            its E / ep experts on [E / ep, ep * C, M], all_to_all back, the path unpacks.
  "rows"    (dropless, serve) only the token copies that exist cross: each device sends every
            other device at most `bound = ceil(copies / ep * moe.row_exchange_factor)` rows, the
            receiver runs its experts on the received rows with a grouped matmul (row tiles on CPU,
            ragged_dot on GPU), and the outputs go back the same way. A copy past its destination's
            bound is not processed: its output is 0 (the weights of the token's other copies are
            not renormalised), it is counted in `overflow_fraction` and in `dropped_fraction` /
            `kept_counts`. With factor >= ep (serving: inf) nothing can overflow. Two forms
            (`ParallelConfig.row_exchange`), equal in every number: "bounded" sends the [ep, bound]
            padded buffer with all_to_all (the CPU form: XLA:CPU has no ragged collective);
            "ragged" (GPU) sends exactly the rows that exist with jax.lax.ragged_all_to_all, after
            one all_gather of the [ep] send counts.
  None      (kernel) no expert-parallel form: a mesh that splits such a layer's experts is an
            error that names the path.

A layer with fewer experts than the expert group exchanges within its own smaller group of devices
(moe_jax.parallel's Pyramid rule, `ParallelConfig.layer_axes`). Layers whose experts are not split
(no expert axis, or no group fits) run the path itself on each shard's tokens.

Tensor ranks hold the same tokens. Unless the experts are sliced over `tensor` (expert slicing: each
rank runs 1/tp of every expert's FFN dimension and the partial outputs are summed) or the exchange
is "flat" (each rank repeats the same work), the work is split over the tensor ranks and the
results all-gathered: the buffer exchange sends 1/tp of the capacity slots per rank (DeepSpeed's
tensor-coordinated exchange; C padded to a multiple of tp with empty slots), the rows exchange
sends the copies of 1/tp of the tokens, and a layer that is not split runs 1/tp of its buffer's
slots (buffer paths) or of its tokens (rows paths) per rank.

The hierarchical exchange runs each all_to_all as an intra-node stage over `expert` and an
inter-node stage over `expert_node` (moe_jax.parallel); "node_dedup" sends each token to a node
once and fans it out there (moe_jax.node_exchange; capacity-buffer paths).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import dispatch as dispatch_lib
from moe_jax import experts as experts_lib
from moe_jax import grad_precision
from moe_jax import node_exchange
from moe_jax import routing_trace
from moe_jax.routing import Routing
from moe_jax.parallel import BATCH_AXES, EXPERT_AXES, INTRA_NODE_AXES, ParallelConfig, param_specs
from moe_jax import routing as routing_lib

STAT_NAMES = routing_lib.STAT_NAMES + ("overflow_fraction",)


def _all_to_all(buffer: jax.Array, par: ParallelConfig, axes: tuple[str, ...]) -> jax.Array:
    """buffer [g, ...] (row j goes to rank j of the layer's group `axes`) -> [g, ...] (row j came
    from rank j)."""
    nodes = par.mesh.shape["expert_node"]
    local = math.prod(par.mesh.shape[a] for a in INTRA_NODE_AXES)
    if par.exchange != "hierarchical" or axes != EXPERT_AXES or nodes == 1 or local == 1:
        return jax.lax.all_to_all(buffer, axes, 0, 0, tiled=True)
    rest = buffer.shape[1:]
    staged = buffer.reshape(nodes, local, *rest)
    staged = jax.lax.all_to_all(staged, INTRA_NODE_AXES, 1, 1, tiled=True)  # intra-node first
    staged = jax.lax.all_to_all(staged, "expert_node", 0, 0, tiled=True)  # then across nodes
    return staged.reshape(buffer.shape)


def _sliced(par: ParallelConfig) -> bool:
    return par.expert_slicing and par.tensor_size > 1


def _split_over_tensor(par: ParallelConfig) -> bool:
    """Whether tensor ranks share out the expert work (else it is sliced or repeated)."""
    return par.tensor_size > 1 and not par.expert_slicing and par.resolved_exchange not in ("flat", "node_dedup")


def _expert_ffn(experts: dict, buffer: jax.Array, par: ParallelConfig) -> jax.Array:
    """Local experts on [E_local, rows, M]; with expert slicing the FFN dim is split over tensor."""
    if not _sliced(par):
        return experts_lib.expert_ffn(experts, buffer)
    dtype = buffer.dtype
    hidden = jnp.einsum("ecm,emf->ecf", buffer, experts["w1"].astype(dtype)) + experts["b1"][:, None, :].astype(dtype)
    partial = jnp.einsum("ecf,efm->ecm", experts_lib.activation(hidden), experts["w2"].astype(dtype))
    return jax.lax.psum(partial, "tensor") + experts["b2"][:, None, :].astype(dtype)


def _tensor_share(size: int, par: ParallelConfig) -> tuple[int, jax.Array]:
    """(share, this tensor rank's start) when `size` items are split into tp shares (the last
    padded: share = ceil(size / tp))."""
    share = -(-size // par.tensor_size)
    return share, jax.lax.axis_index("tensor") * share


def _my_share(a: jax.Array, par: ParallelConfig, axis: int) -> tuple[jax.Array, jax.Array]:
    """(this tensor rank's share of `a` along `axis`, the share's start); the axis is padded with
    zeros to tp shares of ceil(size / tp)."""
    share, start = _tensor_share(a.shape[axis], par)
    padding = [(0, 0)] * a.ndim
    padding[axis] = (0, share * par.tensor_size - a.shape[axis])
    return jax.lax.dynamic_slice_in_dim(jnp.pad(a, padding), start, share, axis=axis), start


def _all_shares(part: jax.Array, par: ParallelConfig, axis: int, size: int) -> jax.Array:
    """Every tensor rank's share along `axis`, gathered and cut back to `size`."""
    return jax.lax.slice_in_dim(jax.lax.all_gather(part, "tensor", axis=axis, tiled=True), 0, size, axis=axis)


def buffer_exchange(tokens: jax.Array, routing: Routing, experts: dict, par: ParallelConfig, path,
                    axes: tuple[str, ...]) -> jax.Array:
    """Local tokens [S, M] -> y [S, M] through experts split over the group `axes`, by the path's
    capacity buffer (path.pack / path.unpack)."""
    ep = math.prod(par.mesh.shape[a] for a in axes)
    num_experts, capacity = routing.num_experts, routing.capacity
    model_dim = tokens.shape[-1]
    buffer = path.pack(tokens, routing)  # [E, C, M]
    split = _split_over_tensor(par)
    if split:  # each tensor rank sends its 1/tp of the slots
        buffer, _ = _my_share(buffer, par, axis=1)
    slots = buffer.shape[1]
    local_experts = num_experts // ep
    # [ep (source), E_l, slots, M]
    received = _all_to_all(buffer.reshape(ep, local_experts, slots, model_dim), par, axes)
    rows = received.transpose(1, 0, 2, 3).reshape(local_experts, ep * slots, model_dim)
    out = _expert_ffn(experts, rows, par)
    out = out.reshape(local_experts, ep, slots, model_dim).transpose(1, 0, 2, 3)
    out = _all_to_all(out, par, axes).reshape(num_experts, slots, model_dim)
    if split:
        out = _all_shares(out, par, axis=1, size=capacity)
    return path.unpack(out, routing)


def row_bound(copies: int, group: int, factor: float) -> int:
    """Rows each device sends each device of its group (of `group` devices) in the rows exchange:
    ceil(copies / group * factor), between 1 and `copies` (copies: this rank's token copies)."""
    if factor >= group:  # every copy may go to one device: nothing can overflow
        return copies
    return max(1, min(copies, math.ceil(copies / group * factor)))


def _grouped_rows(experts: dict, rows: jax.Array, row_expert: jax.Array, num_local: int) -> jax.Array:
    """Local experts on received rows [R, M] in any order; row_expert [R] (num_local: an empty row,
    whose output is unspecified). Rows are sorted by expert for the grouped matmul and put back."""
    order = jnp.argsort(row_expert, stable=True).astype(jnp.int32)
    sorted_expert = row_expert[order]
    group_sizes = jnp.zeros(num_local, jnp.int32).at[row_expert].add(1, mode="drop")  # empties dropped
    sorted_rows = rows[order]
    clamped = jnp.minimum(sorted_expert, num_local - 1)  # empty rows sit past the groups' total
    if jax.default_backend() == "cpu":
        out = experts_lib.grouped_ffn_tiles(experts, sorted_rows, clamped, group_sizes)
    else:
        out = experts_lib.grouped_ffn_ragged(experts, sorted_rows, clamped, group_sizes)
    return jnp.zeros_like(out).at[order].set(out)


# jax.lax.ragged_all_to_all's signature; the CPU tests put an emulation of its semantics here
# (XLA:CPU cannot run the collective), so everything around it is the shipped code.
_ragged_all_to_all = jax.lax.ragged_all_to_all


def _ragged_round_trip(experts: dict, padded_tokens: jax.Array, expert: jax.Array, dest: jax.Array,
                       rank: jax.Array, sent: jax.Array, counts: jax.Array, bound: int, k: int, num_local: int,
                       axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
    """The rows exchange with ragged_all_to_all: each copy that is sent (sent [N]; dest [N] its
    device, rank [N] its place among this device's copies for dest; counts [ep] copies per dest)
    crosses once, to its device and back. Returns (row [N]: each copy's row in `back`, N where
    unsent; back [N, M]: the experts' outputs for this device's copies, in its send layout).

    Send layout: the copies packed by destination, min(counts[j], bound) for device j. The [ep, ep]
    matrix of those sizes (one all_gather) gives every offset: device i's rows land on device j
    after the rows of devices 0..i-1 (receive buffer [ep * bound, M], packed by source), and come
    back to where device i sent them from."""
    num_copies = dest.shape[0]
    model_dim = padded_tokens.shape[1]
    ep = counts.shape[0]
    send_sizes = jnp.minimum(counts, bound).astype(jnp.int32)
    send_offsets = (jnp.cumsum(send_sizes) - send_sizes).astype(jnp.int32)
    sizes = jax.lax.all_gather(send_sizes, axes)  # [ep, ep]: rows device i sends device j
    me = jax.lax.axis_index(axes)
    recv_sizes = sizes[:, me]
    recv_offsets = (jnp.cumsum(recv_sizes) - recv_sizes).astype(jnp.int32)
    landing = (jnp.cumsum(sizes, axis=0) - sizes)[me]  # where my rows for j start in j's buffer
    sent_from = (jnp.cumsum(sizes, axis=1) - sizes)[:, me]  # where i's rows for me start in i's layout
    row = jnp.where(sent, send_offsets[jnp.minimum(dest, ep - 1)] + rank, num_copies).astype(jnp.int32)
    row_copy = jnp.full((num_copies,), num_copies, jnp.int32).at[row].set(
        jnp.arange(num_copies, dtype=jnp.int32), mode="drop")
    filled = row_copy < num_copies
    send = padded_tokens[jnp.where(filled, row_copy // k, padded_tokens.shape[0] - 1)]
    send_expert = jnp.where(filled, expert[jnp.minimum(row_copy, num_copies - 1)] % num_local, num_local)
    received = _ragged_all_to_all(send, jnp.zeros((ep * bound, model_dim), send.dtype), send_offsets,
                                  send_sizes, landing, recv_sizes, axis_name=axes)
    received_expert = _ragged_all_to_all(send_expert.astype(jnp.int32), jnp.full((ep * bound,), num_local, jnp.int32),
                                         send_offsets, send_sizes, landing, recv_sizes, axis_name=axes)
    out = _grouped_rows(experts, received, received_expert, num_local)
    back = _ragged_all_to_all(out, jnp.zeros((num_copies, model_dim), out.dtype), recv_offsets, recv_sizes,
                              sent_from, send_sizes, axis_name=axes)
    return row, back


def rows_exchange(tokens: jax.Array, routing: Routing, experts: dict, par: ParallelConfig, factor: float,
                  axes: tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
    """Local tokens [S, M] -> (y [S, M], overflow [S, k] bool) sending only the copies that exist
    to the experts' devices in the group `axes` (module docstring)."""
    if _sliced(par):
        raise ValueError("the rows exchange (dispatch 'dropless' or 'serve') does not slice experts over "
                         "tensor ranks; set mesh.expert_slicing=False (tensor ranks then share the tokens) "
                         "or use moe.dispatch='gather'")
    ep = math.prod(par.mesh.shape[a] for a in axes)
    num_tokens, k = routing.expert_index.shape
    num_local = routing.num_experts // ep
    model_dim = tokens.shape[-1]
    num_copies = num_tokens * k
    expert = routing.expert_index.reshape(-1)
    valid = routing.kept.reshape(-1)
    token_of_copy = jnp.arange(num_copies, dtype=jnp.int32) // k
    split = _split_over_tensor(par)
    if split:  # this tensor rank sends the copies of its 1/tp of the tokens
        share, start = _tensor_share(num_tokens, par)
        valid = valid & (token_of_copy >= start) & (token_of_copy < start + share)
        copies = share * k
    else:
        copies = num_copies
    bound = row_bound(copies, ep, factor)
    dest = jnp.where(valid, expert // num_local, ep)  # invalid copies sort last
    order = jnp.argsort(dest, stable=True).astype(jnp.int32)
    per_dest = jnp.zeros(ep + 1, jnp.int32).at[dest].add(1)
    start_of = jnp.cumsum(per_dest) - per_dest
    rank_sorted = jnp.arange(num_copies, dtype=jnp.int32) - start_of[dest[order]]
    rank = jnp.zeros(num_copies, jnp.int32).at[order].set(rank_sorted)
    sent = valid & (rank < bound)
    overflow = valid & (rank >= bound)
    padded_tokens = jnp.concatenate([tokens, jnp.zeros((1, model_dim), tokens.dtype)])
    if par.resolved_row_exchange == "ragged":
        row, back = _ragged_round_trip(experts, padded_tokens, expert, dest, rank, sent, per_dest[:ep], bound,
                                       k, num_local, axes)
    else:
        row = jnp.where(sent, dest * bound + rank, ep * bound)  # the copy's row in the send buffer
        row_copy = jnp.full((ep * bound,), num_copies, jnp.int32).at[row].set(
            jnp.arange(num_copies, dtype=jnp.int32), mode="drop")
        filled = row_copy < num_copies
        send = padded_tokens[jnp.where(filled, row_copy // k, num_tokens)].reshape(ep, bound, model_dim)
        send_expert = jnp.where(filled, expert[jnp.minimum(row_copy, num_copies - 1)] % num_local, num_local)
        received = _all_to_all(send, par, axes).reshape(ep * bound, model_dim)
        received_expert = _all_to_all(send_expert.reshape(ep, bound), par, axes).reshape(ep * bound)
        out = _grouped_rows(experts, received, received_expert, num_local)
        back = _all_to_all(out.reshape(ep, bound, model_dim), par, axes).reshape(ep * bound, model_dim)
    per_copy = jnp.concatenate([back, jnp.zeros((1, model_dim), back.dtype)])[row]  # [N, M]; unsent: 0
    weight = routing.weight * sent.reshape(num_tokens, k)
    y = jnp.einsum("skm,sk->sm", per_copy.reshape(num_tokens, k, model_dim), weight.astype(tokens.dtype))
    if split:  # rows outside this rank's share of the tokens are not its own
        y = _all_shares(_my_share(y, par, axis=0)[0], par, axis=0, size=num_tokens)
    return y, overflow.reshape(num_tokens, k)


def _token_rows(routing: Routing, start: jax.Array, size: int, total: int) -> Routing:
    """The routing of tokens [start, start + size) of the table padded to `total` rows with empty
    (not kept, weight 0) copies; capacity and statistics unchanged."""
    def rows(a):
        padded = jnp.pad(a, ((0, total - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))
        return jax.lax.dynamic_slice_in_dim(padded, start, size, axis=0)

    return routing.replace(expert_index=rows(routing.expert_index), slot=rows(routing.slot),
                           weight=rows(routing.weight), kept=rows(routing.kept))


def local_layer(tokens: jax.Array, routing: Routing, experts: dict, par: ParallelConfig, path,
                path_name: str) -> jax.Array:
    """A layer whose experts are not split over the expert group, on this shard's tokens."""
    if _sliced(par):
        if path.payload != "buffer":
            raise ValueError(f"mesh.expert_slicing=True needs a capacity-buffer dispatch path (einsum or gather); "
                             f"moe.dispatch={path_name!r} has none")
        return path.unpack(_expert_ffn(experts, path.pack(tokens, routing), par), routing)
    if not _split_over_tensor(par) or path.payload is None:
        return path.fn(tokens, routing, experts)
    if path.payload == "buffer":  # each tensor rank runs its 1/tp of the slots
        buffer = path.pack(tokens, routing)
        out = _expert_ffn(experts, _my_share(buffer, par, axis=1)[0], par)
        return path.unpack(_all_shares(out, par, axis=1, size=buffer.shape[1]), routing)
    mine, start = _my_share(tokens, par, axis=0)  # each tensor rank runs its 1/tp of the tokens
    y = path.fn(mine, _token_rows(routing, start, mine.shape[0], mine.shape[0] * par.tensor_size), experts)
    return _all_shares(y, par, axis=0, size=tokens.shape[0])


def sharded_moe(params: dict, tokens: jax.Array, *, moe, train: bool, rng, par: ParallelConfig, route_fn,
                replay=None, record: bool = False):
    """Runs route + dispatch of one MoE layer under shard_map. tokens [B, T, M] (global, batch-sharded).
    Returns (y [B, T, M], stats) with stats reduced over the whole batch. replay [B, T, k]: a
    recorded routing code to route with; record: stats["routing_code"] [B, T, k] (batch-sharded)."""
    num_experts = params["gate"]["kernel"].shape[1]
    axes = par.layer_axes(num_experts)
    sharded = bool(axes)
    path = dispatch_lib.get_path(moe.dispatch)
    if sharded and path.payload is None:
        usable = tuple(name for name, p in dispatch_lib.PATHS.items() if p.payload is not None)
        raise ValueError(f"moe.dispatch={moe.dispatch!r} has no expert-parallel exchange, and this mesh splits "
                         f"the {num_experts} experts of a layer over {par.group_size(num_experts)} devices; use one of "
                         f"{usable}, or mesh.expert=1")
    expert_specs = param_specs({"experts": params["experts"]}, par)["experts"]
    experts_in, expert_specs, carried = _expert_copies(params["experts"], expert_specs, par)
    dedup = par.exchange == "node_dedup" and axes == EXPERT_AXES and par.mesh.shape["expert_node"] > 1
    if dedup and path.payload != "buffer":
        raise ValueError(f"mesh.exchange='node_dedup' needs a capacity-buffer dispatch path (moe.dispatch einsum "
                         f"or gather), not {moe.dispatch!r}; or use mesh.exchange='hierarchical'")
    x_spec = P(BATCH_AXES)
    has_rng = rng is not None

    def body(x, gate, experts, key, code):
        if carried:
            experts = jax.tree.map(lambda c: c[0], experts)
        batch, length, model_dim = x.shape
        flat = x.reshape(-1, model_dim)
        if has_rng:  # a different stream per shard (RTS, jitter and noise are per-shard draws)
            key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXES))
        routing = route_fn(gate, flat, moe=moe, train=train, rng=key if has_rng else None,
                           replay=None if code is None else code.reshape(flat.shape[0], -1))
        # the router's decision; a replay repeats the exchange, and with it any overflow
        routing_code = routing_trace.encode(routing).reshape(batch, length, routing.k) if record else None
        overflow = jnp.zeros(routing.kept.shape, bool)
        if not sharded:
            y = local_layer(flat, routing, experts, par, path, moe.dispatch)
        elif dedup:
            y, overflow = node_exchange.exchange(flat, routing, experts, par, moe, lambda e, b: _expert_ffn(e, b, par))
        elif path.payload == "buffer":
            y = buffer_exchange(flat, routing, experts, par, path, axes)
        else:
            y, overflow = rows_exchange(flat, routing, experts, par, moe.row_exchange_factor, axes)
            if _split_over_tensor(par):  # each tensor rank knows the overflow of its own tokens only
                overflow = jax.lax.psum(overflow.astype(jnp.int32), "tensor") > 0
        # overflowed copies count as dropped (a router's kept copies need not fill its table's columns)
        routing = routing.replace(kept=routing.kept & ~overflow, dropped_fraction=routing.dropped_fraction
                                  + jnp.mean(overflow.astype(jnp.float32)))
        stats = routing_lib.routing_stats(routing, axes=BATCH_AXES, scope=moe.balance_loss_scope, seq_len=length)
        stats["overflow_fraction"] = jax.lax.pmean(jnp.mean(overflow.astype(jnp.float32)), BATCH_AXES)
        if record:
            stats["routing_code"] = routing_code
        return y.reshape(batch, length, model_dim), stats

    key = rng if has_rng else jax.random.key(0)
    stat_specs = {name: P() for name in STAT_NAMES}
    if record:
        stat_specs["routing_code"] = x_spec
    fn = jax.shard_map(body, mesh=par.mesh, in_specs=(x_spec, P(), expert_specs, P(), x_spec),
                       out_specs=(x_spec, stat_specs), check_vma=False)
    return fn(tokens, params["gate"], experts_in, key, replay)


def _expert_copies(experts: dict, specs: dict, par: ParallelConfig) -> tuple[dict, dict, bool]:
    """(experts, in_specs, carried). Under a reduce dtype other than the weights' (moe_jax.
    grad_precision) the expert weights enter shard_map as per-device copies over the mesh axes their
    spec leaves out (batch axes, and tensor unless slicing), so that their gradient's sum over those
    axes is taken in that dtype outside shard_map (shard_map sums a replicated input's cotangent in
    the input's float32)."""
    dtype = grad_precision.current()
    if dtype is None or all(leaf.dtype == dtype for leaf in jax.tree.leaves(experts)):
        return experts, specs, False

    def carried_spec(spec):  # the copies' axis over the batch axes the weight is replicated over
        named = {a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))}
        missing = tuple(a for a in BATCH_AXES + ("tensor",) if a not in named and par.mesh.shape[a] > 1)
        return P(missing or None, *spec)

    def carry(leaf, spec):
        axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
        n = math.prod(par.mesh.shape[a] for a in axes)
        return jax.lax.with_sharding_constraint(grad_precision.copies(n, leaf), NamedSharding(par.mesh, spec))

    specs = jax.tree.map(carried_spec, specs, is_leaf=lambda x: isinstance(x, P))
    return jax.tree.map(carry, experts, specs, is_leaf=lambda x: isinstance(x, P)), specs, True
