"""Where a training run starts, in the one start order:
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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from moe_jax import balancing
from moe_jax import checkpoint as checkpoint_lib
from moe_jax import run_config
from moe_jax import train_lib
from moe_jax import upcycle

# The config fields that fix the batch sequence, as checkpoint extras (with the data step).
_DATA_FIELDS = {"seed": "seed", "batch_size": "data.batch_size", "seq_len": "data.seq_len"}


def data_position(config: ml_collections.ConfigDict) -> dict:
    """The checkpoint extras that a resumed run must match to continue its batch sequence."""
    return {"seed": config.seed, "batch_size": config.data.batch_size, "seq_len": config.data.seq_len}


def _with_shardings(abstract, shardings):
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def check_data_position(extra: dict, config: ml_collections.ConfigDict, step: int, directory) -> None:
    """A resumed run sees the batches of an uninterrupted one only with the seed, batch size and
    sequence length that the checkpoint was trained with, at the checkpoint's step."""
    for key, current in data_position(config).items():
        saved, name = extra.get(key), _DATA_FIELDS[key]
        if saved is not None and saved != current:
            raise ValueError(f"the checkpoint at step {step} in {directory} was trained with {name}={saved}, this run "
                             f"has {name}={current}: resuming would not continue its batch sequence; rerun with "
                             f"--config.{name}={saved}, or use a new --workdir")
    if extra.get("data_step", step) != step:
        raise ValueError(f"the checkpoint at step {step} in {directory} records data position {extra['data_step']}; "
                         "it is inconsistent: delete that step directory or use a new --workdir")


def _from_other_run(init_from: str, noise: float, abstract, shard, init_rng, model_cfg):
    """The parameters of the run `init_from` (upcycled when it is dense and this model is not)."""
    try:
        if upcycle.is_dense(checkpoint_lib.saved_params_shapes(init_from)) and not upcycle.is_dense(
                abstract["params"]):  # a dense run seeds this MoE model: upcycling
            dense, step = checkpoint_lib.load_params(init_from, "saved")
            params = jax.jit(lambda d: upcycle.upcycle_params(d, model_cfg, init_rng, noise=noise),
                             out_shardings=shard("params"))(dense)
            logging.info("upcycled from the dense run %s at step %d", init_from, step)
        else:
            params, step = checkpoint_lib.load_params(init_from, _with_shardings(abstract["params"], shard("params")))
            logging.info("parameters from %s at step %d", init_from, step)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"config.init_from={init_from}: {error}") from None
    return params


def start_state(config, ckpt, abstract, shardings, init_rng, model_cfg, optimizer, init_params):
    """(state, start step) in the module docstring's start order."""
    shard = (lambda name: None) if shardings is None else (lambda name: shardings[name])
    names = ("params", "opt_state", "router_state") if "router_state" in abstract else ("params", "opt_state")
    target = {name: _with_shardings(abstract[name], shard(name)) for name in names}
    # the newest step that reads back whole: a damaged newer one is set aside with a warning
    items, extra, start_step = ckpt.restore_latest(target)
    if start_step is not None:
        check_data_position(extra, config, start_step, ckpt.directory)
        step = jax.jit(lambda: jnp.asarray(start_step, jnp.int32), out_shardings=shard("step"))()
        logging.info("resumed from %s at step %d", ckpt.directory, start_step)
        return {**items, "step": step}, start_step
    settings = run_config.run_settings(config)
    init_from = settings.init_from
    if init_from and init_params is not None:
        raise ValueError(f"config.init_from={init_from} and this run's own initial parameters (e.g. "
                         "kd.init_from_teacher_layers) both set where a run starts; keep one")
    if init_from:
        params = _from_other_run(init_from, settings.init_from_noise, abstract, shard, init_rng, model_cfg)
    elif init_params is not None:
        params = init_params()
        if shardings is not None:
            params = jax.device_put(params, shardings["params"])
    else:
        return jax.jit(lambda r: train_lib.init_state(r, model_cfg, optimizer), out_shardings=shardings)(init_rng), 0

    def fresh(p):
        router = {"router_state": balancing.init_router_state(model_cfg)} if "router_state" in abstract else {}
        return {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32), **router}

    return jax.jit(fresh, out_shardings=shardings)(params), 0
