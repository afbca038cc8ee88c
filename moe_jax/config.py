"""Model and MoE configuration: frozen dataclasses, validation, paper presets (what a model is;
how a run is configured around it, `--config`, is moe_jax.run_config).

A model is a `ModelConfig`; its optional `moe` field (a `MoEConfig`) says which layers are MoE,
how many experts each has and how tokens are routed. Everything is validated on construction:
a bad value raises `ValueError` naming the field and the fix.

Placement (which of the `num_layers` blocks hold experts), as Megatron-DeepSpeed counts it:
  * "interval": 1-based layer l is MoE iff l % expert_interval == 0 (default 2: every other layer,
    starting with the second);
  * "first_half" / "second_half": every layer of that half is MoE (so a 24-layer model has 12 MoE
    layers, as many as "interval" with 2: the ablation compares equal parameter counts);
  * "explicit": `layers` lists the 0-based indices of the MoE layers.
`experts` gives the expert count of each MoE layer: one integer for all of them, or a pyramid
list written like "32x10,64x2" (10 layers of 32 experts, then 2 of 64) with exactly one entry per
MoE layer. An entry <= 1 makes that layer dense, as in Megatron-DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Sequence

import jax.numpy as jnp

from moe_jax import dispatch
from moe_jax import routers as routers_lib
from moe_jax import routing as routing_lib

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
ROUTER_IMPLS = ("jnp", "kernel")
PLACEMENTS = ("interval", "first_half", "second_half", "explicit")
DROP_POLICIES = ("probs", "position")
DTYPES = ("float32", "bfloat16", "float16")


def parse_expert_list(spec: str | int | Sequence[int]) -> tuple[int, ...] | int:
    """Parses "32x10,64x2" into (32,)*10 + (64,)*2; "128" into 128; a sequence into a tuple."""
    if isinstance(spec, bool):
        raise ValueError(f"moe.experts={spec!r} is not an expert count; use an int or a list like '32x10,64x2'")
    if isinstance(spec, int):
        return spec
    if not isinstance(spec, str):
        return tuple(int(e) for e in spec)
    text = spec.replace(" ", "")
    if not text:
        raise ValueError("moe.experts='' is empty; use an int like '128' or a list like '32x10,64x2'")
    if "," not in text and "x" not in text:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"moe.experts={spec!r} is not an int or a list like '32x10,64x2'") from None
    counts: list[int] = []
    for part in text.split(","):
        try:
            if "x" in part:
                experts, repeat = part.split("x")
                counts.extend([int(experts)] * int(repeat))
            else:
                counts.append(int(part))
        except ValueError:
            raise ValueError(
                f"moe.experts={spec!r}: cannot read {part!r}; write entries as EXPERTSxLAYERS, "
                "e.g. '32x10,64x2'") from None
    return tuple(counts)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Where the experts are and how tokens reach them (DeepSpeed's defaults unless noted)."""

    experts: int | tuple[int, ...] | str = 8
    placement: str = "interval"
    expert_interval: int = 2
    layers: tuple[int, ...] = ()  # 0-based MoE layer indices, placement="explicit" only
    k: int = 1
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    use_rts: bool = True
    noisy_gate_policy: Optional[str] = None
    second_expert_sampling: bool = True  # DeepSpeed's top2_2nd_expert_sampling
    drop_policy: str = "probs"  # k > 2 only
    residual: bool = False
    aux_loss_coef: float = 0.01
    # Over which tokens the balance loss's fractions are averaged (moe_jax.routing.routing_stats):
    # "global" the whole batch, whatever the mesh; "per_shard" each expert-parallel shard's own
    # tokens, the shards' losses then averaged (DeepSpeed's, to compare a multi-device run with it);
    # "sequence" each sequence, the sequences' losses then averaged.
    balance_loss_scope: str = "global"
    z_loss_coef: float = 0.0
    # A name of moe_jax.routers.ROUTERS: "topk" is DeepSpeed's top-k gating (k experts per token);
    # "expert_choice" lets each expert take its ceil(S * capacity_factor / E) best tokens of the
    # group (k is not read). Expert-choice reads the whole group's tokens, so in a causal LM a
    # token's experts depend on later tokens: it trains and evaluates on whole sequences, and
    # moe_jax.inference refuses to generate with it.
    router: str = "topk"
    # Aux-loss-free balancing (DeepSeek-V3): > 0 gives each MoE layer a per-expert bias added to the
    # gate logits when choosing experts (never to the combine weights), updated after every step by
    # bias += rate * sign(mean load - load) from the whole batch's expert loads (moe_jax.balancing).
    # 0 (the default, DeepSpeed's behaviour): no bias. Set aux_loss_coef=0 for no balance loss at all.
    bias_update_rate: float = 0.0
    router_impl: str = "jnp"  # "kernel": the fused gating kernel (moe_jax.kernels.gating; jnp off GPU)
    dispatch: str = "gather"  # a name of moe_jax.dispatch.PATHS
    # dropless / serve under expert parallelism: each device sends each other device at most
    # ceil(copies / ep * factor) token copies; copies past that bound are not processed (counted
    # as overflow). ep (the expert group size) or more: nothing can overflow.
    row_exchange_factor: float = 2.0
    expert_ffn_size: Optional[int] = None  # None: the model's ffn_size
    # DeepSeekMoE's shared experts: n always-on experts of the routed experts' FFN size, their sum
    # added to the routed output (one dense MLP of n x that width: the same function). Dense:
    # data / tensor parallel, never exchanged. With expert_ffn_size below ffn_size (fine-grained
    # experts, more of them and a larger k) the active compute stays the dense FFN's.
    shared_experts: int = 0
    # Group-limited routing (DeepSeek-V2's device-limited, V3's node-limited routing): the experts
    # form route_groups equal contiguous groups (under expert parallelism: the expert_node axis,
    # set route_groups = mesh.expert_nodes) and a token may use experts of at most
    # route_group_limit of them, the groups with the highest best score for it. 0: no limit.
    route_groups: int = 0
    route_group_limit: int = 0
    # mesh.exchange="node_dedup": each node's buffer holds this times the balanced share of tokens
    # (moe_jax.node_exchange); above 1 fewer tokens lose their copies on a busy node, for more bytes.
    node_capacity_factor: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "experts", parse_expert_list(self.experts))
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.placement not in PLACEMENTS:
            raise ValueError(f"moe.placement={self.placement!r} is unknown; use one of {PLACEMENTS}")
        if self.expert_interval < 1:
            raise ValueError(f"moe.expert_interval={self.expert_interval} must be >= 1")
        if self.placement == "explicit" and not self.layers:
            raise ValueError("moe.placement='explicit' needs moe.layers, the 0-based MoE layer indices")
        if self.placement != "explicit" and self.layers:
            raise ValueError(f"moe.layers={self.layers} is only read with moe.placement='explicit'")
        if self.k < 1:
            raise ValueError(f"moe.k={self.k} must be >= 1")
        if self.route_group_limit:
            if self.route_groups < 1 or not 1 <= self.route_group_limit <= self.route_groups:
                raise ValueError(f"moe.route_group_limit={self.route_group_limit} needs moe.route_groups >= it "
                                 f"(got route_groups={self.route_groups}); 0 turns the limit off")
        if not self.node_capacity_factor > 0:
            raise ValueError(f"moe.node_capacity_factor={self.node_capacity_factor} must be > 0 "
                             "(1.0: the balanced share)")
        if self.shared_experts < 0:
            raise ValueError(f"moe.shared_experts={self.shared_experts} must be >= 0 (0: none)")
        if self.residual and self.k != 1:
            raise ValueError(f"moe.residual=True uses one routed expert; set moe.k=1 (got {self.k})")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"moe.{name}={value} must be > 0 (1.0 is the paper's setting)")
        if self.min_capacity < 0:
            raise ValueError(f"moe.min_capacity={self.min_capacity} must be >= 0 (DeepSpeed uses 4)")
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ValueError(f"moe.noisy_gate_policy={self.noisy_gate_policy!r} is unknown; "
                             f"use one of {NOISY_GATE_POLICIES}")
        if self.noisy_gate_policy == "RSample" and self.k != 1:
            raise ValueError("moe.noisy_gate_policy='RSample' applies to top-1 gating only; set k=1 or use 'Jitter'")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"moe.drop_policy={self.drop_policy!r} is unknown; use one of {DROP_POLICIES}")
        if self.router not in routers_lib.ROUTERS:
            raise ValueError(f"moe.router={self.router!r} is unknown; use one of {tuple(routers_lib.ROUTERS)}")
        if self.balance_loss_scope not in routing_lib.BALANCE_LOSS_SCOPES:
            raise ValueError(f"moe.balance_loss_scope={self.balance_loss_scope!r} is unknown; use one of "
                             f"{routing_lib.BALANCE_LOSS_SCOPES}")
        if self.bias_update_rate < 0:
            raise ValueError(f"moe.bias_update_rate={self.bias_update_rate} must be >= 0 (0 turns aux-loss-free "
                             "balancing off; DeepSeek-V3 uses 0.001)")
        if self.bias_update_rate > 0 and (
                "selection_bias" not in inspect.signature(routers_lib.ROUTERS[self.router]).parameters
                or self.router_impl != "jnp"):
            raise ValueError(f"moe.bias_update_rate={self.bias_update_rate} needs a router that takes a selection "
                             f"bias; moe.router={self.router!r} with router_impl={self.router_impl!r} does not: use "
                             "moe.router='topk' with router_impl='jnp', or bias_update_rate=0")
        if self.route_group_limit and (
                "selection_bias" not in inspect.signature(routers_lib.ROUTERS[self.router]).parameters
                or self.router_impl != "jnp"):
            raise ValueError(f"moe.route_group_limit={self.route_group_limit} limits the choice of a router that "
                             f"takes a selection bias; moe.router={self.router!r} with router_impl="
                             f"{self.router_impl!r} does not: use router 'topk' or 'sigmoid' with router_impl='jnp'")
        if self.router_impl not in ROUTER_IMPLS:
            raise ValueError(f"moe.router_impl={self.router_impl!r} is unknown; use one of {ROUTER_IMPLS}")
        if self.router in routers_lib.ROUTER_IMPLS and self.router_impl not in routers_lib.ROUTER_IMPLS[self.router]:
            raise ValueError(f"moe.router={self.router!r} has no {self.router_impl!r} implementation (it runs "
                             f"{routers_lib.ROUTER_IMPLS[self.router]}); set moe.router_impl='jnp' or "
                             "moe.router='topk'")
        if self.dispatch not in dispatch.PATHS:
            raise ValueError(f"moe.dispatch={self.dispatch!r} is unknown; use one of {tuple(dispatch.PATHS)}")
        if not self.row_exchange_factor > 0:
            raise ValueError(f"moe.row_exchange_factor={self.row_exchange_factor} must be > 0 (2.0 sends at most "
                             "twice the mean rows per device pair; the expert group size never overflows)")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("moe.aux_loss_coef and moe.z_loss_coef must be >= 0")
        counts = self.experts if isinstance(self.experts, tuple) else (self.experts,)
        if any(e < 0 for e in counts):
            raise ValueError(f"moe.experts={self.experts}: expert counts must be >= 0")
        for e in counts:
            if e > 1 and self.k > e:
                raise ValueError(f"moe.k={self.k} exceeds a layer's expert count ({e}); lower k or add experts")


