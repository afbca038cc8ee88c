"""Run configs: the ml_collections.ConfigDict behind `--config`, and the library objects built from it
(the model inside a run is a moe_jax.config.ModelConfig).

A run config has groups model, moe, data, optim, mesh and the top-level fields of `RunSettings`
(seed, total_steps, cadences, start and routing-trace options; `default_config(scale)` builds one).
Each field is typed and defaulted once, in a dataclass: `run_settings(config)` and
`mesh_settings(config)` read the top level and the mesh group (a field a config lacks keeps its
default, a misspelt one is an error), so no caller restates a default.

The model, moe and optim groups are derived from the dataclasses `moe_jax.config.ModelConfig`,
`moe_jax.config.MoEConfig` and `moe_jax.train_lib.OptimConfig`: every dataclass field is a config
field of the same name, so a new field is at once a `--config.moe.<field>` override, and
`model_config` / `optim_config` turn the groups back into the dataclasses. A ConfigDict field has
one type, so values that a dataclass allows to be None or a tuple are written as:
  * None: "" for a string field, 0 for a number (moe.noisy_gate_policy="", moe.expert_ffn_size=0);
  * a tuple of ints: a string, "0,3" (moe.layers), or for moe.experts the pyramid form
    "32x10,64x2" that `moe_jax.config.parse_expert_list` reads;
  * moe.experts is always a string, and "0" makes the model dense (no MoEConfig is built).

SCALES is the one table of run sizes: batch, sequence length, steps, learning rates, logging
cadence and the dense model preset of `moe_jax.config.PRESETS` each starts from. A config file
passes the presets of its variant per scale (`default_config("tiny", {"tiny": "tiny+moe"})`);
micro and small have no presets of their own: they take the tiny variant's preset with their own
dimensions, and fit a pyramid expert list to their depth.
"""

from __future__ import annotations

import dataclasses
import math
import itertools
import typing
from typing import Any, Mapping, Optional

import jax
import ml_collections

from moe_jax import config as config_lib
from moe_jax import parallel as parallel_lib
from moe_jax import train_lib
from moe_jax.config import ModelConfig, MoEConfig


@dataclasses.dataclass(frozen=True)
class Scale:
    """The run-level settings of one size; the model is `preset` with the dimensions in `model`."""

    preset: str  # a dense model of moe_jax.config.PRESETS
    batch_size: int
    seq_len: int  # also the model's max_seq_len (at least 16)
    total_steps: int
    learning_rate: float
    min_learning_rate: float
    warmup_steps: int
    log_every_steps: int
    eval_every_steps: int  # checkpoints are written at the same cadence
    eval_batches: int
    compute_dtype: str = "float32"
    max_bytes: int = 8 * 2 ** 20  # corpus bytes read
    model: Mapping[str, int] = dataclasses.field(default_factory=dict)  # dimensions changed from preset's


