"""Expert, tensor and data parallelism: the mesh, partition rules and the MoE exchange under shard_map.

Mesh axes (always these four; unused ones have size 1):
  data         pure data parallelism
  expert_node  the inter-node part of the expert-parallel group (hierarchical exchange)
  expert       the intra-node part of the expert-parallel group
  tensor       Megatron tensor parallelism (and expert slicing)
The expert-parallel group is ("expert_node", "expert"), of size ep = mesh.expert (config), split into
`expert_nodes` groups of ep / expert_nodes devices. The batch is sharded over (data, expert_node,
expert): for the dense part of the model the expert axes are just more data parallelism.

Parameters (partition rules by name, `param_specs`):
  attention qkv [M, 3M] column-parallel (None, tensor); out [M, M] row-parallel (tensor, None)
  dense MLP w1 [M, F] (None, tensor), w2 [F, M] (tensor, None); residual MLP likewise
  experts w1 [E, M, F] (EP, None, tensor if expert_slicing), w2 [E, F, M] (EP, tensor if slicing, None)
  everything else (embeddings, LayerNorm, gates, coefficients) replicated.
The dense part runs under GSPMD (jit with these shardings); the MoE exchange runs under
`jax.shard_map`:

  route locally -> pack the local [E, C, M] buffer (C: capacity of this shard's tokens, as in
  DeepSpeed) -> all_to_all over the expert group -> the local experts see [E/ep, ep*C, M] ->
  all_to_all back -> combine.

Exchanges (`exchange`):
  "flat"          one all_to_all over the whole expert group (O(ep) messages per device)
  "hierarchical"  intra-node all_to_all over `expert`, then inter-node over `expert_node`
                  (O(G + ep/G) hops), same result
  "coordinated"   tensor ranks hold the same tokens, so each sends only its 1/tp share of the
                  capacity slots, then the results are all-gathered over `tensor` (DeepSpeed's
                  tensor-coordinated exchange; C is padded to a multiple of tp with empty slots)
Expert slicing (`expert_slicing=True`) instead splits each expert's FFN dimension over `tensor`;
partial outputs are summed over `tensor`.

Rule for layers with fewer experts than the expert group (Pyramid-MoE): such a layer keeps all of
its experts on every device (replicated) and runs them on the device's own tokens, with no
exchange. A layer with at least ep experts must have a multiple of ep.

Load-balancing loss: the per-expert gate and token fractions are averaged over the whole batch
(all shards) before their product is taken, so the loss equals the single-device loss exactly.
(DeepSpeed averages per-shard losses instead.) Capacity, dropping and random token selection stay
per shard, as in DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import dispatch as dispatch_lib
from moe_jax import gating as gating_lib
from moe_jax.gating import Routing

AXES = ("data", "expert_node", "expert", "tensor")
EXPERT_AXES = ("expert_node", "expert")
BATCH_AXES = ("data", "expert_node", "expert")
EXCHANGES = ("flat", "hierarchical", "coordinated")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the model is spread over a mesh. Hashable: it is part of the jitted step's closure."""

    mesh: jax.sharding.Mesh
    exchange: str = "flat"
    expert_slicing: bool = False

    def __post_init__(self):
        if tuple(self.mesh.axis_names) != AXES:
            raise ValueError(f"mesh axes {self.mesh.axis_names} must be {AXES}; build it with parallel.make_mesh")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"mesh.exchange={self.exchange!r} is unknown; use one of {EXCHANGES}")
        if self.exchange == "coordinated" and self.expert_slicing:
            raise ValueError("mesh.exchange='coordinated' splits tokens over tensor ranks and "
                             "mesh.expert_slicing=True splits experts over them; choose one")

    @property
    def expert_size(self) -> int:
        return self.mesh.shape["expert_node"] * self.mesh.shape["expert"]

    @property
    def tensor_size(self) -> int:
        return self.mesh.shape["tensor"]

    @property
    def batch_size_divisor(self) -> int:
        return math.prod(self.mesh.shape[a] for a in BATCH_AXES)

    def experts_sharded(self, num_experts: int) -> bool:
        """Whether a layer's experts are split over the expert group (else replicated)."""
        return num_experts >= self.expert_size > 1


