"""Routing-realistic cost of the expert exchange: a recorded routing trace (moe_jax.routing_trace)
replayed through the exchange's bookkeeping on a hypothetical expert-parallel group, against a
perfectly balanced router of the same shapes.

The compiled step's collective bytes (moe_jax.cost) are static: the buffer exchange always sends the
[E, C, M] capacity buffer and the bounded rows exchange its [ep, bound] padded buffer, whatever the
routing. What routing changes is what those fixed shapes hold and what the ragged exchange sends:
  * buffer paths (einsum, gather): each shard's copies beyond an expert's capacity C are dropped;
    the buffer's useful fraction is kept copies / (E * C) slots;
  * rows paths (dropless, serve): each shard sends each device of its group at most
    bound = row_bound(copies, ep, row_exchange_factor) rows; copies past it overflow (not processed);
    the ragged exchange (GPU) sends exactly the rows that fit, so a device receives
    sum over shards of min(rows for it, bound): the busiest device's rows over the mean is the
    exchange's and the grouped matmul's straggler factor.

Layout, as moe_jax.parallel and moe_jax.exchange place it: the batch [B, T] is split along B into
`devices` equal shards (the batch axes), expert e of a layer with E experts lives on device
e // (E / ep) of its group, where ep = min(devices, E) (DeepSpeed's Pyramid rule: a layer with fewer
experts than the group exchanges within groups of E devices) and shard s belongs to group
s // ep. Every count is a routed copy (the trace's expert for every column, kept or not on the
recording run), so the drops are those of the hypothetical mesh, not the recording's. Token-major
routers only: expert-choice routes each shard to exactly C tokens per expert, balanced by
construction.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax.exchange import row_bound
from moe_jax.routing import compute_capacity
from moe_jax.routing_trace import decode


@dataclasses.dataclass(frozen=True)
class ExchangeLoad:
    """One layer's routing on one expert-parallel group (the module docstring's quantities)."""

    devices: int
    group: int  # ep: devices one exchange spans
    experts: int
    copies: int  # routed token copies in the batch
    capacity: int  # C per shard and expert (buffer paths)
    bound: int  # rows a shard may send a device (rows paths)
    dropped_fraction: float  # buffer paths: copies past their expert's capacity in their shard
    buffer_useful_fraction: float  # buffer paths: kept copies / buffer slots
    overflow_fraction: float  # rows paths: copies past their destination's bound
    received_max: int  # rows paths (ragged): the busiest device's received rows
    received_mean: float
    expert_load_max_over_mean: float  # routed copies of the busiest expert over the mean

    @property
    def received_imbalance(self) -> float:
        return self.received_max / max(self.received_mean, 1e-30)


def copies_per_shard_and_expert(code: np.ndarray, num_experts: int, devices: int) -> np.ndarray:
    """code [B, T, k] (a token-major router's trace) -> counts [devices, E]: the routed copies of each
    batch shard (B split into `devices` equal parts) for each expert."""
    code = np.asarray(code)
    if code.ndim != 3:
        raise ValueError(f"a trace code is [B, T, k]; got shape {code.shape}")
    batch = code.shape[0]
    if batch % devices:
        raise ValueError(f"the trace's batch of {batch} sequences does not split into {devices} shards; use a "
                         "device count that divides it")
    expert, _ = decode(code)
    shards = expert.reshape(devices, -1)
    counts = np.zeros((devices, num_experts), np.int64)
    for s in range(devices):
        counts[s] = np.bincount(shards[s], minlength=num_experts + 1)[:num_experts]
    return counts


def exchange_load(counts: np.ndarray, k: int, capacity_factor: float = 1.0, min_capacity: int = 4,
                  row_exchange_factor: float = 2.0) -> ExchangeLoad:
    """The ExchangeLoad of per-shard expert counts [devices, E] (copies_per_shard_and_expert)."""
    devices, num_experts = counts.shape
    group = min(devices, num_experts)
    if devices % group or num_experts % group:
        raise ValueError(f"{num_experts} experts on {devices} devices: the expert group ({group}) must divide both")
    copies_per_shard = int(counts.sum(axis=1).max())
    tokens_per_shard = copies_per_shard // k
    capacity = compute_capacity(tokens_per_shard, num_experts, capacity_factor, min_capacity, k)
    kept = np.minimum(counts, capacity)
    copies = int(counts.sum())
    # rows exchange: shard s sends its group's device d the copies of d's experts, at most `bound`
    local = num_experts // group
    per_device = counts.reshape(devices, group, local).sum(axis=2)  # [shard, device of its group]
    bound = row_bound(copies_per_shard, group, row_exchange_factor)
    sent = np.minimum(per_device, bound)
    received = np.zeros(devices, np.int64)  # device g * group + d receives from the shards of group g
    for s in range(devices):
        first = (s // group) * group
        received[first:first + group] += sent[s]
    load = counts.sum(axis=0)
    return ExchangeLoad(
        devices=devices, group=group, experts=num_experts, copies=copies, capacity=capacity, bound=bound,
        dropped_fraction=float((counts - kept).sum() / max(copies, 1)),
        buffer_useful_fraction=float(kept.sum() / (devices * num_experts * capacity)),
        overflow_fraction=float((per_device - sent).sum() / max(copies, 1)),
        received_max=int(received.max()), received_mean=float(received.mean()),
        expert_load_max_over_mean=float(load.max() / max(load.mean(), 1e-30)))


def balanced_counts(devices: int, num_experts: int, copies_per_shard: int) -> np.ndarray:
    """The counts of a perfectly balanced router: each shard's copies spread evenly over the experts
    (the remainder to the first experts)."""
    base, extra = divmod(copies_per_shard, num_experts)
    row = np.full(num_experts, base, np.int64)
    row[:extra] += 1
    return np.tile(row, (devices, 1))


def trace_cost(code: np.ndarray, num_experts: int, devices: int, **options) -> dict[str, ExchangeLoad]:
    """{"real": the trace's ExchangeLoad, "balanced": a balanced router's with as many copies per
    shard}. options: exchange_load's capacity_factor, min_capacity, row_exchange_factor."""
    counts = copies_per_shard_and_expert(code, num_experts, devices)
    k = np.asarray(code).shape[-1]
    balanced = balanced_counts(devices, num_experts, int(counts.sum(axis=1).max()))
    return {"real": exchange_load(counts, k, **options), "balanced": exchange_load(balanced, k, **options)}


@dataclasses.dataclass(frozen=True)
class InterNodeRows:
    """Rows a trace sends between nodes: devices split into `nodes` nodes, experts placed
    node-major (expert e on node e // (E / nodes)), batch shard s on node s // (devices / nodes)."""

    nodes: int
    copies: int
    per_copy: int  # today's exchanges: every copy whose expert is on another node crosses
    per_node: int  # a once-per-node exchange (DeepSeek's): a token crosses once per remote node it uses
    max_nodes_per_token: int

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.per_node / max(self.per_copy, 1)


def internode_rows(code: np.ndarray, num_experts: int, devices: int, nodes: int) -> InterNodeRows:
    """The InterNodeRows of a token-major trace code [B, T, k] on `devices` devices in `nodes` nodes."""
    code = np.asarray(code)
    if devices % nodes or num_experts % nodes or code.shape[0] % devices:
        raise ValueError(f"{nodes} nodes must divide the {devices} devices and the {num_experts} experts, and "
                         f"{devices} devices the trace's batch of {code.shape[0]}")
    expert, _ = decode(code)
    batch_node = np.repeat(np.arange(devices) // (devices // nodes), code.shape[0] // devices)  # [B]
    expert_node = expert // (num_experts // nodes)  # [B, T, k]
    remote = expert_node != batch_node[:, None, None]
    used = np.zeros(code.shape[:2] + (nodes,), bool)  # [B, T, node]: the nodes a token's copies use
    np.put_along_axis(used, expert_node, True, axis=-1)
    used_remote = used & (np.arange(nodes) != batch_node[:, None, None])
    return InterNodeRows(nodes=nodes, copies=int(expert.size), per_copy=int(remote.sum()),
                         per_node=int(used_remote.sum()), max_nodes_per_token=int(used.sum(axis=-1).max()))
