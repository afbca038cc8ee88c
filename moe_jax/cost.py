"""Per-device cost of a compiled step: FLOPs, collective bytes and peak memory, against the ideal.

`compiled_cost(fn, *args)` compiles `jax.jit(fn).lower(*args).compile()` (args may be arrays or
jax.ShapeDtypeStruct with shardings: nothing is allocated) and returns a `CostRecord` of what one
device does. Under SPMD partitioning the compiled module is the program of one device, so every
number below is per device. `train_step_cost(config, mesh_shape)` does this for a whole model's
train step, built from a run config the way moe_jax.trainer builds it.

FLOPs and collectives: walked from the compiled HLO text (moe_jax.hlo says how loops, conditionals
and collectives are counted); flops = cost_analysis flops + (walked dot FLOPs with trip counts -
walked dot FLOPs with every trip count 1).

Memory. peak_memory = argument + output + temporary bytes - aliased (donated) bytes, from
`compiled.memory_analysis()`: the buffers one device holds at the step's high-water mark.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import numpy as np
from absl import logging

from moe_jax import parallel as parallel_lib
from moe_jax import run_config, train_lib
from moe_jax.hlo import COLLECTIVE_KINDS, Collective, compile_partitioned, walk_hlo

REDUCTIONS = ("all-reduce", "reduce-scatter")
# LLVM optimisation off: the same optimised HLO, cost and memory analyses; about half the compile time.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class CostRecord:
    """What one device does in one call of a compiled function (the module docstring says how)."""

    num_devices: int
    mesh_axes: tuple[tuple[str, int], ...]  # (axis name, size) of the inputs' mesh, row-major; () on one device
    flops: float  # cost_analysis flops with loop bodies' dots multiplied by their trip counts
    xla_flops: float  # compiled.cost_analysis()["flops"] as XLA reports it (loop bodies once)
    dot_flops: float  # dots and convolutions only, trip counts included
    bytes_accessed: float  # cost_analysis "bytes accessed" (loop bodies once)
    collectives: tuple[Collective, ...]
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    dynamic_loops: int  # while loops counted with an estimated trip count
    custom_calls: tuple[str, ...]  # custom-call targets (their FLOPs are not counted)

    @property
    def peak_memory(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def collective_bytes(self, kind: Optional[str] = None):
        """Output bytes per device of one collective kind, or {kind: bytes} of all kinds."""
        if kind not in COLLECTIVE_KINDS + (None,):
            raise ValueError(f"collective kind {kind!r} is unknown; use one of {COLLECTIVE_KINDS}")
        by_kind = {k: sum(c.bytes for c in self.collectives if c.kind == k) for k in COLLECTIVE_KINDS}
        return by_kind if kind is None else by_kind[kind]

    def against(self, ideal: "CostRecord") -> dict[str, float]:
        """{flops, peak_memory, bytes_accessed}: this record over the ideal's cost * ideal.num_devices /
        num_devices (the ideal is usually the same step on one device)."""
        share = ideal.num_devices / self.num_devices
        return {key: getattr(self, key) / max(getattr(ideal, key) * share, 1e-30)
                for key in ("flops", "peak_memory", "bytes_accessed")}


def record_of(compiled, dynamic_trip_count: Optional[int] = None, reductions_from: Optional[str] = None
              ) -> CostRecord:
    """The CostRecord of an already compiled function (jax.stages.Compiled). reductions_from: an HLO
    text to take the all-reduces and reduce-scatters from instead (the partitioned module, `_compile`)."""
    walk = walk_hlo(compiled.as_text(), dynamic_trip_count)
    if reductions_from is not None:
        reductions = [c for c in walk_hlo(reductions_from, dynamic_trip_count).collectives if c.kind in REDUCTIONS]
        walk.collectives = [c for c in walk.collectives if c.kind not in REDUCTIONS] + reductions
    analysis = compiled.cost_analysis() or {}
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis  # a list in older jax
    memory = compiled.memory_analysis()
    shardings = jax.tree.leaves(compiled.input_shardings)
    num_devices = max((len(s.device_set) for s in shardings), default=1)
    mesh = next((s.mesh for s in shardings if getattr(s, "mesh", None) is not None and s.mesh.size == num_devices
                 and num_devices > 1), None)
    xla_flops = float(analysis.get("flops", 0.0))
    return CostRecord(
        num_devices=num_devices, mesh_axes=tuple(mesh.shape.items()) if mesh is not None else (),
        flops=xla_flops + walk.dot_flops - walk.dot_flops_once, xla_flops=xla_flops,
        dot_flops=walk.dot_flops, bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
        collectives=tuple(walk.collectives), argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), dynamic_loops=walk.dynamic_loops,
        custom_calls=tuple(walk.custom_calls))


def _compile(lowered, dynamic_trip_count: Optional[int], partitioned: bool) -> CostRecord:
    if not partitioned:
        return record_of(lowered.compile(COMPILER_OPTIONS), dynamic_trip_count)
    compiled, text = compile_partitioned(lowered, COMPILER_OPTIONS)
    return record_of(compiled, dynamic_trip_count, reductions_from=text)


def compiled_cost(fn, *args, dynamic_trip_count: Optional[int] = None, partitioned: bool = False,
                  **kwargs) -> CostRecord:
    """Compiles fn (jitted, or jitted here) for args (arrays or jax.ShapeDtypeStruct, with
    shardings where the step is sharded) and returns its per-device CostRecord. partitioned: the
    all-reduces and reduce-scatters (the gradient reductions) as XLA's SPMD partitioner emits them,
    in the dtypes the program reduces in (moe_jax.hlo.compile_partitioned: XLA:CPU promotes bfloat16
    ones to float32 afterwards, a GPU keeps them); everything else as compiled."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return _compile(jitted.lower(*args, **kwargs), dynamic_trip_count, partitioned)


