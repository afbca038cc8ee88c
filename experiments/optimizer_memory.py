r"""What sharding the optimizer state (ZeRO-1, mesh.shard_optimizer) saves per device.

  python experiments/optimizer_memory.py            # the tables below, about 3 minutes on 2 cores

Two tables, before (replicated AdamW moments) and after (moments split over the batch axes), and a
third for the gradient reduction's dtype (mesh.grad_reduce_dtype):
1. Layout arithmetic on the paper-scale meshes, exact and compile-free: per-device bytes of the
   parameters and of the two float32 moments from moe_jax.parallel's specs on an abstract mesh of
   the target size (350M+PR-MoE-32/64 on 64 devices, 1.3B+PR-MoE-64/128 on 128, 8 per node).
2. The compiled tiny PR-MoE step on 8 virtual CPU devices (moe_jax.cost): per-device argument
   bytes, peak memory and collective output bytes by kind. XLA:CPU keeps the sharded gradient as
   an all-reduce followed by a slice (GPU's pipeline fuses the pair into one reduce-scatter), so
   on CPU the gathered parameters show as added all-gather bytes on top of an unchanged all-reduce.
3. The same step's all-reduce bytes with gradients reduced in float32 and in bfloat16, counted in the
   module as XLA's SPMD partitioner emits it (cost.train_step_cost(..., partitioned=True): XLA:CPU
   promotes bf16 all-reduces to float32 afterwards, a GPU runs them in bf16). On (2,2,2) both
   columns also hold the tensor-parallel activations' all-reduces, the same bytes in each.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math

from absl import app
import jax
from jax.sharding import PartitionSpec as P

from experiments.configs import load_config_file
from moe_jax import cost, parallel, run_config
from moe_jax import model as model_lib

MiB = 1 << 20
PAPER_MESHES = [("pr_moe", "350m", (1, 64, 1, 8)), ("pr_moe", "1.3b", (1, 128, 1, 16)),
                ("moe", "1.3b", (1, 128, 1, 16))]
TINY_MESHES = [(1, 8, 1), (2, 2, 2)]


def _per_device(shapes, specs, mesh) -> int:
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    total = 0
    for leaf, spec in zip(jax.tree.leaves(shapes), leaves):
        axes = [a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))]
        total += leaf.size * 4 // math.prod(mesh.shape[a] for a in axes)
    return total


def layout_row(name: str, scale: str, mesh_sizes) -> dict:
    config = load_config_file(name, scale)
    model_cfg = run_config.model_config(config)
    data, expert, tensor, nodes = mesh_sizes
    group = parallel.smallest_expert_group(model_cfg.layer_experts(), expert, nodes)
    mesh = parallel.abstract_mesh(data, expert, tensor, nodes, expert_group=group)
    params = jax.eval_shape(lambda: model_lib.init_params(jax.random.key(0), model_cfg))
    out = {"model": f"{scale} {name}", "devices": data * expert * tensor,
           "mesh": mesh_sizes}
    for zero in (False, True):
        par = parallel.ParallelConfig(mesh, shard_optimizer=zero)
        out["params"] = _per_device(params, parallel.param_specs(params, par), mesh)
        out["moments_sharded" if zero else "moments"] = 2 * _per_device(params, parallel.optimizer_specs(params, par),
                                                                          mesh)
    return out


def compiled_row(mesh_sizes) -> dict:
    out = {"mesh": mesh_sizes}
    for zero in (False, True):
        config = load_config_file("pr_moe", "tiny")
        config.mesh.shard_optimizer = zero
        record = cost.train_step_cost(config, mesh_sizes)
        out["sharded" if zero else "replicated"] = record
    return out


def main(argv):
    del argv
    lines = ["Layout arithmetic (float32 parameters and AdamW moments per device; mesh data,expert,tensor,nodes):",
             "", "| model | devices | parameters | moments replicated | moments sharded | saved |",
             "|---|---|---|---|---|---|"]
    for name, scale, mesh_sizes in PAPER_MESHES:
        r = layout_row(name, scale, mesh_sizes)
        lines.append(f"| {name}:{scale} | {r['devices']} {mesh_sizes} | {r['params'] / MiB:,.0f} MiB | "
                     f"{r['moments'] / MiB:,.0f} MiB | {r['moments_sharded'] / MiB:,.0f} MiB | "
                     f"{(r['moments'] - r['moments_sharded']) / MiB:,.0f} MiB |")
    lines += ["", "Compiled tiny PR-MoE step (8 virtual CPU devices; per device):", "",
              "| mesh | optimizer | arguments | peak memory | all-reduce | all-gather | all-to-all | reduce-scatter |",
              "|---|---|---|---|---|---|---|---|"]
    for mesh_sizes in TINY_MESHES:
        r = compiled_row(mesh_sizes)
        for label in ("replicated", "sharded"):
            rec = r[label]
            b = rec.collective_bytes()
            lines.append(f"| {mesh_sizes} | {label} | {rec.argument_bytes / MiB:.2f} MiB | "
                         f"{rec.peak_memory / MiB:.2f} MiB "
                         f"| {b['all-reduce'] / MiB:.2f} MiB | {b['all-gather'] / MiB:.2f} MiB | "
                         f"{b['all-to-all'] / MiB:.2f} MiB | {b['reduce-scatter'] / MiB:.2f} MiB |")
    lines += ["", "Gradient reduction dtype, tiny PR-MoE step (all-reduce bytes per device, partitioned module):", "",
              "| mesh | optimizer | float32 | bfloat16 | ratio |", "|---|---|---|---|---|"]
    for mesh_sizes in TINY_MESHES + [(8, 1, 1)]:
        for zero in (False, True):
            reduced = {}
            for dtype in ("float32", "bfloat16"):
                config = load_config_file("pr_moe", "tiny")
                config.mesh.shard_optimizer, config.mesh.grad_reduce_dtype = zero, dtype
                reduced[dtype] = cost.train_step_cost(config, mesh_sizes, partitioned=True).collective_bytes(
                    "all-reduce")
            lines.append(f"| {mesh_sizes} | {'sharded' if zero else 'replicated'} | {reduced['float32']:,} B | "
                         f"{reduced['bfloat16']:,} B | {reduced['bfloat16'] / reduced['float32']:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