SCALES = {
    "micro": Scale(preset="tiny", batch_size=8, seq_len=32, total_steps=6, learning_rate=2e-3,
                   min_learning_rate=2e-4, warmup_steps=1, log_every_steps=1, eval_every_steps=3, eval_batches=1,
                   max_bytes=1 << 19, model=dict(num_layers=4, hidden_size=32, num_heads=2, ffn_size=64)),
    "tiny": Scale(preset="tiny", batch_size=16, seq_len=128, total_steps=300, learning_rate=2e-3,
                  min_learning_rate=2e-4, warmup_steps=30, log_every_steps=10, eval_every_steps=100,
                  eval_batches=8),
    "small": Scale(preset="tiny", batch_size=32, seq_len=256, total_steps=2000, learning_rate=2e-3,
                   min_learning_rate=2e-4, warmup_steps=30, log_every_steps=50, eval_every_steps=200,
                   eval_batches=16, model=dict(num_layers=12, hidden_size=256, num_heads=8, ffn_size=1024)),
    "350m": Scale(preset="350m", batch_size=256, seq_len=2048, total_steps=572_000, learning_rate=3e-4,
                  min_learning_rate=3e-5, warmup_steps=2_000, log_every_steps=100, eval_every_steps=2000,
                  eval_batches=50, compute_dtype="bfloat16"),
    "1.3b": Scale(preset="1.3b", batch_size=512, seq_len=2048, total_steps=286_000, learning_rate=2e-4,
                  min_learning_rate=2e-5, warmup_steps=2_000, log_every_steps=100, eval_every_steps=2000,
                  eval_batches=50, compute_dtype="bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The top-level fields of a run config. __post_init__ checks them (ValueError names the field)."""

    seed: int = 0
    total_steps: int = 300
    log_every_steps: int = 10
    eval_every_steps: int = 100
    eval_batches: int = 8  # validation batches of each training-time evaluation
    # False: evaluation routes as DeepSpeed's does (RTS, top-2's sampled second expert) with one fixed
    # key (train_lib.eval_rng); True: routing without noise (RTS keeps the first tokens, top-2 the best two)
    deterministic_eval: bool = False
    checkpoint_every_steps: int = 100
    keep_checkpoints: int = 3
    stop_after_steps: int = 0  # > 0: end this run at that step (checkpointed); rerun to continue
    init_from: str = ""  # a workdir (or checkpoint directory) of another run: start from its parameters
    # (a dense run into an MoE model: upcycled, every expert a copy of the dense FFN, moe_jax.upcycle)
    init_from_noise: float = 0.0  # upcycling: noise std on each expert's copy, as a fraction of the matrix's std
    # routing traces (moe_jax.routing_trace, under workdir/routing/)
    routing_probe: bool = True  # record the probe batch's expert choices at every evaluation
    router_diagnostics: bool = True  # per MoE layer, LM vs balance gradient on the gate at each evaluation
    record_routing: bool = False  # record every training step's expert choices (for replay)
    replay_routing: str = ""  # a run recorded with record_routing: route every step with its recorded choices

    def __post_init__(self):
        if not self.init_from_noise >= 0:
            raise ValueError(f"init_from_noise={self.init_from_noise} must be >= 0 (a fraction of each expert "
                             "matrix's std; 0: exact copies)")
        if self.stop_after_steps < 0:
            raise ValueError(f"stop_after_steps={self.stop_after_steps} must be >= 0 (0: run to total_steps)")
        for name in ("total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def last_step(self) -> int:
        """The step this invocation ends at: stop_after_steps when set, else total_steps."""
        return min(self.total_steps, self.stop_after_steps or self.total_steps)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    """The mesh group: data x expert x tensor must equal the device count (-1 fills); see
    moe_jax.parallel for the exchanges."""

    data: int = -1
    expert: int = 1
    tensor: int = 1
    expert_nodes: int = 1  # > 1 splits the expert axis into inter-node groups (hierarchical exchange)
    exchange: str = "auto"
    expert_slicing: bool = False
    row_exchange: str = "auto"  # rows exchange of dropless / serve: auto (ragged on GPU), bounded, ragged
    shard_optimizer: bool = True  # ZeRO-1: AdamW moments split over the data-parallel axes
    grad_reduce_dtype: str = "float32"  # "bfloat16": gradients reduced in bf16 (moe_jax.grad_precision)


def _top_level(config: ml_collections.ConfigDict) -> dict:
    return {name: value for name, value in config.items() if not isinstance(value, ml_collections.ConfigDict)}


def run_settings(config: ml_collections.ConfigDict) -> RunSettings:
    """The typed top-level fields of a run config (ValueError names one RunSettings lacks)."""
    return RunSettings(**from_fields(RunSettings, _top_level(config), "config"))


def mesh_settings(config: ml_collections.ConfigDict) -> MeshSettings:
    """The typed mesh group of a run config (ValueError names a field MeshSettings lacks)."""
    return MeshSettings(**from_fields(MeshSettings, config.get("mesh", {}), "mesh"))


# ----------------------------------------------------------------------------------------------
# Dataclass fields <-> config fields
# ----------------------------------------------------------------------------------------------

def format_expert_list(experts: tuple[int, ...]) -> str:
    """(32,) * 10 + (64,) * 2 -> "32x10,64x2", the form moe_jax.config.parse_expert_list reads."""
    return ",".join(f"{count}x{len(list(run))}" for count, run in itertools.groupby(experts))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _holds_dataclass(hint) -> bool:
    return any(dataclasses.is_dataclass(arg) for arg in (hint, *typing.get_args(hint)))


def to_fields(obj) -> dict[str, Any]:
    """A dataclass's fields as config values (the module docstring's encoding); fields that hold
    another dataclass (ModelConfig.moe) are left out."""
    hints = _hints(type(obj))
    out = {}
    for field in dataclasses.fields(obj):
        hint = hints[field.name]
        if _holds_dataclass(hint):
            continue
        value, args = getattr(obj, field.name), typing.get_args(hint)
        if value is None:
            value = "" if str in args else 0
        elif isinstance(value, tuple):
            value = format_expert_list(value) if str in args else ",".join(str(v) for v in value)
        elif str in args:
            value = str(value)
        out[field.name] = value
    return out


def from_fields(cls, group: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keyword arguments of `cls` from a config group written by `to_fields`; fields the group
    lacks keep the dataclass's defaults. ValueError names a field `cls` does not have."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not _holds_dataclass(hints[f.name])]
    kwargs = {}
    for name, value in group.items():
        if name not in names:
            raise ValueError(f"{prefix}.{name} is not a field of {cls.__name__}; remove it or use one of {names}")
        hint = hints[name]
        if type(None) in typing.get_args(hint) and not isinstance(value, bool) and value in ("", 0, None):
            value = None
        elif typing.get_origin(hint) is tuple and isinstance(value, str):
            try:
                value = tuple(int(part) for part in value.replace(" ", "").split(",") if part)
            except ValueError:
                raise ValueError(f"{prefix}.{name}={value!r} must list integers like '0,3'") from None
        kwargs[name] = value
    return kwargs


def model_groups(model: ModelConfig) -> tuple[dict, dict]:
    """The (model, moe) config groups of a ModelConfig; a dense model gets the MoEConfig defaults
    with experts "0"."""
    moe = to_fields(model.moe if model.moe is not None else MoEConfig())
    if model.moe is None:
        moe["experts"] = "0"
    return to_fields(model), moe


def set_model(config: ml_collections.ConfigDict, model: ModelConfig) -> None:
    """Writes `model` into the config's model and moe groups."""
    model_group, moe_group = model_groups(model)
    config.model.update(model_group)
    config.moe.update(moe_group)


# ----------------------------------------------------------------------------------------------
# Building a run config
# ----------------------------------------------------------------------------------------------

def _fit_to_depth(model: ModelConfig, changes: Mapping[str, int]) -> ModelConfig:
    """`model` with `changes`; a pyramid expert list is refitted to the new MoE layer count, the
    large expert count keeping its share of the layers (at least one): "4x3,8x1" on 4 layers ->
    "4x1,8x1", on 12 -> "4x4,8x2"."""
    if model.moe is None or not isinstance(model.moe.experts, tuple):
        return model.replace(**changes)
    experts = model.moe.experts
    probe = model.replace(**changes, moe=dataclasses.replace(model.moe, experts=max(experts)))
    moe_layers = len(probe.moe_layer_indices())
    large = min(moe_layers, max(1, round(moe_layers * experts.count(max(experts)) / len(experts))))
    fitted = (min(experts),) * (moe_layers - large) + (max(experts),) * large
    return probe.replace(moe=dataclasses.replace(model.moe, experts=fitted))


def scale_model(scale: str, presets: Optional[Mapping[str, str]] = None) -> ModelConfig:
    """The model of a run at `scale`: presets[scale] (a name of moe_jax.config.PRESETS), else for
    micro / small the tiny preset at their dimensions, else the scale's dense model."""
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} is unknown; use one of {list(SCALES)}")
    s, presets = SCALES[scale], presets or {}
    name = presets.get(scale) or (presets.get(s.preset) if s.model else None) or s.preset
    changes = {**s.model, "max_seq_len": max(s.seq_len, 16), "compute_dtype": s.compute_dtype}
    return _fit_to_depth(config_lib.preset(name), changes)


def default_config(scale: str = "tiny", presets: Optional[Mapping[str, str]] = None) -> ml_collections.ConfigDict:
    """The run config of SCALES[scale] with the model `scale_model(scale, presets)`."""
    model = scale_model(scale, presets)
    s = SCALES[scale]
    c = ml_collections.ConfigDict(to_fields(RunSettings(
        total_steps=s.total_steps, log_every_steps=s.log_every_steps, eval_every_steps=s.eval_every_steps,
        eval_batches=s.eval_batches, checkpoint_every_steps=s.eval_every_steps)))
    model_group, moe_group = model_groups(model)
    c.model = model_group
    c.moe = moe_group  # experts: "0" dense, "128", or a pyramid "32x10,64x2"
    c.data = ml_collections.ConfigDict({
        "path": "",  # "": the Python standard library's source; or a text file, a glob, a .bin
        "batch_size": s.batch_size, "seq_len": s.seq_len, "max_bytes": s.max_bytes, "val_percent": 5.0,
        "vocab_size": 0,  # .bin token files only; 0: read from the file
    })
    optim = to_fields(train_lib.OptimConfig(learning_rate=s.learning_rate, min_learning_rate=s.min_learning_rate,
                                            warmup_steps=s.warmup_steps, total_steps=s.total_steps))
    del optim["total_steps"]  # the run's total_steps
    c.optim = optim
    c.mesh = to_fields(MeshSettings())
    return c


# ----------------------------------------------------------------------------------------------
# Run config -> library objects
# ----------------------------------------------------------------------------------------------

def model_config(config: ml_collections.ConfigDict, vocab_size: Optional[int] = None) -> ModelConfig:
    """The validated ModelConfig of a run config (ValueError names the bad field). vocab_size
    widens the model's vocabulary to the corpus's."""
    model = from_fields(ModelConfig, config.model, "model")
    if vocab_size is not None:
        model["vocab_size"] = max(model.get("vocab_size", ModelConfig.vocab_size), vocab_size)
    moe = from_fields(MoEConfig, config.moe, "moe")
    experts = config_lib.parse_expert_list(str(moe.get("experts", "0")))
    dense = experts == 0 or (isinstance(experts, tuple) and not any(e > 1 for e in experts))
    return ModelConfig(moe=None if dense else MoEConfig(**moe), **model)


def parallel_config(config: ml_collections.ConfigDict) -> Optional[parallel_lib.ParallelConfig]:
    """The mesh of a run, or None on a single device (no mesh, no shard_map)."""
    m = mesh_settings(config)
    if jax.device_count() == 1 and m.expert in (1, -1) and m.tensor in (1, -1):
        return None
    mesh = parallel_lib.make_mesh(m.data, m.expert, m.tensor, m.expert_nodes)
    expert = math.prod(mesh.shape[a] for a in parallel_lib.EXPERT_AXES)  # -1 resolved
    # DeepSpeed's Pyramid rule: the innermost expert axis is the model's smallest expert group
    group = parallel_lib.smallest_expert_group(model_config(config).layer_experts(), expert, m.expert_nodes)
    mesh = parallel_lib.make_mesh(m.data, m.expert, m.tensor, m.expert_nodes, expert_group=group)
    return parallel_lib.ParallelConfig(mesh, exchange=m.exchange, expert_slicing=m.expert_slicing,
                                       row_exchange=m.row_exchange, shard_optimizer=m.shard_optimizer,
                                       grad_reduce_dtype=m.grad_reduce_dtype)


def optim_config(config: ml_collections.ConfigDict) -> train_lib.OptimConfig:
    return train_lib.OptimConfig(total_steps=config.total_steps,
                                 **from_fields(train_lib.OptimConfig, config.optim, "optim"))


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a run config before anything is built; ValueError names the field."""
    run_settings(config)
    if config.data.batch_size < 1 or config.data.seq_len < 1:
        raise ValueError("data.batch_size and data.seq_len must be >= 1")
    if config.data.seq_len > config.model.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}; "
                         "raise model.max_seq_len or shorten data.seq_len")
    model_config(config)
    optim_config(config)
    mesh = mesh_settings(config)
    if mesh.exchange not in parallel_lib.EXCHANGES:
        raise ValueError(f"mesh.exchange={mesh.exchange!r} is unknown; use one of {parallel_lib.EXCHANGES}")
