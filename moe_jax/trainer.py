"""The training loop behind experiments/train.py: `train_and_evaluate(config, workdir)`.

`config` is an ml_collections.ConfigDict with groups model, moe, data, optim, mesh and top-level
seed, total_steps, log_every_steps, eval_every_steps, checkpoint_every_steps, keep_checkpoints,
eval_batches (`default_config(scale)` builds one). Resume order: the latest complete checkpoint in
workdir, else a fresh start. A resumed run repeats the losses of an uninterrupted one exactly
(batches and random keys are functions of the seed and the step).

Workdir outputs: config.json, metrics.jsonl (one JSON object per logged step), tensorboard/,
checkpoints/, and results.json at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config as config_lib
from moe_jax import corpus as corpus_lib
from moe_jax import data as data_lib
from moe_jax import metrics as metrics_lib
from moe_jax import model as model_lib
from moe_jax import parallel as parallel_lib
from moe_jax import train_lib


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...). The message says where and what to do."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

_SCALES = {
    # model preset, batch, seq, steps, lr, min lr, warmup
    "tiny": ("tiny", 16, 128, 300, 2e-3, 2e-4, 30),
    "350m": ("350m", 256, 2048, 572_000, 3e-4, 3e-5, 2_000),
    "1.3b": ("1.3b", 512, 2048, 286_000, 2e-4, 2e-5, 2_000),
}


def default_config(scale: str = "tiny") -> ml_collections.ConfigDict:
    """A dense GPT at the given scale ("tiny", "350m", "1.3b"); configs add the MoE part."""
    if scale not in _SCALES:
        raise ValueError(f"scale {scale!r} is unknown; use one of {sorted(_SCALES)}")
    preset, batch, seq, steps, lr, min_lr, warmup = _SCALES[scale]
    base = config_lib.preset(preset)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = steps
    c.log_every_steps = 10 if scale == "tiny" else 100
    c.eval_every_steps = 100 if scale == "tiny" else 2000
    c.eval_batches = 8 if scale == "tiny" else 50
    c.checkpoint_every_steps = 100 if scale == "tiny" else 2000
    c.keep_checkpoints = 3
    c.stop_after_steps = 0  # > 0: end this run at that step (checkpointed); rerun to continue

    c.model = ml_collections.ConfigDict({
        "vocab_size": base.vocab_size, "num_layers": base.num_layers, "hidden_size": base.hidden_size,
        "num_heads": base.num_heads, "ffn_size": base.ffn_size, "max_seq_len": max(seq, 16),
        "dropout": 0.0, "init_std": base.init_std, "param_dtype": "float32",
        "compute_dtype": "float32" if scale == "tiny" else "bfloat16",
    })
    moe = config_lib.MoEConfig()
    c.moe = ml_collections.ConfigDict({
        "experts": "0",  # "0": dense model; "128"; pyramid "32x10,64x2"
        "placement": moe.placement, "expert_interval": moe.expert_interval, "layers": "",
        "k": moe.k, "capacity_factor": moe.capacity_factor, "eval_capacity_factor": moe.eval_capacity_factor,
        "min_capacity": moe.min_capacity, "drop_tokens": moe.drop_tokens, "use_rts": moe.use_rts,
        "noisy_gate_policy": "", "second_expert_sampling": moe.second_expert_sampling,
        "drop_policy": moe.drop_policy, "residual": False, "aux_loss_coef": moe.aux_loss_coef,
        "z_loss_coef": moe.z_loss_coef, "dispatch": moe.dispatch,
    })
    c.data = ml_collections.ConfigDict({
        "path": "",  # "": the Python standard library's source; or a text file, a glob, a .bin
        "batch_size": batch, "seq_len": seq, "max_bytes": 8 * 2 ** 20, "val_percent": 5.0,
        "vocab_size": 0,  # .bin token files only; 0: read from the file
    })
    c.optim = ml_collections.ConfigDict({
        "learning_rate": lr, "min_learning_rate": min_lr, "warmup_steps": warmup, "b1": 0.9, "b2": 0.95,
        "eps": 1e-8, "weight_decay": 0.1, "clip_norm": 1.0,
    })
    # Device mesh (moe_jax.parallel): data x expert x tensor must equal the device count (-1 fills).
    # expert_nodes > 1 splits the expert axis into inter-node groups (hierarchical exchange).
    c.mesh = ml_collections.ConfigDict({"data": -1, "expert": 1, "tensor": 1, "expert_nodes": 1,
                                        "exchange": "flat", "expert_slicing": False})
    return c


def model_config(config: ml_collections.ConfigDict, vocab_size: Optional[int] = None) -> config_lib.ModelConfig:
    """The validated ModelConfig for a run config (ValueError names the bad field)."""
    model = dict(config.model)
    if vocab_size is not None:
        model["vocab_size"] = max(model["vocab_size"], vocab_size)
    m = config.moe
    experts = config_lib.parse_expert_list(str(m.experts))
    dense = experts == 0 or (isinstance(experts, tuple) and not any(e > 1 for e in experts))
    moe = None
    if not dense:
        layers = tuple(int(i) for i in str(m.layers).replace(" ", "").split(",") if i) if m.layers else ()
        moe = config_lib.MoEConfig(
            experts=experts, placement=m.placement, expert_interval=m.expert_interval, layers=layers,
            k=m.k, capacity_factor=m.capacity_factor, eval_capacity_factor=m.eval_capacity_factor,
            min_capacity=m.min_capacity, drop_tokens=m.drop_tokens, use_rts=m.use_rts,
            noisy_gate_policy=m.noisy_gate_policy or None, second_expert_sampling=m.second_expert_sampling,
            drop_policy=m.drop_policy, residual=m.residual, aux_loss_coef=m.aux_loss_coef,
            z_loss_coef=m.z_loss_coef, dispatch=m.dispatch)
    return config_lib.ModelConfig(moe=moe, **model)


def parallel_config(config: ml_collections.ConfigDict) -> Optional[parallel_lib.ParallelConfig]:
    """The mesh of a run, or None on a single device (no mesh, no shard_map)."""
    m = config.mesh
    if jax.device_count() == 1 and m.expert in (1, -1) and m.tensor in (1, -1):
        return None
    mesh = parallel_lib.make_mesh(m.data, m.expert, m.tensor, m.get("expert_nodes", 1))
    return parallel_lib.ParallelConfig(mesh, exchange=m.get("exchange", "flat"),
                                       expert_slicing=m.get("expert_slicing", False))


def optim_config(config: ml_collections.ConfigDict) -> train_lib.OptimConfig:
    return train_lib.OptimConfig(total_steps=config.total_steps, **dict(config.optim))


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a run config before anything is built; ValueError names the field."""
    if config.get("stop_after_steps", 0) < 0:
        raise ValueError(f"stop_after_steps={config.stop_after_steps} must be >= 0 (0: run to total_steps)")
    for name in ("total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                 "keep_checkpoints"):
        if config[name] < 1:
            raise ValueError(f"{name}={config[name]} must be >= 1")
    if config.data.batch_size < 1 or config.data.seq_len < 1:
        raise ValueError("data.batch_size and data.seq_len must be >= 1")
    if config.data.seq_len > config.model.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={config.model.max_seq_len}; "
                         "raise model.max_seq_len or shorten data.seq_len")
    model_config(config)
    optim_config(config)
    if config.mesh.get("exchange", "flat") not in parallel_lib.EXCHANGES:
        raise ValueError(f"mesh.exchange={config.mesh.exchange!r} is unknown; use one of {parallel_lib.EXCHANGES}")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _layer_stats(moe_layers: dict) -> dict:
    """Per MoE layer: token counts, dropped fraction and load imbalance (host side)."""
    out = {}
    for layer, stats in moe_layers.items():
        counts = np.asarray(stats["expert_counts"])
        load = metrics_lib.expert_load_stats(counts, np.asarray(stats["kept_counts"]))
        out[f"layer{layer}"] = {"dropped_fraction": float(stats["dropped_fraction"]),
                                "load_imbalance": load["load_imbalance"], "expert_counts": counts.tolist()}
    return out


