"""Evaluation routes as DeepSpeed's does (RTS, top-2's sampled second expert) with a fixed key, or
without noise when config.deterministic_eval is set."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import load_config_file
from moe_jax import config as config_lib
from moe_jax import model as model_lib
from moe_jax import train_lib
from moe_jax import trainer
from moe_jax import routers as routers_lib


def _model(k: int, eval_capacity_factor: float):
    base = config_lib.preset("tiny+top2")
    moe = dataclasses.replace(base.moe, k=k, experts=4, eval_capacity_factor=eval_capacity_factor)
    return base.replace(num_layers=2, hidden_size=32, num_heads=2, ffn_size=64, max_seq_len=32, moe=moe)


def _eval(model_cfg, params, batch, rng):
    out = jax.jit(lambda p, b, r: train_lib.eval_step(p, b, r, model_cfg=model_cfg))(params, batch, rng)
    return float(out["nll_sum"])


@pytest.mark.parametrize("k,eval_capacity_factor", [(2, 4.0), (1, 0.5)])  # top-2 sampling; top-1 RTS under drops
def test_eval_noise_follows_the_key_and_replays(k, eval_capacity_factor):
    model_cfg = _model(k, eval_capacity_factor)
    params = model_lib.init_params(jax.random.key(0), model_cfg)
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, model_cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    keyed = _eval(model_cfg, params, batch, train_lib.eval_rng(0))
    assert keyed == _eval(model_cfg, params, batch, train_lib.eval_rng(0))  # replayable
    assert keyed != _eval(model_cfg, params, batch, train_lib.eval_rng(1))  # the key is used
    deterministic = _eval(model_cfg, params, batch, None)
    assert deterministic != keyed
    assert deterministic == _eval(model_cfg, params, batch, None)


def test_keyed_top2_eval_routing_samples_the_second_expert():
    """The routing eval sees: with the eval key, top-2's second expert is the arg max of logits plus
    Gumbel noise (DeepSpeed's top2_2nd_expert_sampling); without, the second-best expert."""
    moe = _model(2, 4.0).moe
    logits = jax.random.normal(jax.random.key(3), (64, 4))
    noisy = routers_lib.topk_router(logits, moe=moe, train=False, rng=train_lib.eval_rng(0), drop_tokens=True)
    plain = routers_lib.topk_router(logits, moe=moe, train=False, rng=None, drop_tokens=True)
    second_best = jnp.argsort(-logits, axis=-1)[:, 1]
    np.testing.assert_array_equal(plain.expert_index[:, 1], second_best)
    assert np.any(np.asarray(noisy.expert_index[:, 1]) != np.asarray(second_best))
    np.testing.assert_array_equal(noisy.expert_index[:, 0], plain.expert_index[:, 0])  # first choice: no noise


def _top2_run(deterministic_eval: bool):
    config = load_config_file("top2", "micro")
    config.total_steps = 1
    config.eval_every_steps = config.checkpoint_every_steps = 1
    config.deterministic_eval = deterministic_eval
    return config


@pytest.mark.slow  # three training runs; eval_step's keyed routing is tested directly above
def test_trainer_switch_between_keyed_and_deterministic_eval(tmp_path):
    keyed = trainer.train_and_evaluate(_top2_run(False), str(tmp_path / "keyed"))
    plain = trainer.train_and_evaluate(_top2_run(True), str(tmp_path / "plain"))
    losses = [json.loads(line)["loss"] for name in ("keyed", "plain")
              for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == losses[1]  # the same training
    assert keyed["val_loss"] != plain["val_loss"]
    # a finished run evaluates its restored parameters again: the same keys, the same loss
    assert trainer.train_and_evaluate(_top2_run(False), str(tmp_path / "keyed"))["val_loss"] == keyed["val_loss"]
