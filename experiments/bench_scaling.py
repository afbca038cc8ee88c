r"""Per-device cost of one train step of a whole model on a mesh, against the ideal, and the step
time it projects on GPU nodes.

  python experiments/bench_scaling.py --config=experiments/configs/pr_moe.py:tiny --mesh=1,8,1
  python experiments/bench_scaling.py --config=experiments/configs/moe.py:1.3b --mesh=1,8,1 \
      --target_devices=128 --extrapolate_layers --gpu=a100

--mesh=d,e,t[,nodes] is the mesh (data, expert, tensor[, expert_nodes]) on virtual CPU devices
(this binary sets XLA_FLAGS for them before jax is imported; up to 64). The step is
moe_jax.train_lib.train_step jitted with the run's shardings, as moe_jax.trainer runs it, compiled
from abstract inputs (nothing is allocated). Per device it prints FLOPs, bytes of each collective
kind and peak memory, each against the ideal: the same step on one device, divided by the device
count (moe_jax.cost says how each number is counted, loop trip counts included).

Models larger than the machine. --target_devices=N (a multiple of the mesh's device count n)
projects onto the mesh (d, e * N / n, t): every layer's expert count and the global batch are
compiled at n / N of their size, so each device holds the same experts, tokens and capacity
buffers as on the N-device mesh (E * C = tokens per device either way); only the gate's E columns
and the O(tokens x E) routing work are smaller than on the target. --extrapolate_layers compiles
the model at 2 layers per distinct MoE expert count (and one extra variant) and scales: with
interval placement (dense, MoE) pairs repeat, so every per-device number is base + sum over the
model's pairs of that pair's cost, solved from the compiled variants (temporary memory is taken as
linear in the pairs too, which holds while activations saved for the backward pass dominate).

The projection (--gpu; per GPU, per direction; 8 GPUs per node):
  h200  989 TFLOP/s bf16 dense, 4.8 TB/s HBM3e, NVLink 4 450 GB/s, 400 Gb/s NDR InfiniBand 50 GB/s
  a100  312 TFLOP/s bf16 dense, 1.555 TB/s HBM2 (40 GB), NVLink 3 300 GB/s, 200 Gb/s HDR 25 GB/s
        (the paper's 128-GPU runs used A100 nodes with one HDR NIC per GPU)
A node is 8 consecutive devices of the mesh (row-major over moe_jax.parallel.AXES), or with
expert_nodes > 1 the devices that share a (data, expert_node) coordinate. Per device and step:
  compute   FLOPs / (peak * --flop_efficiency), times 4/3 with --recompute (activation
            checkpointing reruns the forward pass, a third of a train step's FLOPs)
  a2a       per all-to-all, max(intra-node bytes / NVLink, inter-node bytes / InfiniBand): of B
            output bytes over a group of g devices, g_in of them on the device's node,
            (g_in - 1) B / g stay on the node and (g - g_in) B / g leave it. XLA:CPU runs a bf16
            all-to-all in float32, so with a bf16 compute dtype B is halved (the exchange carries
            activations in the compute dtype on a GPU)
  others    ring traffic over the slowest link the group spans: all-reduce 2 (g-1)/g B, all-gather
            (g-1)/g B, reduce-scatter (g-1) B, collective-permute B (as compiled: float32
            gradients stay float32)
  step      compute + a2a + others (no overlap: the all-to-alls sit between the gate and the
            experts); the fully overlapped bound max(compute, communication) is printed beside it.
            With ZeRO-1 (mesh.shard_optimizer) the CPU step holds the gradient all-reduce and a
            slice where a GPU runs a reduce-scatter: for every all-gather of updated parameters the
            same bytes of all-reduce are counted at reduce-scatter's traffic (half), so gradient
            reduction + gather cost one all-reduce, as they do on GPU.
            With mesh.grad_reduce_dtype=bfloat16 the all-reduces and reduce-scatters are taken from
            the module as XLA's SPMD partitioner emits it (moe_jax.cost, partitioned=True: in
            bfloat16, where XLA:CPU's compile promotes them to float32) and the ZeRO correction is
            applied to gradient bytes at 2 per element.
  overlap   a model of what XLA's latency-hiding scheduler can hide (the flags of moe_jax.xla_flags),
            per (dense, MoE) pair of layers in model order, from the compiled per-pair FLOPs and
            bytes (--extrapolate_layers; without it the step is split evenly over the pairs).
            Backward: the rest of the model's backward first (logits), then the pairs from the last
            to the first, each a third of its compute forward and two thirds backward; a pair's
            gradient reduction (its all-reduce / reduce-scatter) is issued when its backward ends
            and runs on the link in order, behind the backward of the pairs before it; the rest's
            reduction (embedding, final LayerNorm) is issued last and is exposed. Forward (ZeRO-1's
            all-gather of updated parameters): each pair's gather must finish before its forward
            starts, the rest's first. The all-to-alls are never hidden. Exposed time = when the
            link finishes minus when the compute finishes.
HBM time (XLA:CPU's bytes accessed / HBM bandwidth) is printed but not counted: the CPU compile
fuses differently and upcasts bf16, so it overstates what a GPU moves.
"""