def evaluate(params, eval_data: list, eval_fn) -> dict:
    nll, tokens = 0.0, 0.0
    for batch in eval_data:
        out = eval_fn(params, batch)
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    val_loss = nll / tokens
    return {"val_loss": val_loss, "val_bpb": train_lib.bits_per_byte(val_loss)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       loss_hook: Optional[train_lib.LossHook] = None, hook_inputs=None) -> dict:
    """Trains (resuming from workdir when it holds a checkpoint), evaluates, writes metrics.
    Returns a summary dict (also written to workdir/results.json).

    loss_hook / hook_inputs add a term to the training loss (see train_lib.train_step); its metrics
    are logged with the others. Mixture-of-Students distillation uses this."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)

    # --- Data ------------------------------------------------------------------------------------
    corpus = corpus_lib.load_corpus(config.data.path or None, max_bytes=config.data.max_bytes or None,
                                    val_percent=config.data.val_percent, vocab_size=config.data.vocab_size or None)
    logging.info("corpus: %s", corpus.description)
    model_cfg = model_config(config, vocab_size=corpus.vocab_size)
    optim_cfg = optim_config(config)
    counts = model_lib.count_params(model_cfg)
    logging.info("model: %s, layer experts %s", counts, model_cfg.layer_experts())

    # --- Model, optimizer, step functions ---------------------------------------------------------
    optimizer = train_lib.make_optimizer(optim_cfg)
    schedule = train_lib.learning_rate_schedule(optim_cfg)
    rng = jax.random.key(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    par = parallel_config(config)
    abstract = train_lib.abstract_state(init_rng, model_cfg, optimizer)
    state_shardings = None
    if par is not None:
        parallel_lib.validate(model_cfg, par, config.data.batch_size)
        state_shardings = parallel_lib.shardings(parallel_lib.param_specs(abstract, par), par.mesh)
        logging.info("mesh %s, exchange %s, expert slicing %s", dict(par.mesh.shape), par.exchange,
                     par.expert_slicing)
    train_step = jax.jit(functools.partial(train_lib.train_step, model_cfg=model_cfg, optimizer=optimizer,
                                           schedule=schedule, loss_hook=loss_hook, parallel=par),
                         donate_argnums=(0,), out_shardings=(state_shardings, None) if par else None)
    eval_fn = jax.jit(functools.partial(train_lib.eval_step, model_cfg=model_cfg, parallel=par))
    place = (lambda batch: parallel_lib.device_put_batch(batch, par)) if par else (lambda batch: batch)

    # --- Checkpoint: resume first ---------------------------------------------------------------
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    start_step = ckpt.latest_step()
    if start_step is not None:
        target = abstract
        if state_shardings is not None:
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, state_shardings)
        state, _ = ckpt.restore(start_step, target=target)
        logging.info("resumed from %s/checkpoints at step %d", workdir, start_step)
    else:
        state = jax.jit(lambda r: train_lib.init_state(r, model_cfg, optimizer),
                        out_shardings=state_shardings)(init_rng)
        start_step = 0
    last_good = start_step if start_step else None

    writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
    writer.write_config({"config": config.to_dict(), "model": dataclasses.asdict(model_cfg),
                         "params_total": counts.total, "params_active": counts.active,
                         "corpus": corpus.description, "jax": jax.__version__})
    batches = data_lib.BatchIterator(corpus.train, batch_size=config.data.batch_size, seq_len=config.data.seq_len,
                                     seed=config.seed, start_step=start_step,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    eval_data = [place(batch) for batch in data_lib.eval_batches(
        corpus.val, batch_size=config.data.batch_size, seq_len=config.data.seq_len,
        max_batches=config.eval_batches, process_index=jax.process_index(), process_count=jax.process_count())]
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_token = metrics_lib.transformer_flops_per_token(
        counts.active, model_cfg.num_layers, model_cfg.hidden_size, config.data.seq_len)
    peak = metrics_lib.peak_flops_per_device() * jax.device_count()
    progress = metrics_lib.Progress(config.total_steps, start_step=start_step)

    # --- Train loop ------------------------------------------------------------------------------
    pending = []  # (step, loss) device scalars since the last check: checked without a per-step sync
    window_start, window_steps = time.perf_counter(), 0
    eval_metrics: dict = {}
    step_time, tokens_per_sec = float("nan"), float("nan")
    compile_free_start: Optional[float] = None
    try:
        last_step = config.total_steps
        if config.get("stop_after_steps", 0) > 0:
            last_step = min(last_step, config.stop_after_steps)
        for step in range(start_step + 1, last_step + 1):
            batch = place(next(batches))
            state, step_metrics = train_step(state, batch, train_rng, hook_inputs)
            pending.append((step, step_metrics["loss"]))
            window_steps += 1
            if compile_free_start is None:
                jax.block_until_ready(step_metrics["loss"])
                compile_free_start, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
            is_last = step == last_step
            if step % config.log_every_steps == 0 or step % config.checkpoint_every_steps == 0 or is_last:
                _check_finite(pending, last_good, workdir)
                pending.clear()
            if step % config.log_every_steps == 0 or is_last:
                host = jax.device_get(step_metrics)
                elapsed = time.perf_counter() - window_start
                if window_steps:
                    step_time = elapsed / window_steps
                    tokens_per_sec = tokens_per_step / step_time
                record = {name: float(value) for name, value in host.items() if name != "moe_layers"}
                record.update({"tokens_per_sec": tokens_per_sec, "step_time_s": step_time,
                               "mfu": metrics_lib.mfu(flops_per_token, tokens_per_sec, peak),
                               "moe": _layer_stats(host["moe_layers"])})
                if step % config.eval_every_steps == 0 or is_last:
                    eval_metrics = evaluate(state["params"], eval_data, eval_fn)
                    record.update(eval_metrics)
                writer.write(step, record)
                progress.update(step, record["loss"], tokens_per_sec)
                window_start, window_steps = time.perf_counter(), 0
            if step % config.checkpoint_every_steps == 0 or is_last:
                ckpt.save(step, state, extra={"data_step": batches.step})
                last_good = step
        ckpt.wait()
    finally:
        progress.close()
        writer.close()
        ckpt.close()

    if not eval_metrics:  # resumed at the end: evaluate the restored state
        eval_metrics = evaluate(state["params"], eval_data, eval_fn)
    summary = {
        "steps": int(jax.device_get(state["step"])), "params_total": counts.total, "params_active": counts.active,
        "tokens_per_sec": tokens_per_sec, "step_time_s": step_time, **eval_metrics,
        "layer_experts": list(model_cfg.layer_experts()), "corpus": corpus.description,
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _check_finite(pending: list, last_good: Optional[int], workdir: str) -> None:
    values = jax.device_get([loss for _, loss in pending])
    for (step, _), loss in zip(pending, values):
        if not math.isfinite(float(loss)):
            where = (f"the last good checkpoint is step {last_good} in {workdir}/checkpoints"
                     if last_good else "no checkpoint was written yet")
            raise TrainingError(
                f"loss became {float(loss)} at step {step}; {where}. Lower optim.learning_rate or "
                "check the data, then rerun with the same --workdir to resume from that checkpoint.")


def format_summary(summary: dict) -> str:
    rows = [
        ("steps", f"{summary['steps']}"),
        ("parameters (total / active)", f"{summary['params_total']:,} / {summary['params_active']:,}"),
        ("validation loss (nats/token)", f"{summary['val_loss']:.4f}"),
        ("validation bits per byte", f"{summary['val_bpb']:.4f}"),
        ("tokens / s", f"{summary['tokens_per_sec']:.0f}"),
        ("layer experts", " ".join(str(e) for e in summary["layer_experts"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def load_config_file(name: str, arg: str = "tiny") -> ml_collections.ConfigDict:
    """get_config(arg) of experiments/configs/<name>.py (a file path works too), as --config does."""
    import importlib.util

    path = name if name.endswith(".py") else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs", f"{name}.py")
    if not os.path.exists(path):
        raise ValueError(f"config {name!r} not found at {path}; use a file of experiments/configs/")
    spec = importlib.util.spec_from_file_location(f"moe_jax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
