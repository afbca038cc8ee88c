r"""The MoE exchange: bytes each device sends and measured time per exchange, flat vs hierarchical
vs tensor-coordinated, on this machine's devices; and the analytic message counts up to 1024 GPUs.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_comm.py [--markdown FILE]

Measured: one round trip (dispatch all_to_all + return all_to_all; for "coordinated" also the
all_gather over tensor) of a per-device [E, C, M] float32 buffer under shard_map. On virtual CPU
devices the "network" is memory copies, so times show the data-movement cost, not link latency.

Analytic (messages a device sends per exchange, one direction; p devices, G per node, L tensor ranks):
  flat          p - 1                       (the paper's O(p))
  hierarchical  (G - 1) + (p / G - 1)       (the paper's O(G + p/G))
  coordinated   (p / L - 1) + (L - 1)       (the paper's O(p/L) + O(L): all_to_all among the
                                             p/L ranks of one tensor index, then all_gather over L)
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moe_jax import parallel  # noqa: E402

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


def bytes_sent(par: parallel.ParallelConfig, buffer_bytes: int) -> int:
    """Bytes one device sends in one round trip (both all_to_alls, plus the all_gather)."""
    ep, tp = par.expert_size, par.tensor_size
    nodes, local = par.mesh.shape["expert_node"], par.mesh.shape["expert"]
    if par.exchange == "coordinated" and tp > 1:
        share = buffer_bytes // tp
        return 2 * share * (ep - 1) // ep + share * (tp - 1)
    if par.exchange == "hierarchical" and nodes > 1 and local > 1:
        one_way = buffer_bytes * (local - 1) // local + buffer_bytes * (nodes - 1) // nodes
        return 2 * one_way
    return 2 * buffer_bytes * (ep - 1) // ep


def measure(par: parallel.ParallelConfig, experts: int, capacity: int, model_dim: int, repeats: int) -> float:
    tp = par.tensor_size
    coordinated = par.exchange == "coordinated" and tp > 1

    def round_trip(buffer):
        buffer = buffer[0]  # [E, C, M] on this device
        if coordinated:
            share = capacity // tp
            buffer = jax.lax.dynamic_slice_in_dim(buffer, jax.lax.axis_index("tensor") * share, share, axis=1)
        sent = buffer.reshape(par.expert_size, experts // par.expert_size, *buffer.shape[1:])
        back = parallel._all_to_all(parallel._all_to_all(sent, par) * 2.0, par)
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


def analytic_rows(gpus_per_node: int = 8, tensor: int = 4):
    rows = []
    for p in (8, 16, 64, 128, 256, 512, 1024):
        flat = p - 1
        hierarchical = (min(gpus_per_node, p) - 1) + (max(p // gpus_per_node, 1) - 1)
        coordinated = (max(p // tensor, 1) - 1) + (min(tensor, p) - 1)
        rows.append((p, flat, hierarchical, coordinated))
    return rows


def main(argv):
    del argv
    f = flags.FLAGS
    lines = []
    buffer_bytes = f.experts * f.capacity * f.model_dim * 4
    lines.append(f"Measured on {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}: "
                 f"one round trip of a per-device [E={f.experts}, C={f.capacity}, M={f.model_dim}] float32 buffer "
                 f"({buffer_bytes / 2**20:.0f} MiB)\n")
    lines.append("| mesh (data, expert, tensor) | exchange | expert nodes | MiB sent per device | ms |")
    lines.append("|---|---|---|---|---|")
    for mesh_shape, exchange, nodes in SETTINGS:
        if jax.device_count() != 8:
            raise SystemExit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (or on 8 devices)")
        par = parallel.ParallelConfig(parallel.make_mesh(*mesh_shape, expert_nodes=nodes), exchange=exchange)
        ms = measure(par, f.experts, f.capacity, f.model_dim, f.repeats)
        sent = bytes_sent(par, buffer_bytes) / 2**20
        lines.append(f"| {mesh_shape} | {exchange} | {nodes} | {sent:.1f} | {ms:.1f} |")
        print(lines[-1], flush=True)
    lines.append("\nAnalytic messages per device per exchange (G = 8 GPUs per node, L = 4 tensor ranks):\n")
    lines.append("| GPUs p | flat O(p) | hierarchical O(G + p/G) | coordinated O(p/L) + O(L) |")
    lines.append("|---|---|---|---|")
    for p, flat, hierarchical, coordinated in analytic_rows():
        lines.append(f"| {p} | {flat} | {hierarchical} | {coordinated} |")
    text = "\n".join(lines)
    print(text)
    if f.markdown:
        with open(f.markdown, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
