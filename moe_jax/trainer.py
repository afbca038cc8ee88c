"""The training loop behind experiments/train.py: `train_and_evaluate(config, workdir)` (files, data,
checkpoints, logging; the pure, jitted step functions it runs are moe_jax.train_lib).

`config` is an ml_collections.ConfigDict with groups model, moe, data, optim, mesh and top-level
seed, total_steps, log_every_steps, eval_every_steps, checkpoint_every_steps, keep_checkpoints,
eval_batches, deterministic_eval, init_from (`moe_jax.run_config.default_config(scale)` builds one).

Evaluation routes as DeepSpeed's does (random token selection, top-2's Gumbel-sampled second
expert) with fixed keys (train_lib.eval_rng), so every evaluation of every run sees the same noise;
config.deterministic_eval=True routes without noise.

Start order, the only one:
  1. the latest complete checkpoint in workdir/checkpoints that reads back whole (a damaged newer
     one is set aside with a warning naming its step): parameters, optimizer state, step (and
     the routers' selection biases under aux-loss-free balancing),
     after checking that the seed, batch size and sequence length are the ones it was trained with;
  2. else the parameters of another run, `config.init_from` (its workdir or checkpoint directory;
     parameters only, a ValueError names a parameter whose shape differs; a dense run into an MoE
     model is upcycled, moe_jax.upcycle, with config.init_from_noise), or those that the
     caller's `init_params` returns (a distillation student built from its teacher's layers),
     with a fresh optimizer state (and zero selection biases) at step 0;
  3. else a fresh initialisation from the seed.
A resumed run repeats the losses of an uninterrupted one exactly (batches and random keys are
functions of the seed and the step).

Workdir outputs: config.json, metrics.jsonl (one JSON object per logged step), tensorboard/,
checkpoints/, routing/ (routing traces: the probe batch's expert choices at every evaluation, and
with config.record_routing every training step's; moe_jax.routing_trace), and results.json at the end.
config.replay_routing=<a recorded run> routes every training step with that run's recorded choices.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from moe_jax import balancing
from moe_jax import checkpoint as checkpoint_lib
from moe_jax import corpus as corpus_lib
from moe_jax import data as data_lib
from moe_jax import diagnostics
from moe_jax import load_stats
from moe_jax import metrics as metrics_lib
from moe_jax import model as model_lib
from moe_jax import parallel as parallel_lib
from moe_jax import routing_trace
from moe_jax import run_config
from moe_jax import train_lib
from moe_jax import upcycle


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...). The message says where and what to do."""


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _layer_stats(moe_layers: dict, window_counts: Optional[dict] = None) -> dict:
    """Per MoE layer (host side): the logged step's token counts, dropped fraction, fraction of
    tokens with no expert, router entropy and load imbalance, and over the logging window
    (window_counts: each layer's expert counts summed over the window's steps) the load percentiles
    (tokens per expert) and the dead experts (no token in the whole window)."""
    out = {}
    for layer, stats in moe_layers.items():
        counts = np.asarray(stats["expert_counts"])
        load = load_stats.expert_load_stats(counts, np.asarray(stats["kept_counts"]))
        window = counts if window_counts is None else np.asarray(window_counts[layer])
        window_load = load_stats.expert_load_stats(window)
        out[f"layer{layer}"] = {
            "dropped_fraction": float(stats["dropped_fraction"]),
            "unrouted_fraction": float(stats["unrouted_fraction"]),
            "router_entropy": float(stats["router_entropy"]),
            "load_imbalance": load["load_imbalance"], "expert_counts": counts.tolist(),
            "window_load_min": window_load["load_min"], "window_load_median": window_load["load_median"],
            "window_load_max": window_load["load_max"], "dead_experts": window_load["dead_experts"]}
    return out


def _add_window_counts(window_counts: Optional[dict], moe_layers: dict) -> dict:
    """Each layer's expert counts added to the window's running sums (on device: no host sync)."""
    step_counts = {layer: stats["expert_counts"] for layer, stats in moe_layers.items()}
    if window_counts is None:
        return step_counts
    return {layer: window_counts[layer] + counts for layer, counts in step_counts.items()}