def make_mesh(data: int = -1, expert: int = 1, tensor: int = 1, expert_nodes: int = 1,
              devices: Optional[list] = None) -> jax.sharding.Mesh:
    """A ("data", "expert_node", "expert", "tensor") mesh; one of the sizes may be -1 (fills).
    `expert` is the whole expert-parallel size; `expert_nodes` of its groups are inter-node."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
        raise ValueError(f"only one mesh size may be -1 (got {unknown}); give the others explicitly")
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size} must be a positive size or -1")
    if unknown:
        known = math.prod(size for size in sizes.values() if size != -1)
        if len(devices) % known:
            raise ValueError(f"mesh sizes {sizes} cannot fill {len(devices)} devices; "
                             f"make the product of the given sizes divide {len(devices)}")
        sizes[unknown[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh data x expert x tensor = {sizes['data']} x {sizes['expert']} x {sizes['tensor']} "
                         f"= {math.prod(sizes.values())} != {len(devices)} devices; make the product equal "
                         "the device count or set one size to -1")
    if expert_nodes < 1 or sizes["expert"] % expert_nodes:
        raise ValueError(f"mesh.expert_nodes={expert_nodes} must divide mesh.expert={sizes['expert']}")
    shape = (sizes["data"], expert_nodes, sizes["expert"] // expert_nodes, sizes["tensor"])
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)


# ----------------------------------------------------------------------------------------------
# Partition rules
# ----------------------------------------------------------------------------------------------

def _rules(slicing: bool):
    ep = EXPERT_AXES
    t_expert = "tensor" if slicing else None
    return [
        (r"attn/qkv_kernel$", P(None, "tensor")),
        (r"attn/qkv_bias$", P("tensor")),
        (r"attn/out_kernel$", P("tensor", None)),
        (r"mlp/w1$", P(None, "tensor")),
        (r"mlp/b1$", P("tensor")),
        (r"mlp/w2$", P("tensor", None)),
        (r"experts/w1$", P(ep, None, t_expert)),
        (r"experts/b1$", P(ep, t_expert)),
        (r"experts/w2$", P(ep, t_expert, None)),
        (r"experts/b2$", P(ep, None)),
    ]


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_specs(params, par: ParallelConfig):
    """PartitionSpec of every parameter (params may be abstract)."""
    rules = _rules(par.expert_slicing)

    def spec(path, leaf):
        name = _path_name(path)
        for pattern, rule in rules:
            if re.search(pattern, name):
                if name.split("/")[-2] == "experts" and not par.experts_sharded(leaf.shape[0]):
                    rule = P(None, *rule[1:])  # replicated experts (fewer than the expert group)
                return _fit(rule, leaf.shape, par.mesh, name)
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


def _fit(spec: P, shape, mesh, name: str) -> P:
    """Drops a sharding where the dimension does not divide (e.g. a tensor axis larger than a
    tiny model's bias); expert dimensions are validated separately with a clear error."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if size == 1 or dim % size == 0 else None)
    return P(*out)


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


# ----------------------------------------------------------------------------------------------
# The MoE exchange
# ----------------------------------------------------------------------------------------------

def _all_to_all(buffer: jax.Array, par: ParallelConfig) -> jax.Array:
    """buffer [ep, ...] (row j goes to expert rank j) -> [ep, ...] (row j came from rank j)."""
    nodes, local = par.mesh.shape["expert_node"], par.mesh.shape["expert"]
    if par.exchange != "hierarchical" or nodes == 1 or local == 1:
        return jax.lax.all_to_all(buffer, EXPERT_AXES, 0, 0, tiled=True)
    rest = buffer.shape[1:]
    staged = buffer.reshape(nodes, local, *rest)
    staged = jax.lax.all_to_all(staged, "expert", 1, 1, tiled=True)  # intra-node first
    staged = jax.lax.all_to_all(staged, "expert_node", 0, 0, tiled=True)  # then across nodes
    return staged.reshape(buffer.shape)


def _expert_ffn(experts: dict, buffer: jax.Array, par: ParallelConfig) -> jax.Array:
    """Local experts on [E_local, rows, M]; with expert slicing the FFN dim is split over tensor."""
    if not (par.expert_slicing and par.tensor_size > 1):
        return dispatch_lib.expert_ffn(experts, buffer)
    dtype = buffer.dtype
    hidden = jnp.einsum("ecm,emf->ecf", buffer, experts["w1"].astype(dtype)) + experts["b1"][:, None, :].astype(dtype)
    partial = jnp.einsum("ecf,efm->ecm", dispatch_lib.gelu(hidden), experts["w2"].astype(dtype))
    return jax.lax.psum(partial, "tensor") + experts["b2"][:, None, :].astype(dtype)


def exchange_and_run(tokens: jax.Array, routing: Routing, experts: dict, par: ParallelConfig) -> jax.Array:
    """Inside shard_map: local tokens [S, M] -> y [S, M] through experts sharded over the group."""
    ep, tp = par.expert_size, par.tensor_size
    num_experts, capacity = routing.num_experts, routing.capacity
    model_dim = tokens.shape[-1]
    buffer = dispatch_lib.gather_to_buffer(tokens, routing)  # [E, C, M]
    coordinated = par.exchange == "coordinated" and tp > 1
    if coordinated:  # each tensor rank sends its 1/tp of the slots
        share = -(-capacity // tp)
        buffer = jnp.pad(buffer, ((0, 0), (0, share * tp - capacity), (0, 0)))
        rank = jax.lax.axis_index("tensor")
        buffer = jax.lax.dynamic_slice_in_dim(buffer, rank * share, share, axis=1)
    slots = buffer.shape[1]
    local_experts = num_experts // ep
    sent = buffer.reshape(ep, local_experts, slots, model_dim)
    received = _all_to_all(sent, par)  # [ep (source), E_local, slots, M]
    rows = received.transpose(1, 0, 2, 3).reshape(local_experts, ep * slots, model_dim)
    out = _expert_ffn(experts, rows, par)
    out = out.reshape(local_experts, ep, slots, model_dim).transpose(1, 0, 2, 3)
    out = _all_to_all(out, par).reshape(num_experts, slots, model_dim)
    if coordinated:
        out = jax.lax.all_gather(out, "tensor", axis=1, tiled=True)[:, :capacity]
    return dispatch_lib.combine_from_buffer(out, routing)


def sharded_moe(params: dict, tokens: jax.Array, *, moe, train: bool, rng, par: ParallelConfig, route_fn):
    """Runs route + dispatch of one MoE layer under shard_map. tokens [B, T, M] (global, batch-sharded).
    Returns (y [B, T, M], stats) with stats reduced over the whole batch."""
    num_experts = params["gate"]["kernel"].shape[1]
    sharded = par.experts_sharded(num_experts)
    expert_specs = param_specs({"experts": params["experts"]}, par)["experts"]
    x_spec = P(BATCH_AXES)
    has_rng = rng is not None

    def body(x, gate, experts, key):
        batch, length, model_dim = x.shape
        flat = x.reshape(-1, model_dim)
        if has_rng:  # a different stream per shard (RTS, jitter and noise are per-shard draws)
            key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXES))
        routing = route_fn(gate, flat, moe=moe, train=train, rng=key if has_rng else None)
        if sharded:
            y = exchange_and_run(flat, routing, experts, par)
        elif par.expert_slicing and par.tensor_size > 1:
            y = dispatch_lib.combine_from_buffer(
                _expert_ffn(experts, dispatch_lib.gather_to_buffer(flat, routing), par), routing)
        else:
            y = dispatch_lib.dispatch(moe.dispatch, flat, routing, experts)
        stats = gating_lib.routing_stats(routing, axes=BATCH_AXES)
        return y.reshape(batch, length, model_dim), stats

    key = rng if has_rng else jax.random.key(0)
    stat_specs = {name: P() for name in ("aux_loss", "z_loss", "expert_counts", "kept_counts", "dropped_fraction")}
    fn = jax.shard_map(body, mesh=par.mesh, in_specs=(x_spec, P(), expert_specs, P()),
                       out_specs=(x_spec, stat_specs), check_vma=False)
    return fn(tokens, params["gate"], params["experts"], key)


def device_put_batch(batch: dict, par: ParallelConfig) -> dict:
    """Places a host batch (this process's rows) as a global array sharded over the batch axes."""
    sharding = batch_sharding(par)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
