"""The training loop behind experiments/train.py. `train_and_evaluate(config, workdir)` builds a run
(`_build`: corpus, model, optimizer, the jitted step functions, the evaluation batches), starts it
(moe_jax.run_start's start order: this workdir's checkpoint, else another run's parameters, else
fresh), trains (`_train`: one step at a time; at logging steps `_log`, which evaluates at evaluation
steps; at checkpoint steps `_save`) and finishes (`_finish`: the whole test split once, results.json).
The pure, jitted step functions it runs are moe_jax.train_lib; the config's fields are typed in
moe_jax.run_config.

Evaluation routes as DeepSpeed's does (random token selection, top-2's Gumbel-sampled second
expert) with fixed keys (train_lib.eval_rng), so every evaluation of every run sees the same noise;
config.deterministic_eval=True routes without noise.

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
import ml_collections
from absl import logging

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import corpus as corpus_lib
from moe_jax import data as data_lib
from moe_jax import diagnostics
from moe_jax import evaluation
from moe_jax import load_stats
from moe_jax import metrics as metrics_lib
from moe_jax import model as model_lib
from moe_jax import parallel as parallel_lib
from moe_jax import routing_trace
from moe_jax import run_config
from moe_jax import run_start
from moe_jax import train_lib


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...). The message says where and what to do."""


@dataclasses.dataclass
class _Run:
    """What a run builds before its first step."""

    config: ml_collections.ConfigDict
    settings: run_config.RunSettings
    workdir: str
    corpus: Any  # moe_jax.corpus.Corpus
    model_cfg: Any  # moe_jax.config.ModelConfig
    counts: Any  # moe_jax.model.count_params
    optimizer: Any
    par: Optional[parallel_lib.ParallelConfig]
    abstract: Any  # the train state's shapes
    state_shardings: Any
    init_rng: jax.Array
    train_rng: jax.Array
    train_step: Callable
    eval_fn: Callable
    diagnose: Optional[Callable]  # router gradient diagnostics at each evaluation (moe_jax.diagnostics)
    place: Callable  # a host batch onto the mesh
    hook_inputs: Any
    eval_data: list  # the validation batches of every training-time evaluation (placed)
    eval_keys: Optional[list]
    replay: Optional[routing_trace.TraceReader]
    record_train: bool  # every training step's routing recorded (config.record_routing, an MoE model)
    record_probe: bool  # the probe batch's routing recorded at each evaluation
    flops_per_token: float
    peak_flops: float

    @property
    def tokens_per_step(self) -> int:
        return self.config.data.batch_size * self.config.data.seq_len


@dataclasses.dataclass
class _Window:
    """The logging window: the losses not yet checked for finiteness, step timing (compilation
    excluded) and each MoE layer's expert counts summed on device."""

    pending: list = dataclasses.field(default_factory=list)  # (step, loss) device scalars
    start: float = 0.0
    steps: int = 0
    counts: Optional[dict] = None
    step_time: float = float("nan")
    tokens_per_sec: float = float("nan")
    compiled: bool = False

    def add(self, step: int, step_metrics: dict) -> None:
        self.counts = load_stats.add_window_counts(self.counts, step_metrics["moe_layers"])
        self.pending.append((step, step_metrics["loss"]))
        self.steps += 1
        if not self.compiled:  # the first step compiled: time from its end
            jax.block_until_ready(step_metrics["loss"])
            self.compiled = True
            self.restart()

    def measure(self, tokens_per_step: int) -> None:
        if self.steps:
            self.step_time = (time.perf_counter() - self.start) / self.steps
            self.tokens_per_sec = tokens_per_step / self.step_time

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0


