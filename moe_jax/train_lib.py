"""Pure, jit-ready training pieces: optimizer, state, loss, train_step, eval_step (no files, no
loop: the loop that runs them is moe_jax.trainer).

State is a plain dict {"params", "opt_state", "step"}. Randomness is a function of (seed, step):
the gating and dropout keys of step n are fold_in(rng, n), so a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from moe_jax import balancing
from moe_jax import grad_precision
from moe_jax import model as model_lib
from moe_jax.config import ModelConfig
from moe_jax import parallel as parallel_lib
from moe_jax.parallel import ParallelConfig


# loss_hook(logits [B, T, V], batch, step, hook_inputs) -> (extra loss term, {name: scalar metric})
LossHook = Callable[[jax.Array, dict, jax.Array, Any], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    min_learning_rate: float = 3e-5
    warmup_steps: int = 100
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0:
            raise ValueError(f"optim.learning_rate={self.learning_rate} must be > 0")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"optim.min_learning_rate={self.min_learning_rate} must be in [0, learning_rate]")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("optim.warmup_steps must be >= 0 and total_steps >= 1")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to min_learning_rate at total_steps."""
    warmup = min(cfg.warmup_steps, cfg.total_steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=cfg.total_steps, end_value=cfg.min_learning_rate)


def _decay_mask(params):
    """Weight decay on matrices only (not on biases, LayerNorm parameters or other vectors)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on matrices)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=_decay_mask),
    )


def init_state(rng: jax.Array, model_cfg: ModelConfig, optimizer: optax.GradientTransformation) -> dict:
    """{"params", "opt_state", "step"}, and "router_state" (zero selection biases) when the model
    uses aux-loss-free balancing (moe_jax.balancing)."""
    params = model_lib.init_params(rng, model_cfg)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    router_state = balancing.init_router_state(model_cfg)
    if router_state:
        state["router_state"] = router_state
    return state


def step_rngs(rng: jax.Array, step: jax.Array) -> dict:
    step_key = jax.random.fold_in(rng, step)
    gating, dropout = jax.random.split(step_key)
    return {"gating": gating, "dropout": dropout}


def loss_fn(params: dict, batch: dict, model_cfg: ModelConfig, *, rngs: dict | None, train: bool,
            step: jax.Array | None = None, loss_hook: LossHook | None = None, hook_inputs: Any = None,
            parallel: ParallelConfig | None = None, router_state: dict | None = None, record_routing: bool = False):
    """CE + aux_loss_coef * sum of aux losses (+ z_loss_coef * sum of router z-losses)
    (+ loss_hook's term, e.g. knowledge distillation). router_state: the routers' selection biases
    (aux-loss-free balancing), None without. A batch with "routing" ({"block_<i>": code}) routes
    with those recorded codes; record_routing: metrics["routing"] holds the codes that ran
    (moe_jax.routing_trace)."""
    logits, aux = model_lib.apply(params, batch["inputs"], model_cfg, router_state=router_state, train=train,
                                  rngs=rngs, parallel=parallel, replay=batch.get("routing"),
                                  record_routing=record_routing)
    ce = model_lib.lm_loss(logits, batch["targets"], batch.get("mask"))
    loss = ce
    if model_cfg.moe is not None:
        loss = loss + model_cfg.moe.aux_loss_coef * aux["aux_loss"]
        if model_cfg.moe.z_loss_coef:
            loss = loss + model_cfg.moe.z_loss_coef * aux["z_loss"]
    metrics = {"ce_loss": ce, "aux_loss": aux["aux_loss"], "z_loss": aux["z_loss"],
               "moe_layers": {str(i): stats for i, stats in aux["layers"]}}
    if record_routing:
        metrics["routing"] = aux["routing"]
    if loss_hook is not None:
        extra, extra_metrics = loss_hook(logits, batch, step, hook_inputs)
        loss = loss + extra
        metrics.update(extra_metrics)
    metrics["loss"] = loss
    return loss, metrics


def train_step(state: dict, batch: dict, rng: jax.Array, hook_inputs: Any = None, *, model_cfg: ModelConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule | None = None,
               loss_hook: LossHook | None = None, parallel: ParallelConfig | None = None,
               record_routing: bool = False):
    """One optimizer step. Returns (new_state, metrics). `hook_inputs` (e.g. a frozen teacher's
    parameters) reach `loss_hook` as a traced argument, never as a baked-in constant. A state with
    "router_state" has its selection biases updated from this step's expert loads, outside the
    optimizer (moe_jax.balancing). Routing replay and recording: `loss_fn`."""
    rngs = step_rngs(rng, state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    with grad_precision.reduce_gradients_in(None if parallel is None else parallel.grad_reduce_dtype):
        (_, metrics), grads = grad_fn(state["params"], batch, model_cfg, rngs=rngs, train=True, step=state["step"],
                                      loss_hook=loss_hook, hook_inputs=hook_inputs, parallel=parallel,
                                      router_state=state.get("router_state"), record_routing=record_routing)
    if parallel is not None and parallel.shard_optimizer:  # ZeRO-1: reduced into shards (moe_jax.parallel)
        grads = jax.lax.with_sharding_constraint(
            grads, parallel_lib.shardings(parallel_lib.optimizer_specs(grads, parallel), parallel.mesh))
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if parallel is not None and parallel.shard_optimizer:  # the updated shards gathered whole again
        params = jax.lax.with_sharding_constraint(
            params, parallel_lib.shardings(parallel_lib.param_specs(params, parallel), parallel.mesh))
    metrics["grad_norm"] = optax.tree.norm(grads)
    if schedule is not None:
        metrics["lr"] = schedule(state["step"])
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    if "router_state" in state:
        new_state["router_state"] = balancing.update_selection_bias(
            state["router_state"], metrics["moe_layers"], model_cfg.moe.bias_update_rate)
    return new_state, metrics


# The evaluation routing key: one constant for every evaluation of every run, so validation losses
# are comparable across steps, resumes, seeds and variants.
EVAL_GATING_SEED = 0


def eval_rng(batch_index: int) -> jax.Array:
    """The 'gating' key of evaluation batch `batch_index`: fixed, so an evaluation replays exactly."""
    return jax.random.fold_in(jax.random.key(EVAL_GATING_SEED), batch_index)


def eval_step(params: dict, batch: dict, rng: jax.Array | None = None, *, model_cfg: ModelConfig,
              parallel: ParallelConfig | None = None, router_state: dict | None = None,
              record_routing: bool = False) -> dict:
    """Summed cross-entropy and token count on one batch, at the eval capacity factor (with the
    state's selection biases under aux-loss-free balancing: router_state). A batch with a "mask"
    [B, T] counts only the targets where it is 1.

    rng: the 'gating' key (eval_rng(i) in the trainer). As DeepSpeed evaluates, random token
    selection ranks an over-full expert's tokens by random scores and top-2 samples its second
    expert with Gumbel noise; jitter and RSample noise stay off (training only). None: deterministic
    routing (RTS keeps the first tokens, top-2 takes the second-best expert). record_routing: the
    result's "routing" holds each MoE layer's routing code (moe_jax.routing_trace)."""
    logits, aux = model_lib.apply(params, batch["inputs"], model_cfg, router_state=router_state, train=False,
                                  rngs=None if rng is None else {"gating": rng}, parallel=parallel,
                                  record_routing=record_routing)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    if "mask" in batch:  # padded targets (moe_jax.data.split_batches) count for nothing
        mask = batch["mask"].astype(jnp.float32)
        out = {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask)}
    else:
        out = {"nll_sum": jnp.sum(nll), "tokens": jnp.asarray(nll.size, jnp.float32)}
    if record_routing:
        out["routing"] = aux["routing"]
    return out


def nats_to_bits(loss_nats: float) -> float:
    """A loss in nats per token as bits per token (bits per byte on the byte corpora, where a token
    is a byte; the corpus names the metric: Corpus.bits_metric)."""
    return loss_nats / math.log(2)


def abstract_state(rng: Any, model_cfg: ModelConfig, optimizer: optax.GradientTransformation):
    return jax.eval_shape(lambda r: init_state(r, model_cfg, optimizer), rng)