import dataclasses
import math
import os
import sys


MAX_DEVICES = 64


def _virtual_devices(argv) -> int:
    """The mesh's device count, read from argv before jax is imported (which fixes the CPU device
    count); main() reports a bad --mesh."""
    mesh = next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), "1,8,1")
    try:
        return min(MAX_DEVICES, max(1, math.prod(int(s) for s in mesh.split(",")[:3])))
    except ValueError:
        return 8


if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                               f"{_virtual_devices(sys.argv)}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.configs import load_config_file  # noqa: E402
from moe_jax import cli, cost, run_config  # noqa: E402
from moe_jax.config import dtype as config_dtype, parse_expert_list  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Run config file (path.py:arg).", lock_config=False)
flags.DEFINE_string("mesh", "1,8,1", "data,expert,tensor[,expert_nodes] on virtual CPU devices (at most 64).")
flags.DEFINE_enum("gpu", "h200", ["h200", "a100"], "GPU whose figures the projection uses.")
flags.DEFINE_integer("target_devices", 0, "Project onto this many GPUs (a multiple of the mesh's devices); "
                     "0: the mesh itself.")
flags.DEFINE_bool("extrapolate_layers", False, "Compile 2-layer variants and scale to the model's depth.")
flags.DEFINE_bool("ideal", True, "Also compile the single-device step (the ideal).")
flags.DEFINE_float("flop_efficiency", 1.0, "Fraction of the peak FLOP/s the step's compute reaches.")
flags.DEFINE_bool("recompute", False, "Project with activation checkpointing (one more forward pass).")
flags.DEFINE_string("residual_vs_top2", "tiny", "Scale at which to compare Residual-MoE and Top2-MoE "
                    "exchange bytes on (1,8,1); '' skips it.")
flags.mark_flags_as_required(["config"])


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    flops: float  # bf16 dense FLOP/s
    hbm: float  # bytes/s
    nvlink: float  # bytes/s per direction per GPU
    inter: float  # inter-node bytes/s per direction per GPU


GPUS = {"h200": Gpu("H200 SXM", 989e12, 4.8e12, 450e9, 50e9),
        "a100": Gpu("A100 SXM 40GB", 312e12, 1.555e12, 300e9, 25e9)}
