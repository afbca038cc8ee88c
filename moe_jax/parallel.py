"""Expert, tensor and data parallelism: the mesh, partition rules and the MoE exchange under shard_map.

Mesh axes (always these five; unused ones have size 1):
  data            pure data parallelism
  expert_node     the inter-node part of the expert-parallel group (hierarchical exchange)
  expert_replica  the intra-node part of the group above the smallest expert group (below)
  expert          the innermost part of the expert-parallel group
  tensor          Megatron tensor parallelism (and expert slicing)
The expert-parallel group is ("expert_node", "expert_replica", "expert"), of size ep = mesh.expert
(config), split into `expert_nodes` groups of ep / expert_nodes devices. The batch is sharded over
(data, expert_node, expert_replica, expert): for the dense part of the model the expert axes are
just more data parallelism.

Parameters (partition rules by name, `param_specs`):
  attention qkv [M, 3M] column-parallel (None, tensor); out [M, M] row-parallel (tensor, None)
  dense MLP w1 [M, F] (None, tensor), w2 [F, M] (tensor, None); residual MLP and shared experts likewise
  experts w1 [E, M, F] (EP, None, tensor if expert_slicing), w2 [E, F, M] (EP, tensor if slicing, None)
  everything else (embeddings, LayerNorm, gates, coefficients) replicated.
The dense part runs under GSPMD (jit with these shardings); each MoE layer under `jax.shard_map`
(moe_jax.exchange). Gradients are reduced in `grad_reduce_dtype` (moe_jax.grad_precision).

Exchanges (`exchange`), the topology of the all_to_all and what tensor ranks do:
  "auto"          (default) "coordinated" when tensor > 1 without expert slicing, else "flat"
  "flat"          one all_to_all over the whole expert group (O(ep) messages per device); tensor
                  ranks repeat the same expert work (DeepSpeed without tensor coordination)
  "coordinated"   flat, and the tensor ranks, which hold the same tokens, share out the expert
                  work and all-gather the results (DeepSpeed's tensor-coordinated exchange)
  "hierarchical"  intra-node all_to_all over `expert`, then inter-node over `expert_node`
                  (O(G + ep/G) hops), same result; tensor ranks share the work as "coordinated"
  "node_dedup"    each token crosses to a node once, then fans out within it (moe_jax.node_exchange)
Expert slicing (`expert_slicing=True`) splits each expert's FFN dimension over `tensor` instead.

Layers with fewer experts than the expert group (Pyramid-MoE) follow DeepSpeed's rule: such a
layer's expert-parallel group is min(ep, E_layer) devices and the rest is expert-data parallelism.
Its experts are split over the innermost expert axes whose sizes multiply to its group
(`ParallelConfig.layer_axes`) and replicated over the others; tokens are exchanged within the group
only. `make_mesh(..., expert_group=g)` sizes the innermost `expert` axis to g (run configs take g
from the model's smallest MoE layer, `smallest_expert_group`); a layer whose group cannot be formed
from the axes keeps all its experts on every device (logged). A layer with at least ep experts must
have a multiple of ep.

Optimizer state (`shard_optimizer`, ZeRO stage 1): every parameter's AdamW moments are split further
over the batch axes its gradient is reduced over (`optimizer_specs`): all of (data, expert axes) for
a replicated parameter, `data` and the expert axes outside its layer's group for an expert matrix.
The train step constrains the gradients to that layout (XLA reduces them into shards: an all-reduce
and a slice on CPU, one reduce-scatter on GPU, whose pipeline fuses the two), updates its shard of
the moments and the parameters, and all-gathers the updated parameters: the bytes of one all-reduce,
and the optimizer memory per device divided by the data-parallel degree. The arithmetic of the
update is elementwise, so only the gradient norm's summation order differs from the replicated
optimizer (float32 rounding).

Load-balancing loss: the per-expert gate and token fractions are averaged over the whole batch (all
shards) before their product is taken, so the loss equals the single-device loss exactly (DeepSpeed
averages per-shard losses). Capacity, dropping and random token selection stay per shard, as in DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from absl import logging
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import grad_precision
from moe_jax.pytree import path_name

AXES = ("data", "expert_node", "expert_replica", "expert", "tensor")
EXPERT_AXES = ("expert_node", "expert_replica", "expert")
INTRA_NODE_AXES = ("expert_replica", "expert")  # the first stage of the hierarchical exchange
BATCH_AXES = ("data",) + EXPERT_AXES
EXCHANGES = ("auto", "flat", "hierarchical", "coordinated", "node_dedup")
# How the rows exchange (dispatch paths "dropless", "serve") moves token copies: "bounded" sends
# every device a fixed number of rows with all_to_all (XLA:CPU has no ragged collective); "ragged"
# sends only the rows that exist with ragged_all_to_all (GPU); "auto": ragged on GPU meshes.
ROW_EXCHANGES = ("auto", "bounded", "ragged")


def mesh_platform(mesh) -> str:
    """"gpu", "cpu", ... of a mesh's devices (an AbstractMesh: its abstract device's platform)."""
    device = getattr(mesh, "abstract_device", None)
    if device is not None:
        return device.platform
    devices = getattr(mesh, "devices", None)
    if devices is not None and getattr(devices, "size", 0):
        return devices.flat[0].platform
    return jax.default_backend()


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the model is spread over a mesh. Hashable: it is part of the jitted step's closure."""

    mesh: jax.sharding.Mesh  # or a jax.sharding.AbstractMesh, to lower a step for another platform
    exchange: str = "auto"
    expert_slicing: bool = False
    row_exchange: str = "auto"  # ROW_EXCHANGES
    shard_optimizer: bool = False  # ZeRO-1: optimizer state split over the batch axes (module docstring)
    grad_reduce_dtype: str = "float32"  # the dtype gradients are reduced in (moe_jax.grad_precision)

    def __post_init__(self):
        if tuple(self.mesh.axis_names) != AXES:
            raise ValueError(f"mesh axes {self.mesh.axis_names} must be {AXES}; build it with parallel.make_mesh")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"mesh.exchange={self.exchange!r} is unknown; use one of {EXCHANGES}")
        if self.exchange == "coordinated" and self.expert_slicing:
            raise ValueError("mesh.exchange='coordinated' splits tokens over tensor ranks and "
                             "mesh.expert_slicing=True splits experts over them; choose one")
        if self.exchange in ("hierarchical", "node_dedup"):
            _check_expert_axis_within_hosts(self.mesh, self.exchange)
        if self.row_exchange not in ROW_EXCHANGES:
            raise ValueError(f"mesh.row_exchange={self.row_exchange!r} is unknown; use one of {ROW_EXCHANGES}")
        grad_precision.check_dtype(self.grad_reduce_dtype)

    @property
    def resolved_row_exchange(self) -> str:
        """"ragged" or "bounded": "auto" is "ragged" on GPU meshes (XLA:CPU cannot run it)."""
        if self.row_exchange != "auto":
            return self.row_exchange
        return "ragged" if mesh_platform(self.mesh) == "gpu" else "bounded"

    @property
    def resolved_exchange(self) -> str:
        """The exchange in force: "auto" is "coordinated" with tensor ranks to share the work
        (tensor > 1, no expert slicing), else "flat"."""
        if self.exchange != "auto":
            return self.exchange
        return "coordinated" if self.tensor_size > 1 and not self.expert_slicing else "flat"

    @property
    def expert_size(self) -> int:
        return math.prod(self.mesh.shape[a] for a in EXPERT_AXES)

    @property
    def tensor_size(self) -> int:
        return self.mesh.shape["tensor"]

    @property
    def batch_size_divisor(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def layer_axes(self, num_experts: int) -> tuple[str, ...]:
        """The mesh axes a layer of num_experts experts is split over: the whole expert group when
        num_experts >= ep, else the largest innermost part of it (expert, then expert_replica x
        expert) whose size divides num_experts (DeepSpeed's group of min(ep, E) devices when the mesh
        has it); () when its experts stay whole on every device."""
        if self.expert_size == 1 or num_experts < 1:
            return ()
        if num_experts >= self.expert_size:
            return EXPERT_AXES
        for axes in (INTRA_NODE_AXES, ("expert",)):
            size = math.prod(self.mesh.shape[a] for a in axes)
            if 1 < size <= num_experts and num_experts % size == 0:
                return axes
        return ()

    def group_size(self, num_experts: int) -> int:
        """Devices a layer's experts are split over (1: not split)."""
        return math.prod(self.mesh.shape[a] for a in self.layer_axes(num_experts))

    def experts_sharded(self, num_experts: int) -> bool:
        """Whether a layer's experts are split over (part of) the expert group (else replicated)."""
        return bool(self.layer_axes(num_experts))


def _check_expert_axis_within_hosts(mesh: jax.sharding.Mesh, exchange: str) -> None:
    """The hierarchical exchange's first stage runs over (expert_replica, expert) as the intra-node
    stage: every group of devices along those axes must live in one process (host)."""
    intra = [AXES.index(a) for a in INTRA_NODE_AXES]
    devices = np.asarray(mesh.devices)
    devices = np.moveaxis(devices, intra, list(range(devices.ndim - len(intra), devices.ndim)))
    for group in devices.reshape(-1, math.prod(devices.shape[-len(intra):])):
        hosts = sorted({device.process_index for device in group})
        if len(hosts) > 1:
            raise ValueError(
                f"mesh.exchange={exchange!r} runs its intra-node stage within each node's expert devices, but "
                f"the mesh {dict(mesh.shape)} puts devices of processes {hosts} in one node's group; set "
                "mesh.expert_nodes so that mesh.expert / expert_nodes devices sit in each host, or use "
                "mesh.exchange='flat'")


def smallest_expert_group(layer_experts, expert: int, expert_nodes: int = 1) -> int:
    """The size of the innermost `expert` mesh axis for a model (DeepSpeed's rule): the smallest
    group min(ep, E_layer) among its MoE layers, when it divides the devices of one node
    (ep / expert_nodes) and every smaller layer's expert count; else one node's devices."""
    per_node = max(1, expert // max(1, expert_nodes))
    small = sorted({e for e in layer_experts if 0 < e < expert})
    if not small:
        return per_node
    group = small[0]
    if per_node % group == 0 and all(e % group == 0 for e in small):
        return group
    logging.warning("expert counts %s below the expert group %d cannot share one smaller group that divides "
                    "%d devices per node; those layers keep their experts on every device", small, expert, per_node)
    return per_node


def make_mesh(data: int = -1, expert: int = 1, tensor: int = 1, expert_nodes: int = 1,
              devices: Optional[list] = None, expert_group: Optional[int] = None) -> jax.sharding.Mesh:
    """A mesh over AXES; one of data, expert, tensor may be -1 (fills). `expert` is the whole
    expert-parallel size; `expert_nodes` of its groups are inter-node; `expert_group` (default: one
    node's expert devices) is the size of the innermost `expert` axis, the smallest group a Pyramid
    layer can be split over (`smallest_expert_group`)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, expert, tensor, expert_nodes, len(devices), expert_group)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


def abstract_mesh(data: int, expert: int = 1, tensor: int = 1, expert_nodes: int = 1,
                  expert_group: Optional[int] = None, device_kind: str = "NVIDIA H200",
                  platform: str = "gpu") -> jax.sharding.AbstractMesh:
    """The mesh make_mesh builds on data * expert * tensor devices of `platform`, without devices:
    a step sharded over it lowers for that platform on any machine (lowering_platforms=("cuda",))."""
    shape = mesh_shape(data, expert, tensor, expert_nodes, data * expert * tensor, expert_group)
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=132, platform=platform)
    return jax.sharding.AbstractMesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                                     abstract_device=device)


def mesh_shape(data: int, expert: int, tensor: int, expert_nodes: int, num_devices: int,
               expert_group: Optional[int] = None) -> tuple[int, ...]:
    """The sizes of AXES for make_mesh's arguments on num_devices devices (errors name the bad size)."""
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"only one mesh size may be -1 (got {unknown}); give the others explicitly")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size} must be a positive size or -1")
    if unknown:
        known = math.prod(size for size in sizes.values() if size != -1)
        if num_devices % known:
            raise ValueError(f"mesh sizes {sizes} cannot fill {num_devices} devices; "
                             f"make the product of the given sizes divide {num_devices}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh data x expert x tensor = {sizes['data']} x {sizes['expert']} x {sizes['tensor']} "
                         f"= {math.prod(sizes.values())} != {num_devices} devices; make the product equal "
                         "the device count or set one size to -1")
    if expert_nodes < 1 or sizes["expert"] % expert_nodes:
        raise ValueError(f"mesh.expert_nodes={expert_nodes} must divide mesh.expert={sizes['expert']}")
    per_node = sizes["expert"] // expert_nodes
    group = per_node if expert_group is None else expert_group
    if group < 1 or per_node % group:
        raise ValueError(f"expert_group={expert_group} must divide the {per_node} expert devices of a node "
                         f"(mesh.expert={sizes['expert']} / mesh.expert_nodes={expert_nodes})")
    shape = (sizes["data"], expert_nodes, per_node // group, group, sizes["tensor"])
    return shape


# ----------------------------------------------------------------------------------------------
# Partition rules
# ----------------------------------------------------------------------------------------------

def _rules(slicing: bool):
    ep = EXPERT_AXES  # param_specs narrows it to a layer's own axes (ParallelConfig.layer_axes)
    t_expert = "tensor" if slicing else None
    return [
        (r"(^|/)wte$", P("tensor", None)),  # vocab-parallel embedding and logits
        (r"attn/qkv_kernel$", P(None, "tensor")),
        (r"attn/qkv_bias$", P("tensor")),
        (r"attn/out_kernel$", P("tensor", None)),
        (r"mlp/w1$", P(None, "tensor")),
        (r"mlp/b1$", P("tensor")),
        (r"mlp/w2$", P("tensor", None)),
        (r"shared/w1$", P(None, "tensor")),  # shared experts: a dense MLP
        (r"shared/b1$", P("tensor")),
        (r"shared/w2$", P("tensor", None)),
        (r"experts/w1$", P(ep, None, t_expert)),
        (r"experts/b1$", P(ep, t_expert)),
        (r"experts/w2$", P(ep, t_expert, None)),
        (r"experts/b2$", P(ep, None)),
    ]


def param_specs(params, par: ParallelConfig):
    """PartitionSpec of every parameter (params may be abstract)."""
    rules = _rules(par.expert_slicing)

    def spec(path, leaf):
        name = path_name(path)
        for pattern, rule in rules:
            if re.search(pattern, name):
                if name.split("/")[-2:-1] == ["experts"]:  # the layer's own expert axes, or none
                    rule = P(par.layer_axes(leaf.shape[0]) or None, *rule[1:])
                return _fit(rule, leaf.shape, par.mesh, name)
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


_REPLICATED_LOGGED: set = set()


def _fit(spec: P, shape, mesh, name: str) -> P:
    """Drops a sharding where the dimension does not divide (e.g. a tensor axis larger than a
    tiny model's bias), with a warning once per parameter; expert dimensions are validated
    separately with a clear error (`validate`)."""
    out = []
    for dim_index, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = math.prod(mesh.shape[a] for a in names)
        fits = size == 1 or dim % size == 0
        if not fits and (name, dim_index) not in _REPLICATED_LOGGED:
            _REPLICATED_LOGGED.add((name, dim_index))
            logging.warning("parameter %s: dimension %d (size %d) does not divide over mesh axes %s (size %d); "
                            "it is replicated there instead of split", name, dim_index, dim, names, size)
        out.append(axes if fits else None)
    return P(*out)


def _axes_of(spec: P) -> set:
    return {a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))}