def evaluate(params, eval_data: list, eval_fn, bits_metric: str = "val_bpb", eval_keys: Optional[list] = None,
             on_probe: Optional[Callable[[dict], None]] = None, prefix: str = "val") -> dict:
    """Loss over eval_data as {prefix}_loss and bits_metric; eval_keys[i] is batch i's 'gating' key
    (None: deterministic). on_probe receives batch 0's routing codes when eval_fn records them (the
    probe batch)."""
    nll, tokens = 0.0, 0.0
    for i, batch in enumerate(eval_data):
        out = eval_fn(params, batch, None if eval_keys is None else eval_keys[i])
        if i == 0 and on_probe is not None and out.get("routing"):
            on_probe(out["routing"])
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    loss = nll / tokens
    return {f"{prefix}_loss": loss, bits_metric: train_lib.nats_to_bits(loss), f"{prefix}_tokens": int(tokens)}


def evaluate_test(params, corpus, config, eval_fn, place=lambda batch: batch) -> dict:
    """The final evaluation: every target of the test split once (moe_jax.data.split_batches), the
    same windows for every run of a corpus, batch i routed with the fixed key train_lib.eval_rng(i)
    (DeepSpeed's eval routing; config.deterministic_eval: none). The last batch's padding rows
    (masked out of the loss) are routed with the real tokens, as any batch's tokens are. Returns
    test_loss, test bits, test_tokens, test_windows and test_eval_s (its cost)."""
    start = time.perf_counter()
    batches = data_lib.split_batches(corpus.test, batch_size=config.data.batch_size, seq_len=config.data.seq_len,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    keys = None if config.get("deterministic_eval", False) else [train_lib.eval_rng(i) for i in range(len(batches))]
    bits = corpus.bits_metric.replace("val_", "test_", 1)
    metrics = evaluate(params, [place(batch) for batch in batches], eval_fn, bits, keys, prefix="test")
    metrics["test_windows"] = -(-(len(corpus.test) - 1) // config.data.seq_len)
    metrics["test_eval_s"] = time.perf_counter() - start
    logging.info("test split: %d windows, %d targets, loss %.4f, %.1f s", metrics["test_windows"],
                 metrics["test_tokens"], metrics["test_loss"], metrics["test_eval_s"])
    return metrics


def _replay_reader(config, model_cfg) -> Optional[routing_trace.TraceReader]:
    """The recorded run that config.replay_routing names, checked against this model's MoE layers."""
    path = config.get("replay_routing", "")
    if not path:
        return None
    try:
        reader = routing_trace.TraceReader(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"config.replay_routing={path}: {error}") from None
    last = min(config.total_steps, config.get("stop_after_steps", 0) or config.total_steps)
    try:
        reader.check_covers(1, last)
    except ValueError as error:
        raise ValueError(f"config.replay_routing={path}: {error}") from None
    codes = reader.codes(reader.steps[0])
    layers = {f"block_{i}" for i, experts in enumerate(model_cfg.layer_experts()) if experts}
    if set(codes) != layers:
        raise ValueError(f"config.replay_routing={path} recorded the MoE layers {sorted(codes)}, this model has "
                         f"{sorted(layers)}; replay a run of the same architecture")
    return reader


def _with_router_state(eval_fn, state: dict):
    """eval_fn reading the state's selection biases (aux-loss-free balancing), if it has any."""
    if "router_state" not in state:
        return eval_fn
    return functools.partial(eval_fn, router_state=state["router_state"])


# The config fields that fix the batch sequence, as checkpoint extras (with the data step).
_DATA_FIELDS = {"seed": "seed", "batch_size": "data.batch_size", "seq_len": "data.seq_len"}


def _data_position(config: ml_collections.ConfigDict) -> dict:
    return {"seed": config.seed, "batch_size": config.data.batch_size, "seq_len": config.data.seq_len}


def _with_shardings(abstract, shardings):
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _check_data_position(extra: dict, config: ml_collections.ConfigDict, step: int, directory) -> None:
    """A resumed run sees the batches of an uninterrupted one only with the seed, batch size and
    sequence length that the checkpoint was trained with, at the checkpoint's step."""
    for key, current in _data_position(config).items():
        saved, name = extra.get(key), _DATA_FIELDS[key]
        if saved is not None and saved != current:
            raise ValueError(f"the checkpoint at step {step} in {directory} was trained with {name}={saved}, this run "
                             f"has {name}={current}: resuming would not continue its batch sequence; rerun with "
                             f"--config.{name}={saved}, or use a new --workdir")
    if extra.get("data_step", step) != step:
        raise ValueError(f"the checkpoint at step {step} in {directory} records data position {extra['data_step']}; "
                         "it is inconsistent: delete that step directory or use a new --workdir")


def _start_state(config, ckpt, abstract, shardings, init_rng, model_cfg, optimizer, init_params):
    """(state, start step) in the module docstring's start order."""
    shard = (lambda name: None) if shardings is None else (lambda name: shardings[name])
    names = ("params", "opt_state", "router_state") if "router_state" in abstract else ("params", "opt_state")
    target = {name: _with_shardings(abstract[name], shard(name)) for name in names}
    # the newest step that reads back whole: a damaged newer one is set aside with a warning
    items, extra, start_step = ckpt.restore_latest(target)
    if start_step is not None:
        _check_data_position(extra, config, start_step, ckpt.directory)
        step = jax.jit(lambda: jnp.asarray(start_step, jnp.int32), out_shardings=shard("step"))()
        logging.info("resumed from %s at step %d", ckpt.directory, start_step)
        return {**items, "step": step}, start_step
    init_from = config.get("init_from", "")
    if init_from and init_params is not None:
        raise ValueError(f"config.init_from={init_from} and this run's own initial parameters (e.g. "
                         "kd.init_from_teacher_layers) both set where a run starts; keep one")
    if init_from:
        try:
            if upcycle.is_dense(checkpoint_lib.saved_params_shapes(init_from)) and not upcycle.is_dense(
                    abstract["params"]):  # a dense run seeds this MoE model: upcycling
                dense, step = checkpoint_lib.load_params(init_from, "saved")
                params = jax.jit(lambda d: upcycle.upcycle_params(d, model_cfg, init_rng,
                                                                  noise=config.get("init_from_noise", 0.0)),
                                 out_shardings=shard("params"))(dense)
                logging.info("upcycled from the dense run %s at step %d", init_from, step)
            else:
                params, step = checkpoint_lib.load_params(init_from,
                                                          _with_shardings(abstract["params"], shard("params")))
                logging.info("parameters from %s at step %d", init_from, step)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"config.init_from={init_from}: {error}") from None
    elif init_params is not None:
        params = init_params()
        if shardings is not None:
            params = jax.device_put(params, shardings["params"])
    else:
        return jax.jit(lambda r: train_lib.init_state(r, model_cfg, optimizer), out_shardings=shardings)(init_rng), 0
    fresh = lambda p: {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32),  # noqa: E731
                       **({"router_state": balancing.init_router_state(model_cfg)} if "router_state" in abstract
                          else {})}
    return jax.jit(fresh, out_shardings=shardings)(params), 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       loss_hook: Optional[train_lib.LossHook] = None, hook_inputs=None,
                       init_params: Optional[Callable[[], Any]] = None) -> dict:
    """Trains (in the module docstring's start order), evaluates, writes metrics. Returns a summary
    dict (also written to workdir/results.json).

    loss_hook / hook_inputs add a term to the training loss (see train_lib.train_step); its metrics
    are logged with the others. init_params() returns the parameters to start from when workdir
    has no checkpoint. Mixture-of-Students distillation uses both."""
    run_config.validate(config)
    os.makedirs(workdir, exist_ok=True)

    # --- Data ------------------------------------------------------------------------------------
    corpus = corpus_lib.load_corpus(config.data.path or None, max_bytes=config.data.max_bytes or None,
                                    val_percent=config.data.val_percent, vocab_size=config.data.vocab_size or None)
    logging.info("corpus: %s", corpus.description)
    model_cfg = run_config.model_config(config, vocab_size=corpus.vocab_size)
    optim_cfg = run_config.optim_config(config)
    counts = model_lib.count_params(model_cfg)
    logging.info("model: %s, layer experts %s", counts, model_cfg.layer_experts())

    # --- Model, optimizer, step functions ---------------------------------------------------------
    optimizer = train_lib.make_optimizer(optim_cfg)
    schedule = train_lib.learning_rate_schedule(optim_cfg)
    rng = jax.random.key(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    par = run_config.parallel_config(config)
    abstract = train_lib.abstract_state(init_rng, model_cfg, optimizer)
    state_shardings = None
    if par is not None:
        parallel_lib.validate(model_cfg, par, config.data.batch_size)
        state_shardings = parallel_lib.shardings(parallel_lib.state_specs(abstract, par, optimizer), par.mesh)
        logging.info("mesh %s, exchange %s, expert slicing %s, optimizer state sharded %s", dict(par.mesh.shape),
                     par.exchange, par.expert_slicing, par.shard_optimizer)
    # routing traces (moe_jax.routing_trace): the probe batch at evaluations, every training step
    # with config.record_routing, a recorded run's codes with config.replay_routing
    is_moe = any(model_cfg.layer_experts())
    record_probe = is_moe and config.get("routing_probe", True) and jax.process_count() == 1
    record_train = bool(config.get("record_routing", False))
    replay = _replay_reader(config, model_cfg)
    if (record_train or replay is not None) and jax.process_count() > 1:
        raise ValueError("config.record_routing / config.replay_routing run in one process only (the trace holds "
                         "the global batch); unset them for a multi-process run")
    train_step = jax.jit(functools.partial(train_lib.train_step, model_cfg=model_cfg, optimizer=optimizer,
                                           schedule=schedule, loss_hook=loss_hook, parallel=par,
                                           record_routing=record_train and is_moe),
                         donate_argnums=(0,), out_shardings=(state_shardings, None) if par else None)
    eval_fn = jax.jit(functools.partial(train_lib.eval_step, model_cfg=model_cfg, parallel=par,
                                        record_routing=record_probe))
    diagnose = None  # router gradient diagnostics at each evaluation (moe_jax.diagnostics)
    if is_moe and config.get("router_diagnostics", True):
        diagnose = jax.jit(functools.partial(diagnostics.router_gradients, model_cfg=model_cfg, parallel=par))
    place = (lambda batch: parallel_lib.device_put_batch(batch, par)) if par else (lambda batch: batch)
    if par is not None and hook_inputs is not None:  # e.g. a teacher's parameters: placed by the same rules
        hook_inputs = jax.device_put(hook_inputs, parallel_lib.shardings(parallel_lib.param_specs(hook_inputs, par),
                                                                         par.mesh))

    # --- Start: this workdir's checkpoint, else init_from / init_params, else fresh -------------
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR),
                                       keep=config.keep_checkpoints)
    try:
        state, start_step = _start_state(config, ckpt, abstract, state_shardings, init_rng, model_cfg, optimizer,
                                         init_params)
    except BaseException:
        ckpt.close()
        raise
    last_good = start_step if start_step else None
    trace_writer = routing_trace.TraceWriter(workdir) if record_train and is_moe else None

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
    # DeepSpeed routes evaluation with RTS and top-2's sampled second expert: a fixed key per batch
    # keeps every evaluation replayable; config.deterministic_eval routes without noise instead
    eval_keys = None if config.get("deterministic_eval", False) else [train_lib.eval_rng(i)
                                                                        for i in range(len(eval_data))]
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_token = metrics_lib.transformer_flops_per_token(
        counts.active, model_cfg.num_layers, model_cfg.hidden_size, config.data.seq_len)
    peak = metrics_lib.peak_flops_per_device() * jax.device_count()

    layer_experts = {f"block_{i}": e for i, e in enumerate(model_cfg.layer_experts()) if e}

    def probe_writer(step):
        if not record_probe:
            return None
        tokens = eval_data[0]["inputs"]
        return lambda codes: routing_trace.write_probe(workdir, step, jax.device_get(tokens), jax.device_get(codes),
                                                       layer_experts)

    # --- Train loop ------------------------------------------------------------------------------
    pending = []  # (step, loss) device scalars since the last check: checked without a per-step sync
    window_start, window_steps = time.perf_counter(), 0
    window_counts = None  # each MoE layer's expert counts summed over the logging window (on device)
    eval_metrics: dict = {}
    step_time, tokens_per_sec = float("nan"), float("nan")
    compile_free_start: Optional[float] = None
    try:
        last_step = config.total_steps
        if config.get("stop_after_steps", 0) > 0:
            last_step = min(last_step, config.stop_after_steps)
        for step in range(start_step + 1, last_step + 1):
            batch = next(batches)
            if replay is not None:
                batch = {**batch, "routing": replay.codes(step)}
            state, step_metrics = train_step(state, place(batch), train_rng, hook_inputs)
            if trace_writer is not None:
                trace_writer.add(step, jax.device_get(step_metrics.pop("routing")))
            window_counts = _add_window_counts(window_counts, step_metrics["moe_layers"])
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
                               "moe": _layer_stats(host["moe_layers"], jax.device_get(window_counts))})
                window_counts = None
                if step % config.eval_every_steps == 0 or is_last:
                    eval_metrics = evaluate(state["params"], eval_data, _with_router_state(eval_fn, state),
                                            corpus.bits_metric, eval_keys, on_probe=probe_writer(step))
                    record.update(eval_metrics)
                    if diagnose is not None:
                        grads = jax.device_get(diagnose(state["params"], eval_data[0], rng=train_lib.eval_rng(0),
                                                        router_state=state.get("router_state")))
                        record["router_grad"] = {f"layer{layer}": stats for layer, stats in grads.items()}
                writer.write(step, record)
                if jax.process_index() == 0:
                    logging.info("%s", progress_line(step, config.total_steps, last_step, record["loss"],
                                                     tokens_per_sec, step_time))
                window_start, window_steps = time.perf_counter(), 0
            if step % config.checkpoint_every_steps == 0 or is_last:
                saved = ("params", "opt_state", "router_state")  # router_state: loss-free balancing's biases
                if trace_writer is not None:  # the steps up to this checkpoint, before it is written
                    trace_writer.flush()
                ckpt.save(step, {name: state[name] for name in saved if name in state},
                          extra={"data_step": batches.step, **_data_position(config)})
                last_good = step
    finally:
        writer.close()
        ckpt.close()

    if not eval_metrics:  # resumed at the end: evaluate the restored state
        eval_metrics = evaluate(state["params"], eval_data, _with_router_state(eval_fn, state), corpus.bits_metric,
                                eval_keys)
    test_metrics = {}
    if int(jax.device_get(state["step"])) >= config.total_steps:  # a finished run: the whole test split, once
        test_metrics = evaluate_test(state["params"], corpus, config, _with_router_state(eval_fn, state), place)
    summary = {
        "steps": int(jax.device_get(state["step"])), "params_total": counts.total, "params_active": counts.active,
        "tokens_per_sec": tokens_per_sec, "step_time_s": step_time, **eval_metrics, **test_metrics,
        "layer_experts": list(model_cfg.layer_experts()), "corpus": corpus.description,
        "corpus_identity": corpus.identity,
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


def progress_line(step: int, total_steps: int, last_step: int, loss: float, tokens_per_sec: float,
                  step_time: float) -> str:
    """The log line of a logging step: 'step 120/300  loss 2.6431  15,204 tokens/s  ETA 0:02:11',
    the ETA being this run's steps left (to last_step) at the last window's step time."""
    eta = (last_step - step) * step_time
    eta_text = str(datetime.timedelta(seconds=round(eta))) if math.isfinite(eta) else "-"
    return f"step {step}/{total_steps}  loss {loss:.4f}  {tokens_per_sec:,.0f} tokens/s  ETA {eta_text}"


def format_summary(summary: dict) -> str:
    rows = [
        ("steps", f"{summary['steps']}"),
        ("parameters (total / active)", f"{summary['params_total']:,} / {summary['params_active']:,}"),
        ("validation loss (nats/token)", f"{summary['val_loss']:.4f}"),
        ("validation bits per byte", f"{summary['val_bpb']:.4f}") if "val_bpb" in summary else
        ("validation bits per token", f"{summary['val_bits_per_token']:.4f}"),
        *([("test loss (nats/token, whole split)", f"{summary['test_loss']:.4f}"),
           ("test bits per byte", f"{summary['test_bpb']:.4f}") if "test_bpb" in summary else
           ("test bits per token", f"{summary['test_bits_per_token']:.4f}")] if "test_loss" in summary else []),
        ("tokens / s", f"{summary['tokens_per_sec']:.0f}"),
        ("layer experts", " ".join(str(e) for e in summary["layer_experts"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def evaluate_run(workdir: str) -> dict:
    """A finished run's validation and test losses, by evaluation alone: its config from
    workdir/config.json, its last checkpoint restored, nothing trained (train_and_evaluate resumed
    at its end). Rewrites workdir/results.json and returns the summary. A run that has not reached
    its total_steps is refused: evaluating it would train it."""
    config_path = os.path.join(workdir, metrics_lib.CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} is missing: --workdir must be a training run's folder")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f)["config"])
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR), read_only=True)
    try:
        step = ckpt.latest_step()
    finally:
        ckpt.close()
    if step is None or step < config.total_steps:
        raise ValueError(f"the run in {workdir} is at step {step or 0} of {config.total_steps}: finish it first "
                         "(experiments/train.py with the same --config and --workdir), then evaluate it")
    return train_and_evaluate(config, workdir)