# ----------------------------------------------------------------------------------------------
# A whole model's train step
# ----------------------------------------------------------------------------------------------

class MeshShape(NamedTuple):
    """A mesh's sizes by name (the run config's mesh group): data x expert x tensor devices, the
    expert axis spread over expert_nodes nodes."""

    data: int
    expert: int
    tensor: int
    expert_nodes: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.expert * self.tensor


def parse_mesh(spec: str | Sequence[int]) -> MeshShape:
    """'d,e,t[,nodes]' (or a sequence) -> MeshShape(data, expert, tensor, expert_nodes)."""
    sizes = [str(s).strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(sizes) not in (3, 4) or not all(s.isdigit() and int(s) >= 1 for s in sizes):
        raise ValueError(f"mesh {spec!r} must be 3 or 4 positive integers 'data,expert,tensor[,expert_nodes]', "
                         "e.g. '1,8,1'")
    return MeshShape(*(int(s) for s in sizes))


def train_step_cost(config, mesh_shape: Optional[str | Sequence[int]] = None, *,
                    dynamic_trip_count: Optional[int] = None, partitioned: bool = False) -> CostRecord:
    """Per-device cost of one train step of the run config's model, from abstract inputs (nothing
    is allocated). mesh_shape: (data, expert, tensor[, expert_nodes]) or 'd,e,t[,nodes]', replacing
    config.mesh's sizes; None or one device: the single-device step (no mesh, no shard_map). A mesh
    of all jax's devices is built by run_config.parallel_config, as the trainer builds it (a smaller
    one by parallel.make_mesh on the first devices). Jitted as the trainer jits it: state donated
    and sharded by parallel.state_specs, the batch sharded over the batch axes."""
    model_cfg, optim_cfg = run_config.model_config(config), run_config.optim_config(config)
    optimizer = train_lib.make_optimizer(optim_cfg)
    step_fn = functools.partial(train_lib.train_step, model_cfg=model_cfg, optimizer=optimizer,
                                schedule=train_lib.learning_rate_schedule(optim_cfg))
    key = jax.eval_shape(lambda: jax.random.key(0))
    state = train_lib.abstract_state(key, model_cfg, optimizer)
    tokens = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), np.int32)
    batch = {"inputs": tokens, "targets": tokens}
    data, expert, tensor, nodes = parse_mesh(mesh_shape if mesh_shape is not None else (1, 1, 1))
    num_devices, out_shardings = data * expert * tensor, None
    if num_devices > jax.device_count():
        raise ValueError(f"mesh {(data, expert, tensor, nodes)} needs {num_devices} devices, jax has "
                         f"{jax.device_count()}; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{num_devices} before importing jax")
    if num_devices > 1:
        run = config.copy_and_resolve_references()
        run.mesh.update(data=data, expert=expert, tensor=tensor, expert_nodes=nodes)
        if num_devices == jax.device_count():  # the trainer's own mesh
            par = run_config.parallel_config(run)
        else:
            logging.warning("mesh %s on %d of %d devices: built by parallel.make_mesh, not the run config",
                            (data, expert, tensor, nodes), num_devices, jax.device_count())
            mesh = parallel_lib.make_mesh(data, expert, tensor, nodes, devices=jax.devices()[:num_devices])
            m = run_config.mesh_settings(run)
            par = parallel_lib.ParallelConfig(mesh, m.exchange, m.expert_slicing, m.row_exchange, m.shard_optimizer,
                                              m.grad_reduce_dtype)
        parallel_lib.validate(model_cfg, par, config.data.batch_size)
        step_fn = functools.partial(step_fn, parallel=par)
        out_shardings = parallel_lib.shardings(parallel_lib.state_specs(state, par, optimizer), par.mesh)
        shardings = (out_shardings, {name: parallel_lib.batch_sharding(par) for name in batch},
                     jax.sharding.NamedSharding(par.mesh, jax.sharding.PartitionSpec()))
        state, batch, key = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                         (state, batch, key), shardings)
        out_shardings = (out_shardings, None)
    step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=out_shardings)
    return _compile(step.lower(state, batch, key), dynamic_trip_count, partitioned)