def _zero_spec(spec: P, shape, mesh) -> P:
    """`spec` with the batch axes it is replicated over (size > 1) added to one dimension that
    divides: the first unsplit one, else the first split one (the new axes after its own). All of
    them when a dimension takes them, else `data` alone, else the spec unchanged."""
    spare = tuple(a for a in BATCH_AXES if a not in _axes_of(spec) and mesh.shape[a] > 1)
    entries = list(tuple(spec) + (None,) * (len(shape) - len(spec)))
    for axes in (spare, tuple(a for a in spare if a == "data")):
        if not axes:
            continue
        size = math.prod(mesh.shape[a] for a in axes)
        order = [i for i, e in enumerate(entries) if e is None] + [i for i, e in enumerate(entries) if e is not None]
        for i in order:
            own = () if entries[i] is None else entries[i] if isinstance(entries[i], tuple) else (entries[i],)
            if shape[i] % (size * math.prod(mesh.shape[a] for a in own)) == 0:
                entries[i] = own + axes if own else (axes if len(axes) > 1 else axes[0])
                return P(*entries)
    return P(*entries)


def optimizer_specs(params, par: ParallelConfig):
    """The layout of each parameter's optimizer moments under ZeRO-1 (module docstring): its
    param_specs spec, split further over the batch axes it is replicated over. Where
    par.shard_optimizer is off: param_specs."""
    specs = param_specs(params, par)
    if not par.shard_optimizer:
        return specs
    return jax.tree.map(lambda spec, leaf: _zero_spec(spec, leaf.shape, par.mesh), specs, params,
                        is_leaf=lambda x: isinstance(x, P))