def _step_functions(model_cfg, optimizer, schedule, loss_hook, par, record_train: bool, record_probe: bool,
                    state_shardings, diagnose: bool):
    """The jitted (train_step, eval_fn, diagnose or None) of a run."""
    train_step = jax.jit(functools.partial(train_lib.train_step, model_cfg=model_cfg, optimizer=optimizer,
                                           schedule=schedule, loss_hook=loss_hook, parallel=par,
                                           record_routing=record_train),
                         donate_argnums=(0,), out_shardings=(state_shardings, None) if par else None)
    eval_fn = jax.jit(functools.partial(train_lib.eval_step, model_cfg=model_cfg, parallel=par,
                                        record_routing=record_probe))
    diagnose_fn = None
    if diagnose:
        diagnose_fn = jax.jit(functools.partial(diagnostics.router_gradients, model_cfg=model_cfg, parallel=par))
    return train_step, eval_fn, diagnose_fn


def _build(config: ml_collections.ConfigDict, workdir: str, loss_hook, hook_inputs) -> _Run:
    """Corpus, model, optimizer, mesh, step functions and evaluation batches of a run."""
    settings = run_config.run_settings(config)
    corpus = corpus_lib.load_corpus(config.data.path or None, max_bytes=config.data.max_bytes or None,
                                    val_percent=config.data.val_percent, vocab_size=config.data.vocab_size or None)
    logging.info("corpus: %s", corpus.description)
    model_cfg = run_config.model_config(config, vocab_size=corpus.vocab_size)
    optim_cfg = run_config.optim_config(config)
    counts = model_lib.count_params(model_cfg)
    logging.info("model: %s, layer experts %s", counts, model_cfg.layer_experts())
    optimizer = train_lib.make_optimizer(optim_cfg)
    init_rng, train_rng = jax.random.split(jax.random.key(settings.seed))
    par = run_config.parallel_config(config)
    abstract = train_lib.abstract_state(init_rng, model_cfg, optimizer)
    state_shardings = None
    if par is not None:
        parallel_lib.validate(model_cfg, par, config.data.batch_size)
        state_shardings = parallel_lib.shardings(parallel_lib.state_specs(abstract, par, optimizer), par.mesh)
        logging.info("mesh %s, exchange %s, expert slicing %s, optimizer state sharded %s", dict(par.mesh.shape),
                     par.exchange, par.expert_slicing, par.shard_optimizer)
    is_moe = any(model_cfg.layer_experts())
    replay = None
    if settings.replay_routing:
        replay = routing_trace.replay_reader(settings.replay_routing, settings.last_step, model_cfg.layer_experts())
    if (settings.record_routing or replay is not None) and jax.process_count() > 1:
        raise ValueError("config.record_routing / config.replay_routing run in one process only (the trace holds "
                         "the global batch); unset them for a multi-process run")
    record_train = settings.record_routing and is_moe
    record_probe = is_moe and settings.routing_probe and jax.process_count() == 1
    train_step, eval_fn, diagnose = _step_functions(
        model_cfg, optimizer, train_lib.learning_rate_schedule(optim_cfg), loss_hook, par, record_train,
        record_probe, state_shardings, diagnose=is_moe and settings.router_diagnostics)
    place = (lambda batch: parallel_lib.device_put_batch(batch, par)) if par else (lambda batch: batch)
    if par is not None and hook_inputs is not None:  # e.g. a teacher's parameters: placed by the same rules
        hook_inputs = jax.device_put(hook_inputs, parallel_lib.shardings(parallel_lib.param_specs(hook_inputs, par),
                                                                         par.mesh))
    eval_data = [place(batch) for batch in data_lib.eval_batches(
        corpus.val, batch_size=config.data.batch_size, seq_len=config.data.seq_len,
        max_batches=settings.eval_batches, process_index=jax.process_index(), process_count=jax.process_count())]
    flops_per_token = metrics_lib.transformer_flops_per_token(
        counts.active, model_cfg.num_layers, model_cfg.hidden_size, config.data.seq_len)
    return _Run(config=config, settings=settings, workdir=workdir, corpus=corpus, model_cfg=model_cfg, counts=counts,
                optimizer=optimizer, par=par, abstract=abstract, state_shardings=state_shardings, init_rng=init_rng,
                train_rng=train_rng, train_step=train_step, eval_fn=eval_fn, diagnose=diagnose, place=place,
                hook_inputs=hook_inputs, eval_data=eval_data,
                eval_keys=evaluation.eval_keys(len(eval_data), settings.deterministic_eval), replay=replay,
                record_train=record_train, record_probe=record_probe, flops_per_token=flops_per_token,
                peak_flops=metrics_lib.peak_flops_per_device() * jax.device_count())


