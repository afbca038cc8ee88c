"""Counterfactual routing on a frozen checkpoint: which experts and which routing decisions matter.

A finished run's parameters are evaluated on its test split (the same batches and routing keys as
its own final evaluation, moe_jax.evaluation.evaluate_test, so the unchanged model reproduces its
test loss exactly, on the run config's mesh when this process has its devices: capacity and random
token selection are per shard, so another device count routes a little differently) under
interventions, with no training:

  routing   deterministic routing (no random token selection or sampled second expert), another
            evaluation capacity factor, no token dropped, another k (top-k gating), expert-choice
  knockout  one expert of one layer removed: its output weights and bias zeroed, so the tokens
            routed to it get no MoE output in that layer (Residual-MoE's dense MLP still runs), as a
            dropped token does
  merge     the two most similar experts of a layer (highest cosine of their flattened weights)
            replaced by their average: is the layer's capacity redundant?

Each intervention gives the test loss and its change against the unchanged model. `run_interventions`
is the library entry; experiments/counterfactual.py writes the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import corpus as corpus_lib
from moe_jax import data as data_lib
from moe_jax import metrics as metrics_lib
from moe_jax import parallel as parallel_lib
from moe_jax import run_config, train_lib
from moe_jax.config import ModelConfig, replace_moe


@dataclasses.dataclass(frozen=True)
class FrozenRun:
    """A finished run: its config, model, parameters, selection biases and test batches."""

    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    params: dict
    router_state: dict
    batches: list
    step: int
    parallel: Optional[parallel_lib.ParallelConfig] = None  # the run config's mesh on this process's devices


def load_run(workdir: str, max_batches: int = 0) -> FrozenRun:
    """The run in `workdir` (config.json and its last checkpoint), and its test split's batches
    (the first max_batches of them; 0: all, as the run's own final evaluation)."""
    config_path = os.path.join(workdir, metrics_lib.CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} is missing: --workdir must be a training run's folder")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f)["config"])
    corpus = corpus_lib.load_corpus(config.data.path or None, max_bytes=config.data.max_bytes or None,
                                    val_percent=config.data.val_percent, vocab_size=config.data.vocab_size or None)
    model_cfg = run_config.model_config(config, vocab_size=corpus.vocab_size)
    if model_cfg.moe is None:
        raise ValueError(f"the run in {workdir} is a dense model: it has no routing to intervene on")
    params, step = checkpoint_lib.load_params(workdir, "saved")
    if step < config.total_steps:
        raise ValueError(f"the run in {workdir} is at step {step} of {config.total_steps}: finish it first")
    batches = data_lib.split_batches(corpus.test, batch_size=config.data.batch_size, seq_len=config.data.seq_len)
    if max_batches:
        batches = batches[:max_batches]
    router_state = checkpoint_lib.load_router_state(workdir)
    par = run_config.parallel_config(config)  # capacity and token selection are per shard: the run's mesh
    if par is not None:
        parallel_lib.validate(model_cfg, par, config.data.batch_size)
        params = jax.device_put(params, parallel_lib.shardings(parallel_lib.param_specs(params, par), par.mesh))
        batches = [parallel_lib.device_put_batch(batch, par) for batch in batches]
    return FrozenRun(config, model_cfg, params, router_state, batches, step, par)


def test_loss(run: FrozenRun, model_cfg: Optional[ModelConfig] = None, params: Optional[dict] = None,
              deterministic: Optional[bool] = None) -> float:
    """Test loss of the run's batches with (model_cfg, params) in place of the run's own; batch i
    routed with train_lib.eval_rng(i) unless deterministic (default: the run's deterministic_eval)."""
    model_cfg = run.model_cfg if model_cfg is None else model_cfg
    params = run.params if params is None else params
    if deterministic is None:
        deterministic = run_config.run_settings(run.config).deterministic_eval
    step = _eval_fn(model_cfg, run.parallel)
    nll, tokens = 0.0, 0.0
    for i, batch in enumerate(run.batches):
        out = step(params, batch, None if deterministic else train_lib.eval_rng(i),
                   router_state=run.router_state or None)
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    return nll / tokens


@functools.lru_cache(maxsize=32)
def _eval_fn(model_cfg: ModelConfig, parallel: Optional[parallel_lib.ParallelConfig]) -> Callable:
    return jax.jit(functools.partial(train_lib.eval_step, model_cfg=model_cfg, parallel=parallel))


def knock_out(params: dict, layer: int, expert: int) -> dict:
    """params with expert `expert` of MoE layer `layer` giving zero output (w2 and b2 zeroed)."""
    experts = params[f"block_{layer}"]["moe"]["experts"]
    changed = {**experts, "w2": experts["w2"].at[expert].set(0), "b2": experts["b2"].at[expert].set(0)}
    return _with_experts(params, layer, changed)


def most_similar_pair(params: dict, layer: int) -> tuple[int, int, float]:
    """(a, b, cosine) of the two experts of `layer` whose flattened weights are most alike."""
    experts = params[f"block_{layer}"]["moe"]["experts"]
    flat = np.concatenate([np.asarray(experts[name], np.float64).reshape(experts[name].shape[0], -1)
                           for name in ("w1", "w2")], axis=1)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    cosine = flat @ flat.T
    np.fill_diagonal(cosine, -np.inf)
    a, b = np.unravel_index(np.argmax(cosine), cosine.shape)
    return int(min(a, b)), int(max(a, b)), float(cosine[a, b])


def merge(params: dict, layer: int, a: int, b: int) -> dict:
    """params with experts a and b of `layer` both replaced by their average."""
    experts = params[f"block_{layer}"]["moe"]["experts"]
    changed = {name: value.at[jnp.array([a, b])].set(jnp.mean(value[jnp.array([a, b])], axis=0))
               for name, value in experts.items()}
    return _with_experts(params, layer, changed)


def _with_experts(params: dict, layer: int, experts: dict) -> dict:
    block = params[f"block_{layer}"]
    return {**params, f"block_{layer}": {**block, "moe": {**block["moe"], "experts": experts}}}


def routing_variants(model_cfg: ModelConfig) -> list[tuple[str, ModelConfig, Optional[bool]]]:
    """(label, model config, deterministic) of the routing interventions that apply to the model."""
    moe = model_cfg.moe
    out: list[tuple[str, ModelConfig, Optional[bool]]] = [("deterministic routing", model_cfg, True)]
    for cf in (0.5, 2.0):
        if cf != moe.eval_capacity_factor:
            out.append((f"eval capacity factor {cf:g}", replace_moe(model_cfg, eval_capacity_factor=cf), None))
    if moe.drop_tokens:
        out.append(("no token dropped", replace_moe(model_cfg, drop_tokens=False), None))
    if moe.router == "topk" and not moe.residual:
        out.append((f"k={moe.k + 1}", replace_moe(model_cfg, k=moe.k + 1), None))
    if moe.router != "expert_choice" and moe.bias_update_rate == 0:
        out.append(("expert-choice router", replace_moe(model_cfg, router="expert_choice", use_rts=False), None))
    return out


def run_interventions(run: FrozenRun, kinds: Iterable[str] = ("routing", "knockout", "merge"),
                      log: Callable[[str], None] = print) -> list[dict]:
    """Rows {kind, intervention, layer, expert, test_loss, delta} (module docstring); the first row
    is the unchanged model."""
    base = test_loss(run)
    rows = [{"kind": "none", "intervention": "the run as trained", "layer": None, "expert": None,
             "test_loss": base, "delta": 0.0}]
    log(f"unchanged: test loss {base:.4f} over {len(run.batches)} batches")

    def add(kind, label, loss, layer=None, expert=None):
        rows.append({"kind": kind, "intervention": label, "layer": layer, "expert": expert, "test_loss": loss,
                     "delta": loss - base})
        log(f"{label}: {loss:.4f} ({loss - base:+.4f})")

    kinds = set(kinds)
    if "routing" in kinds:
        for label, cfg, deterministic in routing_variants(run.model_cfg):
            add("routing", label, test_loss(run, cfg, deterministic=deterministic))
    layers = [i for i, e in enumerate(run.model_cfg.layer_experts()) if e]
    if "knockout" in kinds:
        for layer in layers:
            for expert in range(run.model_cfg.layer_experts()[layer]):
                add("knockout", f"layer {layer} expert {expert} knocked out",
                    test_loss(run, params=knock_out(run.params, layer, expert)), layer, expert)
    if "merge" in kinds:
        for layer in layers:
            a, b, cosine = most_similar_pair(run.params, layer)
            add("merge", f"layer {layer} experts {a}+{b} merged (cosine {cosine:.3f})",
                test_loss(run, params=merge(run.params, layer, a, b)), layer, f"{a}+{b}")
    return rows


def markdown(rows: list[dict], run_label: str) -> str:
    """The routing and merge rows as a table, and the knockouts as a layer x expert table of deltas."""
    base = rows[0]["test_loss"]
    lines = [f"Counterfactual routing of {run_label} (test loss {base:.4f} as trained; change in nats):", "",
             "| intervention | test loss | change |", "|---|---|---|"]
    lines += [f"| {r['intervention']} | {r['test_loss']:.4f} | {r['delta']:+.4f} |"
              for r in rows[1:] if r["kind"] in ("routing", "merge")]
    knock = [r for r in rows if r["kind"] == "knockout"]
    if knock:
        layers = sorted({r["layer"] for r in knock})
        width = max(r["expert"] for r in knock) + 1
        lines += ["", "Knocking out one expert (change in test loss):", "",
                  "| layer | " + " | ".join(f"e{e}" for e in range(width)) + " | largest |",
                  "|---" * (width + 2) + "|"]
        for layer in layers:
            cells = {r["expert"]: r["delta"] for r in knock if r["layer"] == layer}
            worst = max(cells, key=cells.get)
            lines.append(f"| {layer} | " + " | ".join(f"{cells[e]:+.4f}" if e in cells else "" for e in range(width))
                         + f" | e{worst} |")
    return "\n".join(lines) + "\n"
