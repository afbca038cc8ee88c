r"""The MoE exchange: flat vs hierarchical vs tensor-coordinated. On this machine's devices, the
time of one exchange (measured) beside the messages and bytes each device sends in it (computed by
`round_trip_cost`, not measured); then the same model up to 1024 GPUs.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_comm.py [--markdown FILE]

One exchange is a round trip of a per-device [E, C, M] float32 buffer B under shard_map: the
dispatch all_to_all and the return all_to_all over the expert mesh axis, and for "coordinated" the
all_gather over tensor. On virtual CPU devices the "network" is memory copies, so times show the
data-movement cost, not link latency.

The model, per device and round trip (p devices, G per node, L tensor ranks). The all_to_alls run
among the expert ranks only, p / L of them when L tensor ranks hold the same tokens:
  flat, L = 1     2 (p - 1) messages, 2 B (p - 1) / p                 (the paper's O(p))
  flat, L > 1     2 (p/L - 1) messages, 2 B (p/L - 1) / (p/L): every tensor rank sends the whole
                  buffer, the same rows as its L - 1 tensor peers
  hierarchical    2 ((G - 1) + (p/G - 1)) messages (the paper's O(G + p/G)): within the node, then
                  across nodes
  coordinated     2 (p/L - 1) + (L - 1) messages (the paper's O(p/L) + O(L)): each tensor rank
                  exchanges a 1/L share of the slots, then all-gathers the shares over L
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import exchange as exchange_lib
from moe_jax import parallel

flags.DEFINE_string("markdown", None, "Also write the tables to this markdown file.")
flags.DEFINE_integer("experts", 64, "E.")
flags.DEFINE_integer("capacity", 256, "C, slots per expert on each device.")
flags.DEFINE_integer("model_dim", 512, "M.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (minimum reported).")

SETTINGS = [
    # mesh (data, expert, tensor), exchange, expert_nodes
    ((1, 8, 1), "flat", 1),
    ((1, 8, 1), "hierarchical", 2),
    ((1, 8, 1), "hierarchical", 4),
    ((2, 4, 1), "flat", 1),
    ((2, 4, 1), "hierarchical", 2),
    ((1, 4, 2), "flat", 1),
    ((1, 4, 2), "coordinated", 1),
    ((1, 2, 4), "flat", 1),
    ((1, 2, 4), "coordinated", 1),
]


def round_trip_cost(exchange: str, expert_ranks: int, tensor: int = 1, nodes: int = 1) -> tuple[int, float]:
    """(messages, bytes in units of the buffer B) that one device sends in one round trip.

    expert_ranks: the size of the expert mesh axis, which the all_to_alls run over (p / L of p
    devices when L tensor ranks hold the same tokens); tensor: L; nodes: the expert ranks' node
    groups ("hierarchical" only). See the module docstring for the model.
    """
    if exchange == "coordinated" and tensor > 1:
        share = 1.0 / tensor
        return (2 * (expert_ranks - 1) + (tensor - 1),
                2 * share * (expert_ranks - 1) / expert_ranks + share * (tensor - 1))
    local = expert_ranks // nodes
    if exchange == "hierarchical" and nodes > 1 and local > 1:
        return 2 * ((local - 1) + (nodes - 1)), 2 * ((local - 1) / local + (nodes - 1) / nodes)
    return 2 * (expert_ranks - 1), 2 * (expert_ranks - 1) / expert_ranks


def mesh_cost(par: parallel.ParallelConfig) -> tuple[int, float]:
    """`round_trip_cost` of a mesh and exchange."""
    return round_trip_cost(par.exchange, par.expert_size, par.tensor_size, par.mesh.shape["expert_node"])


def measure(par: parallel.ParallelConfig, experts: int, capacity: int, model_dim: int, repeats: int) -> float:
    tp = par.tensor_size
    coordinated = par.resolved_exchange == "coordinated" and tp > 1

    def round_trip(buffer):
        buffer = buffer[0]  # [E, C, M] on this device
        if coordinated:
            share = capacity // tp
            buffer = jax.lax.dynamic_slice_in_dim(buffer, jax.lax.axis_index("tensor") * share, share, axis=1)
        sent = buffer.reshape(par.expert_size, experts // par.expert_size, *buffer.shape[1:])
        axes = parallel.EXPERT_AXES
        back = exchange_lib._all_to_all(exchange_lib._all_to_all(sent, par, axes) * 2.0, par, axes)
        back = back.reshape(experts, *buffer.shape[1:])
        if coordinated:
            back = jax.lax.all_gather(back, "tensor", axis=1, tiled=True)
        return back[None]

    spec = P(parallel.AXES)
    fn = jax.jit(jax.shard_map(round_trip, mesh=par.mesh, in_specs=spec, out_specs=spec, check_vma=False))
    devices = par.mesh.devices.size
    x = jax.device_put(jnp.ones((devices, experts, capacity, model_dim), jnp.float32),
                       jax.sharding.NamedSharding(par.mesh, spec))
    jax.block_until_ready(fn(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def analytic_rows(gpus_per_node: int = 8, tensor: int = 4) -> list[tuple[int, dict]]:
    """[(p, {column: (messages, bytes in units of B)})] for p up to 1024 GPUs."""
    rows = []
    for p in (8, 16, 64, 128, 256, 512, 1024):
        rows.append((p, {
            "flat, L = 1": round_trip_cost("flat", p),
            f"flat, L = {tensor}": round_trip_cost("flat", p // tensor, tensor),
            "hierarchical, L = 1": round_trip_cost("hierarchical", p, 1, max(p // gpus_per_node, 1)),
            f"coordinated, L = {tensor}": round_trip_cost("coordinated", p // tensor, tensor),
        }))
    return rows


def main(argv):
    del argv
    f = flags.FLAGS
    lines = []
    buffer_bytes = f.experts * f.capacity * f.model_dim * 4
    lines.append(f"On {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}: one round trip "
                 f"of a per-device [E={f.experts}, C={f.capacity}, M={f.model_dim}] float32 buffer "
                 f"({buffer_bytes / 2**20:.0f} MiB). Messages and MiB are computed (the module's model); "
                 f"ms is measured (best of {f.repeats}).\n")
    lines.append("| mesh (data, expert, tensor) | exchange | expert nodes | messages per device (computed) "
                 "| MiB sent per device (computed) | ms per round trip (measured) |")
    lines.append("|---|---|---|---|---|---|")
    for mesh_shape, exchange, nodes in SETTINGS:
        if jax.device_count() != 8:
            raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (or on 8 devices)")
        par = parallel.ParallelConfig(parallel.make_mesh(*mesh_shape, expert_nodes=nodes), exchange=exchange)
        ms = measure(par, f.experts, f.capacity, f.model_dim, f.repeats)
        messages, fraction = mesh_cost(par)
        lines.append(f"| {mesh_shape} | {exchange} | {nodes} | {messages} | {fraction * buffer_bytes / 2**20:.1f} "
                     f"| {ms:.1f} |")
        print(lines[-1], flush=True)
    rows = analytic_rows()
    lines.append("\nComputed, not measured: messages per device per round trip, and in brackets the bytes sent "
                 "in units of the buffer B (G = 8 GPUs per node, L tensor ranks; the all_to_alls run over the "
                 "p / L expert ranks):\n")
    lines.append("| GPUs p | " + " | ".join(rows[0][1]) + " |")
    lines.append("|---" * (len(rows[0][1]) + 1) + "|")
    for p, columns in rows:
        cells = " | ".join(f"{messages} ({size:.2f} B)" for messages, size in columns.values())
        lines.append(f"| {p} | {cells} |")
    text = "\n".join(lines)
    print(text)
    if f.markdown:
        with open(f.markdown, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