def _with_router_state(eval_fn, state: dict):
    """eval_fn reading the state's selection biases (aux-loss-free balancing), if it has any."""
    if "router_state" not in state:
        return eval_fn
    return functools.partial(eval_fn, router_state=state["router_state"])


def _evaluate(run: _Run, state: dict, probe_step: Optional[int] = None) -> dict:
    """The validation subset's loss; with probe_step, the probe batch's routing is written too."""
    on_probe = None
    if probe_step is not None and run.record_probe:
        layer_experts = {f"block_{i}": e for i, e in enumerate(run.model_cfg.layer_experts()) if e}
        tokens = run.eval_data[0]["inputs"]
        on_probe = lambda codes: routing_trace.write_probe(  # noqa: E731
            run.workdir, probe_step, jax.device_get(tokens), jax.device_get(codes), layer_experts)
    return evaluation.evaluate(state["params"], run.eval_data, _with_router_state(run.eval_fn, state),
                               run.corpus.bits_metric, run.eval_keys, on_probe=on_probe)


def _log(run: _Run, state: dict, step: int, step_metrics: dict, window: _Window, writer, evaluate_now: bool,
         progress: Callable[[str], None]) -> dict:
    """Writes a logging step's record (and evaluates at an evaluation step); returns the
    evaluation's metrics, or {} when it did not evaluate."""
    host = jax.device_get(step_metrics)
    window.measure(run.tokens_per_step)
    record = {name: float(value) for name, value in host.items() if name != "moe_layers"}
    record.update({"tokens_per_sec": window.tokens_per_sec, "step_time_s": window.step_time,
                   "mfu": metrics_lib.mfu(run.flops_per_token, window.tokens_per_sec, run.peak_flops),
                   "moe": load_stats.layer_stats(host["moe_layers"], jax.device_get(window.counts))})
    window.counts = None
    eval_metrics = {}
    if evaluate_now:
        eval_metrics = _evaluate(run, state, probe_step=step)
        record.update(eval_metrics)
        if run.diagnose is not None:
            grads = jax.device_get(run.diagnose(state["params"], run.eval_data[0], rng=train_lib.eval_rng(0),
                                                router_state=state.get("router_state")))
            record["router_grad"] = {f"layer{layer}": stats for layer, stats in grads.items()}
    writer.write(step, record)
    if jax.process_index() == 0:
        progress(progress_line(step, run.settings.total_steps, run.settings.last_step, record["loss"],
                               window.tokens_per_sec, window.step_time))
    window.restart()
    return eval_metrics


def _save(run: _Run, ckpt, state: dict, step: int, batches, trace_writer) -> None:
    """A checkpoint at `step`, with the data position (and the routing trace flushed first)."""
    saved = ("params", "opt_state", "router_state")  # router_state: loss-free balancing's biases
    if trace_writer is not None:  # the steps up to this checkpoint, before it is written
        trace_writer.flush()
    ckpt.save(step, {name: state[name] for name in saved if name in state},
              extra={"data_step": batches.step, **run_start.data_position(run.config)})


