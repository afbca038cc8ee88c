"""Routing traces: record which experts every token went to, and replay a recording.

A trace of one MoE layer is a compact integer array `code [..., k]` over the layer's tokens (the
token axes of its input, e.g. [B, T]) and the k columns of its mapping table (moe_jax.routing.Routing):
code = e where the router sent the copy to expert e and kept it, -1 - e where it was routed to e and
dropped (capacity) or, for expert-choice, where expert e did not take the token. Under expert
parallelism it is the router's decision before the rows exchange's overflow (moe_jax.exchange),
which a replay repeats. `encode` / `decode` convert; int16 on disk.

Replay. `moe_forward(..., replay=code)` routes the layer's tokens with a recorded code instead of
its gate's choice (`replay`): the copies go to the recorded experts, in slots ranked per expert in
(column, token) order, and a recorded copy that does not fit this layer's capacity is dropped; the
combine weights are the gate's probabilities for the recorded experts, renormalised over a
token's processed copies where the router renormalises (top-k, k >= 2). The load statistics follow
the trace (expert_counts: its routed copies; kept_counts, dropped_fraction, unrouted_fraction);
the balance loss terms stay the gate's own decision's (aux loss, z-loss, gate and token fractions),
so the balance loss keeps training the gate while it does not choose.
Replaying a run's own recording reproduces it exactly (tests/test_routing_trace.py).

Files, under a run's workdir/routing/:
  probe_<step>.npz   the probe batch (evaluation batch 0, routed as evaluation routes it) at every
                     evaluation: "step", "tokens" [B, T] and one code array per MoE layer
                     ("block_<i>" [B, T, k]). experiments/routing_analysis.py reads them.
  train_<first>_<last>.npz  with config.record_routing: every training step's codes, "steps" [n]
                     and "block_<i>" [n, B, T, k], one file per checkpoint interval (written when
                     the checkpoint is). config.replay_routing=<that run's workdir> trains a run
                     with them (`TraceReader`).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import gating as gating_lib
from moe_jax.routing import Routing

TRACE_DIR = "routing"
CODE_DTYPE = np.int16


# ----------------------------------------------------------------------------------------------
# Codes and replay
# ----------------------------------------------------------------------------------------------

def encode(routing: Routing) -> jax.Array:
    """[S, k] int32: expert e for a processed copy, -1 - e for a copy not processed."""
    return jnp.where(routing.kept, routing.expert_index, -1 - routing.expert_index).astype(jnp.int32)


def decode(code) -> tuple:
    """(expert_index, kept) of a code array (jax or numpy)."""
    xp = jnp if isinstance(code, jax.Array) else np
    return xp.where(code >= 0, code, -1 - code), code >= 0


def replay(routing: Routing, code: jax.Array, logits: jax.Array) -> Routing:
    """The gate's own `routing` of S tokens with the assignment replaced by a recorded `code`
    [S, k] (module docstring). logits [S, E]: the gate's logits, whose softmax (or the router's
    Routing.score_fn) gives the combine weights."""
    if tuple(code.shape) != tuple(routing.expert_index.shape):
        raise ValueError(f"the replayed routing has shape {tuple(code.shape)} (tokens, copies) but this layer routes "
                         f"{tuple(routing.expert_index.shape)}: the trace comes from another batch shape, k or "
                         "router; record it with this run's data and moe settings")
    num_tokens, k = routing.expert_index.shape
    num_experts, capacity = routing.num_experts, routing.capacity
    expert_index, recorded = decode(code.astype(jnp.int32))
    expert_index = jnp.clip(expert_index, 0, num_experts - 1)
    # each processed copy's rank among its expert's copies, in (column, token) order
    flat = jnp.where(recorded, expert_index, num_experts).T.reshape(-1)
    rank = gating_lib.rank_within_expert(flat, jnp.zeros(flat.shape, jnp.float32), num_experts + 1)
    slot = rank.reshape(k, num_tokens).T
    kept = recorded & (slot < capacity)
    score = {"softmax": lambda x: jax.nn.softmax(x, axis=-1), "sigmoid": jax.nn.sigmoid}[routing.score_fn]
    gates = score(logits.astype(jnp.float32))
    weight = jnp.take_along_axis(gates, expert_index, axis=1) * kept
    if routing.renormalized:
        weight = weight / jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), jnp.finfo(jnp.float32).eps)
    routed = recorded if routing.column_per_expert else jnp.ones_like(recorded)  # the copies that exist
    expert_counts = jnp.zeros(num_experts, jnp.int32).at[expert_index.reshape(-1)].add(
        routed.reshape(-1).astype(jnp.int32))
    return routing.replace(expert_index=expert_index, slot=jnp.where(kept, slot, 0).astype(jnp.int32),
                           weight=weight, kept=kept, expert_counts=expert_counts,
                           dropped_fraction=jnp.mean((routed & ~kept).astype(jnp.float32)))


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def _write_npz(path: str, arrays: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)  # a reader never sees half a file


def _codes_to_disk(codes: dict) -> dict:
    return {name: np.asarray(code).astype(CODE_DTYPE) for name, code in codes.items()}


def write_probe(workdir: str, step: int, tokens, codes: dict, num_experts: dict) -> str:
    """Writes workdir/routing/probe_<step>.npz; codes: {"block_<i>": [B, T, k]}, num_experts:
    {"block_<i>": E}."""
    directory = os.path.join(workdir, TRACE_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"probe_{step:08d}.npz")
    _write_npz(path, {"step": np.asarray(step), "tokens": np.asarray(tokens).astype(np.int32),
                      **_codes_to_disk(codes), **{f"experts_{name}": np.asarray(num_experts[name]) for name in codes}})
    return path


def read_probes(workdir: str) -> list[dict]:
    """Every probe of a run, by step: [{"step": int, "tokens": [B, T], "layers": {"block_<i>": code},
    "num_experts": {"block_<i>": E}}]."""
    out = []
    for path in sorted(glob.glob(os.path.join(workdir, TRACE_DIR, "probe_*.npz"))):
        with np.load(path) as data:
            layers = {name: data[name].astype(np.int32) for name in data.files if name.startswith("block_")}
            out.append({"step": int(data["step"]), "tokens": data["tokens"], "layers": layers,
                        "num_experts": {name: int(data[f"experts_{name}"]) for name in layers}})
    return out


class TraceWriter:
    """Collects the codes of training steps and writes them as one file per flush (at each
    checkpoint). A resumed run rewrites the steps after its checkpoint with the same codes."""

    def __init__(self, workdir: str):
        self.directory = os.path.join(workdir, TRACE_DIR)
        os.makedirs(self.directory, exist_ok=True)
        self._steps: list[int] = []
        self._codes: list[dict] = []

    def add(self, step: int, codes: dict) -> None:
        self._steps.append(int(step))
        self._codes.append(_codes_to_disk(codes))

    def flush(self) -> Optional[str]:
        if not self._steps:
            return None
        path = os.path.join(self.directory, f"train_{self._steps[0]:08d}_{self._steps[-1]:08d}.npz")
        arrays = {name: np.stack([c[name] for c in self._codes]) for name in self._codes[0]}
        _write_npz(path, {"steps": np.asarray(self._steps, np.int64), **arrays})
        self._steps, self._codes = [], []
        return path


_TRAIN_FILE = re.compile(r"train_(\d+)_(\d+)\.npz$")


class TraceReader:
    """A recorded run's training codes by step (`codes(step)`), read one file at a time."""

    def __init__(self, path: str):
        directory = path if os.path.basename(os.path.normpath(path)) == TRACE_DIR else os.path.join(path, TRACE_DIR)
        self._files: dict[int, str] = {}
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            match = _TRAIN_FILE.match(name)
            if match:
                for step in range(int(match.group(1)), int(match.group(2)) + 1):
                    self._files[step] = os.path.join(directory, name)
        if not self._files:
            raise FileNotFoundError(f"{directory} holds no recorded training steps (train_*.npz); record a run with "
                                    "--config.record_routing=True and pass its workdir")
        self.directory = directory
        self._cached: tuple[Optional[str], dict] = (None, {})

    @property
    def steps(self) -> tuple[int, int]:
        return min(self._files), max(self._files)

    def check_covers(self, first: int, last: int) -> None:
        """ValueError naming the first step of first..last that is not recorded."""
        for step in range(first, last + 1):
            if step not in self._files:
                self.codes(step)  # raises with the trace's range

    def codes(self, step: int) -> dict:
        """{"block_<i>": int32 [B, T, k]} of a recorded step; ValueError when it is not recorded."""
        path = self._files.get(int(step))
        if path is None:
            low, high = self.steps
            raise ValueError(f"the routing trace in {self.directory} has no step {step} (it covers steps {low}..{high} "
                             "with gaps where the recording run was cut off before a checkpoint); record a run at "
                             "least as long")
        if self._cached[0] != path:
            with np.load(path) as data:
                self._cached = (path, {name: data[name] for name in data.files})
        data = self._cached[1]
        index = int(np.searchsorted(data["steps"], step))
        return {name: array[index].astype(np.int32) for name, array in data.items() if name.startswith("block_")}


def replay_reader(path: str, last_step: int, layer_experts) -> TraceReader:
    """The recorded run at `path` (config.replay_routing), checked to cover steps 1..last_step and
    to have recorded the MoE layers of a model whose layer_experts() this is."""
    try:
        reader = TraceReader(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"config.replay_routing={path}: {error}") from None
    try:
        reader.check_covers(1, last_step)
    except ValueError as error:
        raise ValueError(f"config.replay_routing={path}: {error}") from None
    codes = reader.codes(reader.steps[0])
    layers = {f"block_{i}" for i, experts in enumerate(layer_experts) if experts}
    if set(codes) != layers:
        raise ValueError(f"config.replay_routing={path} recorded the MoE layers {sorted(codes)}, this model has "
                         f"{sorted(layers)}; replay a run of the same architecture")
    return reader