GPUS_PER_NODE = 8
KINDS = cost.COLLECTIVE_KINDS


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The compiled mesh and the target it stands for (device ids are mesh positions, row-major)."""

    compiled: tuple  # axis sizes of the compiled mesh (moe_jax.parallel.AXES order)
    target: tuple  # the same axes on the target
    node_size: int  # devices per node on the target

    @classmethod
    def of(cls, record: cost.CostRecord, factor: int, split_nodes: bool) -> "Geometry":
        """The target scales the compiled mesh's `expert` axis by factor; a node is 8 consecutive
        devices, or with split_nodes (expert_nodes > 1) the devices after the expert_node axis."""
        names = [name for name, _ in record.mesh_axes] or ["expert"]
        compiled = tuple(size for _, size in record.mesh_axes) or (1,)
        target = tuple(size * factor if name == "expert" else size for name, size in zip(names, compiled))
        if split_nodes:
            return cls(compiled, target, math.prod(compiled[names.index("expert_node") + 1:]))
        return cls(compiled, target, min(GPUS_PER_NODE, math.prod(target)))

    def target_group(self, group) -> tuple[int, int]:
        """(g, g_in) on the target of the group of compiled device ids `group`: its size and its
        devices on the node of the group's first device."""
        coords = np.array(np.unravel_index(np.asarray(group), self.compiled)).T
        varying = [a for a in range(len(self.compiled)) if len(set(coords[:, a])) > 1]
        sizes = [self.target[a] if a in varying else 1 for a in range(len(self.compiled))]
        ids = np.ravel_multi_index(np.indices(sizes).reshape(len(sizes), -1), self.target)
        return len(ids), int(np.sum(ids // self.node_size == 0))


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What the projection assumes beyond the compiled step (module docstring)."""

    gpu: Gpu
    flop_efficiency: float  # fraction of peak FLOP/s reached
    recompute: bool  # activation checkpointing: one more forward pass, a third of the step's FLOPs
    exchange_scale: float  # GPU / CPU bytes of an all-to-all element (XLA:CPU runs bf16 ones in float32)
    gradient_scale: float = 1.0  # bytes of a reduced gradient element / of a parameter's (0.5: bf16 reduction)


def summarize(record: cost.CostRecord, factor: int, split_nodes: bool, assume: Assumptions) -> dict:
    """Scalar per-device numbers of a record (all linear in the model's layers) and its link times."""
    geometry, gpu = Geometry.of(record, factor, split_nodes), assume.gpu
    out = {"flops": record.flops, "xla_flops": record.xla_flops, "bytes_accessed": record.bytes_accessed,
           "peak_memory": record.peak_memory, "a2a_intra": 0.0, "a2a_inter": 0.0, "a2a_s": 0.0, "other_s": 0.0,
           "gather_s": 0.0}
    out.update({kind: float(record.collective_bytes(kind)) for kind in KINDS})
    for c in record.collectives:
        if c.kind == "collective-permute":
            crosses = any(a // geometry.node_size != b // geometry.node_size for a, b in c.groups)
            out["other_s"] += c.bytes / (gpu.inter if crosses else gpu.nvlink)
            continue
        g, g_in = geometry.target_group(c.groups[0]) if c.groups else (geometry.node_size, geometry.node_size)
        if c.kind == "all-to-all":
            sent = c.bytes * assume.exchange_scale
            intra, inter = sent * (g_in - 1) / g, sent * (g - g_in) / g
            out["a2a_intra"] += intra
            out["a2a_inter"] += inter
            out["a2a_s"] += max(intra / gpu.nvlink, inter / gpu.inter)
            continue
        traffic = {"all-reduce": 2 * (g - 1) / g, "all-gather": (g - 1) / g, "reduce-scatter": g - 1}[c.kind]
        seconds = traffic * c.bytes / (gpu.inter if g > g_in else gpu.nvlink)
        out["other_s"] += seconds
        if c.kind == "all-gather":
            out["gather_s"] += seconds
            # ZeRO-1 on a GPU: the gradient of each gathered parameter was reduced into shards, the
            # all-reduce + slice that XLA:CPU keeps fused into one reduce-scatter by GPU's pipeline
            # (ReduceScatterCreator): half an all-reduce's traffic for those bytes
            out["other_s"] -= seconds * assume.gradient_scale
    out["compute_s"] = record.flops * (4 / 3 if assume.recompute else 1) / (gpu.flops * assume.flop_efficiency)
    return out


def _combine(parts: list[tuple[float, dict]]) -> dict:
    return {key: sum(w * part[key] for w, part in parts) for key in parts[0][1]}


def _pairs(model_cfg) -> dict[int, int]:
    """{expert count: MoE layers with it} of an interval-2 model whose layers are (dense, MoE) pairs."""
    moe = model_cfg.moe
    if moe is None or moe.placement != "interval" or moe.expert_interval != 2 or model_cfg.num_layers % 2:
        raise ValueError("--extrapolate_layers needs moe.placement='interval', moe.expert_interval=2 and an even "
                         "model.num_layers; compile the whole model instead (drop the flag)")
    counts = model_cfg.layer_experts()[1::2]
    return {e: counts.count(e) for e in sorted(set(counts))}


def measure(config, mesh, factor: int, assume: Assumptions, extrapolate: bool) -> dict:
    """summarize() of the config's train step on `mesh` (None: one device), extrapolated in depth when asked."""
    base, pairs = measure_parts(config, mesh, factor, assume, extrapolate)
    return _combine([(1, base)] + [(1, pair) for pair in pairs])


def measure_parts(config, mesh, factor: int, assume: Assumptions, extrapolate: bool) -> tuple[dict, list[dict]]:
    """(the rest of the model, [each (dense, MoE) pair of layers in model order]) as summarize() dicts;
    without extrapolation the whole step is the rest and no pair (overlap_step splits it)."""
    def one(cfg):
        record = cost.train_step_cost(cfg, mesh, partitioned=assume.gradient_scale != 1.0)
        return summarize(record, factor, cost.parse_mesh(mesh or "1,1,1")[3] > 1, assume)

    if not extrapolate:
        return one(config), []
    model_cfg = run_config.model_config(config)
    pairs = _pairs(model_cfg)
    order = model_cfg.layer_experts()[1::2]

    def variant(experts):
        cfg = config.copy_and_resolve_references()
        cfg.model.num_layers, cfg.moe.experts = 2 * len(experts), ",".join(f"{e}x1" for e in experts)
        return one(cfg)

    counts = list(pairs)
    single = {e: variant([e]) for e in counts}  # base + pair_e
    every = variant(counts) if len(counts) > 1 else variant(counts * 2)  # base + sum of pairs (or 2 pairs)
    if len(counts) == 1:
        pair = _combine([(1, every), (-1, single[counts[0]])])
        base = _combine([(1, single[counts[0]]), (-1, pair)])
        return base, [pair] * len(order)
    base = _combine([(1, s) for s in single.values()] + [(-1, every)])
    base = _combine([(1 / (len(counts) - 1), base)])
    per_count = {e: _combine([(1, single[e]), (-1, base)]) for e in pairs}
    return base, [per_count[e] for e in order]


def overlap_step(base: dict, pairs: list[dict], num_pairs: int) -> dict:
    """The step with gradient reductions and parameter gathers hidden where the model in the module
    docstring lets them be: {"compute_s", "a2a_s", "reduce_exposed_s", "gather_exposed_s", "step_s"}."""
    if not pairs:  # one compiled step: split evenly over the model's pairs, nothing left over
        share = _combine([(1 / max(num_pairs, 1), base)])
        base, pairs = {key: 0.0 for key in base}, [share] * max(num_pairs, 1)
    reduce_s = lambda part: part["other_s"] - part["gather_s"]  # noqa: E731
    clock = base["compute_s"] * 2 / 3  # the rest's backward (the logits) first
    link = clock
    for pair in reversed(pairs):
        clock += pair["compute_s"] * 2 / 3
        link = max(link, clock) + reduce_s(pair)
    link = max(link, clock) + reduce_s(base)
    reduce_exposed = max(0.0, link - clock)
    gathered = base["gather_s"]  # the rest's parameters (embedding) first, then its forward
    clock = gathered + base["compute_s"] / 3
    for pair in pairs:
        gathered += pair["gather_s"]
        clock = max(clock, gathered) + pair["compute_s"] / 3
    forward = sum(p["compute_s"] for p in [base] + pairs) / 3
    gather_exposed = max(0.0, clock - forward)
    compute = base["compute_s"] + sum(p["compute_s"] for p in pairs)
    a2a = base["a2a_s"] + sum(p["a2a_s"] for p in pairs)
    return {"compute_s": compute, "a2a_s": a2a, "reduce_exposed_s": reduce_exposed,
            "gather_exposed_s": gather_exposed, "step_s": compute + a2a + reduce_exposed + gather_exposed}


def scale_config(config, factor: int):
    """The config at 1/factor of its experts per layer and global batch (module docstring)."""
    if factor == 1:
        return config
    cfg = config.copy_and_resolve_references()
    experts = parse_expert_list(str(cfg.moe.experts))
    counts = experts if isinstance(experts, tuple) else (experts,)
    if any(e > 1 and e % factor for e in counts) or cfg.data.batch_size % factor:
        raise ValueError(f"--target_devices scales experts {counts} and data.batch_size={cfg.data.batch_size} by "
                         f"1/{factor}; pick a target whose ratio to the mesh divides them")
    scaled = [e // factor if e > 1 else e for e in counts]
    cfg.moe.experts = ",".join(f"{e}x1" for e in scaled) if isinstance(experts, tuple) else str(scaled[0])
    cfg.data.batch_size //= factor
    return cfg


def _human(value: float, unit: str) -> str:
    if unit == "B":
        for suffix, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
            if abs(value) >= size:
                return f"{value / size:.2f} {suffix}"
        return f"{value:.0f} B"
    for suffix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}"


def table(mine: dict, ideal: dict | None, n: int) -> str:
    rows = [("FLOPs", "flops", "FLOP"), ("  (XLA, loop bodies once)", "xla_flops", "FLOP")]
    rows += [(kind, kind, "B") for kind in KINDS] + [("peak memory", "peak_memory", "B")]
    lines = [f"{'per device':28s} {'this mesh':>14s} {'ideal (1/' + str(n) + ')':>14s} {'ratio':>8s}"]
    for label, key, unit in rows:
        share = ideal[key] / n if ideal else None
        ratio = f"{mine[key] / share:.2f}x" if share else ("-" if ideal else "")
        lines.append(f"{label:28s} {_human(mine[key], unit):>14s} "
                     f"{_human(share, unit) if share is not None else '':>14s} {ratio:>8s}")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g} ms"


def projection(s: dict, assume: Assumptions, devices: int, global_batch: int, overlap: dict | None = None) -> str:
    gpu, comm = assume.gpu, s["a2a_s"] + s["other_s"]
    serial, overlapped = s["compute_s"] + comm, max(s["compute_s"], comm)
    return "\n".join([
        f"projected on {devices} x {gpu.name} ({GPUS_PER_NODE} per node; {gpu.flops / 1e12:.0f} TFLOP/s bf16 x "
        f"{assume.flop_efficiency:g}, NVLink {gpu.nvlink / 1e9:.0f} GB/s, inter-node {gpu.inter / 1e9:.0f} GB/s "
        f"per GPU{'; activation recompute' if assume.recompute else ''}):",
        f"  compute {_ms(s['compute_s'])} (HBM at {gpu.hbm / 1e12:.2f} TB/s for XLA:CPU's bytes accessed, "
        f"not counted: {_ms(s['bytes_accessed'] / gpu.hbm)})",
        f"  all-to-all {_ms(s['a2a_s'])} ({_human(s['a2a_intra'], 'B')} intra-node, "
        f"{_human(s['a2a_inter'], 'B')} inter-node sent per device, at {4 * assume.exchange_scale:g} bytes "
        "per element)",
        f"  other collectives {_ms(s['other_s'])}",
        f"  step {_ms(serial)} = {global_batch / serial:.4g} samples/s "
        f"(fully overlapped: {_ms(overlapped)} = {global_batch / overlapped:.4g} samples/s)"]
        + ([f"  with overlap (a model, module docstring): {_ms(overlap['compute_s'])} compute + "
            f"{_ms(overlap['a2a_s'])} all-to-all + {_ms(overlap['reduce_exposed_s'])} exposed gradient reduction + "
            f"{_ms(overlap['gather_exposed_s'])} exposed parameter gather = {_ms(overlap['step_s'])} = "
            f"{global_batch / overlap['step_s']:.4g} samples/s, {overlap['step_s'] / overlap['compute_s']:.2f}x "
            "the compute-only time"] if overlap else []))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        data, expert, tensor, nodes = cost.parse_mesh(f.mesh)
        n = data * expert * tensor
        if n > MAX_DEVICES:
            raise ValueError(f"--mesh={f.mesh} needs {n} virtual devices, more than {MAX_DEVICES}; use a smaller "
                             "mesh and --target_devices to project onto more GPUs")
        target = f.target_devices or n
        if target % n or (target != n and nodes > 1):
            raise ValueError(f"--target_devices={target} must be a multiple of the mesh's {n} devices "
                             "(and the mesh must have expert_nodes=1 to be scaled)")
        factor = target // n
        config = scale_config(f.config, factor)
        itemsize = config_dtype(run_config.model_config(config).compute_dtype).itemsize
        reduce_itemsize = config_dtype(config.mesh.grad_reduce_dtype).itemsize
        assume = Assumptions(GPUS[f.gpu], f.flop_efficiency, f.recompute, min(1.0, itemsize / 4), reduce_itemsize / 4)
        base, pairs = measure_parts(config, f.mesh, factor, assume, f.extrapolate_layers)
        mine = _combine([(1, base)] + [(1, pair) for pair in pairs])
        overlap = overlap_step(base, pairs, run_config.model_config(config).num_layers // 2)
        ideal = measure(config, None, factor, assume, f.extrapolate_layers) if f.ideal else None
    except ValueError as error:
        cli.fail(str(error))
    model_cfg = run_config.model_config(f.config)
    print(f"model: {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, experts "
          f"{model_cfg.layer_experts()}; batch {f.config.data.batch_size} x {f.config.data.seq_len}; "
          f"dispatch {model_cfg.moe.dispatch if model_cfg.moe else '-'}, exchange "
          f"{run_config.mesh_settings(f.config).exchange}")
    print(f"mesh (data, expert, tensor, expert_nodes) = {(data, expert, tensor, nodes)}, {n} devices"
          + (f"; standing for {target} devices (experts and batch compiled at 1/{factor})" if factor > 1 else "")
          + ("; depth extrapolated from 2-layer variants" if f.extrapolate_layers else ""))
    print(table(mine, ideal, n))
    print(projection(mine, assume, target, f.config.data.batch_size, overlap))
    if f.residual_vs_top2 and n != 8:
        print("Residual-MoE vs Top2-MoE is compared on (1,8,1): run with an 8-device --mesh to see it")
    elif f.residual_vs_top2:
        print(f"exchange bytes per device on (1,8,1), {f.residual_vs_top2} scale:")
        for name in ("residual", "top2"):
            record = cost.train_step_cost(load_config_file(name, f.residual_vs_top2), (1, 8, 1))
            print(f"  {name:8s} all-to-all {_human(record.collective_bytes('all-to-all'), 'B'):>12s}, "
                  f"FLOPs {_human(record.flops, 'FLOP')}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