def state_specs(state, par: ParallelConfig, optimizer):
    """PartitionSpecs of a train state {"params", "opt_state", "step"[, "router_state"]} (state may be
    abstract): parameters by param_specs, the optimizer's per-parameter leaves (AdamW's moments) by
    optimizer_specs, everything else (counts, the step, selection biases) replicated."""
    moment_specs = optimizer_specs(state["params"], par)
    opt = optax.tree_map_params(optimizer, lambda leaf, spec: spec, state["opt_state"], moment_specs,
                                transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    out = {name: jax.tree.map(lambda _: P(), value) for name, value in state.items()}
    return {**out, "params": param_specs(state["params"], par), "opt_state": opt}


def shardings(tree_specs, mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs, is_leaf=lambda x: isinstance(x, P))


def validate(model_cfg, par: ParallelConfig, batch_size: int) -> None:
    """Clear errors for layouts that cannot work."""
    ep = par.expert_size
    for layer, num_experts in enumerate(model_cfg.layer_experts()):
        if num_experts >= ep > 1 and num_experts % ep:
            raise ValueError(
                f"layer {layer} has num_experts={num_experts}, not divisible by the expert mesh axis ({ep}); "
                f"use a multiple of {ep} experts or set mesh.expert to a divisor of {num_experts}")
        if 0 < num_experts < ep and not par.experts_sharded(num_experts):
            logging.warning("layer %d keeps all its %d experts on every device: no part of the expert group %s "
                            "has a size that divides it (see parallel.smallest_expert_group)", layer, num_experts,
                            {a: par.mesh.shape[a] for a in EXPERT_AXES})
        if num_experts and par.expert_slicing and model_cfg.expert_ffn_size % par.tensor_size:
            raise ValueError(f"expert FFN size {model_cfg.expert_ffn_size} is not divisible by mesh.tensor="
                             f"{par.tensor_size}; expert slicing splits it over tensor ranks")
    if batch_size % par.batch_size_divisor:
        raise ValueError(
            f"data.batch_size={batch_size} is not divisible by the data-parallel size "
            f"{par.batch_size_divisor} (mesh.data x mesh.expert); use a multiple of {par.batch_size_divisor}")
    if model_cfg.hidden_size % par.tensor_size or model_cfg.num_heads % par.tensor_size:
        raise ValueError(f"mesh.tensor={par.tensor_size} must divide model.hidden_size={model_cfg.hidden_size} "
                         f"and model.num_heads={model_cfg.num_heads}")


def batch_sharding(par: ParallelConfig) -> NamedSharding:
    return NamedSharding(par.mesh, P(BATCH_AXES))


def device_put_batch(batch: dict, par: ParallelConfig) -> dict:
    """Places a host batch (this process's rows) as a global array sharded over the batch axes."""
    sharding = batch_sharding(par)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