def _train(run: _Run, state: dict, start_step: int, ckpt, writer, progress) -> tuple[dict, dict, _Window]:
    """Steps start_step + 1 .. settings.last_step. Returns (state, the last evaluation's metrics,
    the logging window)."""
    s = run.settings
    batches = data_lib.BatchIterator(run.corpus.train, batch_size=run.config.data.batch_size,
                                     seq_len=run.config.data.seq_len, seed=s.seed, start_step=start_step,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    trace_writer = routing_trace.TraceWriter(run.workdir) if run.record_train else None
    last_good = start_step if start_step else None
    window, eval_metrics = _Window(), {}
    for step in range(start_step + 1, s.last_step + 1):
        batch = next(batches)
        if run.replay is not None:
            batch = {**batch, "routing": run.replay.codes(step)}
        state, step_metrics = run.train_step(state, run.place(batch), run.train_rng, run.hook_inputs)
        if trace_writer is not None:
            trace_writer.add(step, jax.device_get(step_metrics.pop("routing")))
        window.add(step, step_metrics)
        is_last = step == s.last_step
        if step % s.log_every_steps == 0 or step % s.checkpoint_every_steps == 0 or is_last:
            _check_finite(window.pending, last_good, run.workdir)
            window.pending.clear()
        if step % s.log_every_steps == 0 or is_last:
            evaluate_now = step % s.eval_every_steps == 0 or is_last
            eval_metrics = _log(run, state, step, step_metrics, window, writer, evaluate_now, progress) or eval_metrics
        if step % s.checkpoint_every_steps == 0 or is_last:
            _save(run, ckpt, state, step, batches, trace_writer)
            last_good = step
    return state, eval_metrics, window


def _finish(run: _Run, state: dict, eval_metrics: dict, window: _Window) -> dict:
    """The summary of a run (written to results.json); a finished run is evaluated on the whole
    test split."""
    if not eval_metrics:  # resumed at the end: evaluate the restored state
        eval_metrics = _evaluate(run, state)
    steps = int(jax.device_get(state["step"]))
    test_metrics = {}
    if steps >= run.settings.total_steps:  # a finished run: the whole test split, once
        test_metrics = evaluation.evaluate_test(state["params"], run.corpus, run.config.data.batch_size,
                                                run.config.data.seq_len, _with_router_state(run.eval_fn, state),
                                                run.settings.deterministic_eval, run.place)
    summary = {
        "steps": steps, "params_total": run.counts.total, "params_active": run.counts.active,
        "tokens_per_sec": window.tokens_per_sec, "step_time_s": window.step_time, **eval_metrics, **test_metrics,
        "layer_experts": list(run.model_cfg.layer_experts()), "corpus": run.corpus.description,
        "corpus_identity": run.corpus.identity,
    }
    with open(os.path.join(run.workdir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       loss_hook: Optional[train_lib.LossHook] = None, hook_inputs=None,
                       init_params: Optional[Callable[[], Any]] = None,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """Trains (from where moe_jax.run_start says), evaluates, writes metrics. Returns a summary
    dict (also written to workdir/results.json).

    loss_hook / hook_inputs add a term to the training loss (see train_lib.train_step); its metrics
    are logged with the others. init_params() returns the parameters to start from when workdir
    has no checkpoint. Mixture-of-Students distillation uses both. progress receives each logging
    step's progress_line (default: logged at INFO)."""
    run_config.validate(config)
    os.makedirs(workdir, exist_ok=True)
    run = _build(config, workdir, loss_hook, hook_inputs)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR),
                                       keep=run.settings.keep_checkpoints)
    try:
        state, start_step = run_start.start_state(config, ckpt, run.abstract, run.state_shardings, run.init_rng,
                                                  run.model_cfg, run.optimizer, init_params)
        writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
    except BaseException:
        ckpt.close()
        raise
    try:
        writer.write_config({"config": config.to_dict(), "model": dataclasses.asdict(run.model_cfg),
                             "params_total": run.counts.total, "params_active": run.counts.active,
                             "corpus": run.corpus.description, "jax": jax.__version__})
        state, eval_metrics, window = _train(run, state, start_step, ckpt, writer,
                                             progress or (lambda line: logging.info("%s", line)))
    finally:
        writer.close()
        ckpt.close()
    return _finish(run, state, eval_metrics, window)


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