REMAT = ("none", "block", "moe")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A GPT-3-style decoder (pre-LN, learned positions, GELU, tied embeddings)."""

    vocab_size: int = 256
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    ffn_size: Optional[int] = None  # None: 4 * hidden_size
    max_seq_len: int = 256
    dropout: float = 0.0
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    moe: Optional[MoEConfig] = None
    # Rematerialisation in training (REMAT): "none" keeps every activation for the backward pass;
    # "block" recomputes each block from its input (the least memory, one more forward pass);
    # "moe" recomputes only the experts' hidden activations, keeping the routing and the exchanged
    # tokens, so nothing is routed or exchanged twice (moe_jax.experts.EXPERT_ACTIVATION)
    remat: str = "none"

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ValueError(f"model.remat={self.remat!r} is unknown; use one of {REMAT}")
        if self.ffn_size is None:
            object.__setattr__(self, "ffn_size", 4 * self.hidden_size)
        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "ffn_size", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}; "
                "pick a head count that divides the hidden size")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.init_std <= 0:
            raise ValueError(f"model.init_std={self.init_std} must be > 0")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is unknown; use one of {DTYPES}")
        if self.moe is not None:
            self.layer_experts()  # validates placement against num_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def moe_layer_indices(self) -> tuple[int, ...]:
        """0-based indices of the layers that the placement makes MoE (before pyramid entries <= 1)."""
        moe, n = self.moe, self.num_layers
        if moe is None:
            return ()
        if moe.placement == "interval":
            return tuple(i for i in range(n) if (i + 1) % moe.expert_interval == 0)
        if moe.placement == "first_half":
            return tuple(range(n // 2))
        if moe.placement == "second_half":
            return tuple(range(n - n // 2, n))
        bad = [i for i in moe.layers if not 0 <= i < n]
        if bad or len(set(moe.layers)) != len(moe.layers):
            raise ValueError(
                f"moe.layers={moe.layers} must be distinct 0-based indices below model.num_layers={n}")
        return tuple(sorted(moe.layers))

    def layer_experts(self) -> tuple[int, ...]:
        """Expert count of every layer; 0 for a dense layer. Length num_layers."""
        result = [0] * self.num_layers
        if self.moe is None:
            return tuple(result)
        indices = self.moe_layer_indices()
        experts = self.moe.experts
        if isinstance(experts, int):
            experts = (experts,) * len(indices)
        if len(experts) != len(indices):
            raise ValueError(
                f"moe.experts lists {len(experts)} layers but placement {self.moe.placement!r} gives "
                f"{len(indices)} MoE layers (of model.num_layers={self.num_layers}); write one entry per "
                f"MoE layer, e.g. '{experts[0] if experts else 8}x{len(indices)}'")
        for index, count in zip(indices, experts):
            result[index] = count if count > 1 else 0
        return tuple(result)

    @property
    def expert_ffn_size(self) -> int:
        if self.moe is not None and self.moe.expert_ffn_size:
            return self.moe.expert_ffn_size
        return self.ffn_size

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def replace_moe(cfg: ModelConfig, **changes) -> ModelConfig:
    """A copy of `cfg` with fields of its MoE part replaced."""
    if cfg.moe is None:
        raise ValueError("this model has no MoE part; build one with ModelConfig(moe=MoEConfig(...))")
    return cfg.replace(moe=dataclasses.replace(cfg.moe, **changes))


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

GPT2_VOCAB = 50257
_BASES = {  # the paper's dense bases (Rajbhandari et al. 2022, Table 1): layers, hidden size, heads
    "350m": dict(num_layers=24, hidden_size=1024, num_heads=16),
    "1.3b": dict(num_layers=24, hidden_size=2048, num_heads=16),
    "6.7b": dict(num_layers=32, hidden_size=4096, num_heads=32),
}
# Every paper model: GPT-2's vocabulary, sequences of 2048 tokens, init std 0.014 (its training scripts).
_PAPER = dict(vocab_size=GPT2_VOCAB, max_seq_len=2048, init_std=0.014)
# The paper's MoE settings (its Table 1 and training scripts): top-1, capacity factor 1.0 in training
# and evaluation, min capacity 4 (DeepSpeed's MoE layer default), aux loss coefficient 0.01.
_PAPER_MOE = dict(k=1, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4, aux_loss_coef=0.01)

_TINY = dict(vocab_size=256, num_layers=8, hidden_size=128, num_heads=4, max_seq_len=256, init_std=0.02)


def _presets() -> dict[str, ModelConfig]:
    p: dict[str, ModelConfig] = {}
    for base in ("350m", "1.3b", "6.7b"):
        p[base] = ModelConfig(**_PAPER, **_BASES[base])
    for base, (small, large) in {"350m": (32, 64), "1.3b": (64, 128)}.items():
        dims = dict(**_PAPER, **_BASES[base])
        p[f"{base}+moe-128"] = ModelConfig(**dims, moe=MoEConfig(experts=128, **_PAPER_MOE))
        p[f"{base}+pr-moe-{small}/{large}"] = ModelConfig(
            **dims, moe=MoEConfig(experts=f"{small}x10,{large}x2", residual=True, **_PAPER_MOE))
        p[f"{base}-mos"] = ModelConfig(
            **{**dims, "num_layers": 21},
            moe=MoEConfig(experts=f"{small}x8,{large}x2", residual=True, **_PAPER_MOE))
    # Tiny models for CPU: 8 layers, 4 MoE layers (every other), byte vocabulary.
    p["tiny"] = ModelConfig(**_TINY)
    p["tiny+moe"] = ModelConfig(**_TINY, moe=MoEConfig(experts=8, **_PAPER_MOE))
    p["tiny+moe-16"] = ModelConfig(**_TINY, moe=MoEConfig(experts=16, **_PAPER_MOE))
    p["tiny+top2"] = ModelConfig(**_TINY, moe=MoEConfig(experts=8, **{**_PAPER_MOE, "k": 2}))
    p["tiny+residual"] = ModelConfig(**_TINY, moe=MoEConfig(experts=8, residual=True, **_PAPER_MOE))
    p["tiny+pyramid"] = ModelConfig(**_TINY, moe=MoEConfig(experts="4x3,8x1", **_PAPER_MOE))
    p["tiny+pr-moe"] = ModelConfig(**_TINY, moe=MoEConfig(experts="4x3,8x1", residual=True, **_PAPER_MOE))
    p["tiny-mos"] = ModelConfig(
        **{**_TINY, "num_layers": 7},
        moe=MoEConfig(experts="4x2,8x1", residual=True, **_PAPER_MOE))
    # DeepSeekMoE-style at the tiny MoE's active compute: each of the 8 experts cut into 4 (FFN 128,
    # 32 routed experts), 3 routed + 1 shared per token: 4 x 128 = the dense FFN's 512
    p["tiny+shared-fine"] = ModelConfig(**_TINY, moe=MoEConfig(
        experts=32, shared_experts=1, expert_ffn_size=128, **{**_PAPER_MOE, "k": 3}))
    p["tiny+first-half"] = ModelConfig(**_TINY, moe=MoEConfig(experts=8, placement="first_half", **_PAPER_MOE))
    p["tiny+second-half"] = ModelConfig(**_TINY, moe=MoEConfig(experts=8, placement="second_half", **_PAPER_MOE))
    return p


PRESETS = _presets()


def preset(name: str) -> ModelConfig:
    """The named configuration: "350m", "350m+moe-128", "350m+pr-moe-32/64", "350m-mos", "1.3b",
    "1.3b+moe-128", "1.3b+pr-moe-64/128", "1.3b-mos", "6.7b", "tiny", "tiny+moe", "tiny+pr-moe", ..."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset {name!r} is unknown; choose one of {sorted(PRESETS)}") from None


def dtype(name: str):
    return jnp.dtype(name)
