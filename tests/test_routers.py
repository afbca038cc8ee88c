"""Routers of moe_jax.routers against per-expert loop references, on one device and on a mesh."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, inference, parallel
from moe_jax import moe as moe_lib
from moe_jax.routers import expert_choice_gating
from moe_jax import routing as routing_lib
from moe_jax import routers as routers_lib
from tests.helpers import check_gradient, ffn_reference, moe_layer_params


def _expert_choice_reference(logits: np.ndarray, capacity: int):
    """Per-expert loop: expert e takes the `capacity` tokens with the highest gate probability for
    it (equal probabilities: earlier token first). Returns taken [S, E] bool and probs [S, E]."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    num_tokens, num_experts = probs.shape
    taken = np.zeros((num_tokens, num_experts), bool)
    for e in range(num_experts):
        order = np.argsort(-probs[:, e], kind="stable")
        taken[order[:capacity], e] = True
    return taken, probs


def _layer_reference(params: dict, x: np.ndarray, capacity: int):
    """The expert-choice layer by loops: y [S, M] = sum over experts e, over e's tokens s, of
    p[s, e] * ffn_e(x_s); also the fraction of tokens that no expert took."""
    x = np.asarray(x, np.float64)
    logits = np.asarray(x.astype(np.float32) @ np.asarray(params["gate"]["kernel"], np.float32), np.float64)
    taken, probs = _expert_choice_reference(logits, capacity)
    y = np.zeros_like(x)
    for e in range(probs.shape[1]):
        for s in np.flatnonzero(taken[:, e]):
            y[s] += probs[s, e] * ffn_reference(params["experts"], e, x[s])
    return y, 1.0 - np.mean(taken.any(axis=1))


def _params(num_experts, model_dim=8, ffn_dim=16, seed=0):
    return moe_layer_params(num_experts, model_dim, ffn_dim, seed)


# (S, E, capacity_factor, min_capacity, expected capacity)
CASES = [
    (5, 8, 1.0, 0, 1),  # fewer tokens than experts
    (5, 8, 1.0, 4, 4),  # min_capacity raises C
    (64, 4, 0.25, 0, 4),  # heavy overflow: most tokens get no expert
    (6, 2, 4.0, 0, 6),  # ceil(S * cf / E) = 12 > S: every expert takes every token
    (37, 6, 1.3, 2, 9),
]


@pytest.mark.parametrize("S,E,cf,min_cap,capacity", CASES)
def test_expert_choice_routing_equals_loop_reference(S, E, cf, min_cap, capacity):
    logits = jax.random.normal(jax.random.key(S * E), (S, E)) * 2.0
    routing = expert_choice_gating(logits, capacity_factor=cf, min_capacity=min_cap)
    taken, probs = _expert_choice_reference(logits, capacity)
    assert routing.capacity == capacity and routing.k == E
    np.testing.assert_array_equal(routing.expert_index, np.broadcast_to(np.arange(E), (S, E)))
    np.testing.assert_array_equal(routing.kept, taken)
    np.testing.assert_allclose(routing.weight, probs * taken, rtol=1e-5, atol=1e-7)
    slots = np.where(taken, np.cumsum(taken, axis=0) - 1, 0)  # token order within each expert
    np.testing.assert_array_equal(routing.slot, slots)
    np.testing.assert_array_equal(routing.expert_counts, taken.sum(axis=0))
    np.testing.assert_array_equal(routing.kept_counts(), np.full(E, capacity))
    stats = routing_lib.routing_stats(routing)
    assert float(stats["dropped_fraction"]) == 0.0 and float(stats["aux_loss"]) == 0.0
    np.testing.assert_allclose(stats["unrouted_fraction"], 1.0 - taken.any(axis=1).mean(), rtol=1e-6)
    combine, dispatch = routing.to_dense()  # each expert's buffer is exactly full
    np.testing.assert_array_equal(np.asarray(dispatch).sum(axis=(0, 2)), np.full(E, capacity))


def test_heavy_overflow_leaves_tokens_without_an_expert():
    routing = expert_choice_gating(jax.random.normal(jax.random.key(1), (64, 4)), capacity_factor=0.25)
    assert float(routing_lib.routing_stats(routing)["unrouted_fraction"]) >= 1 - 16 / 64


@pytest.mark.parametrize("path", ["gather", "einsum", "dropless"])
@pytest.mark.parametrize("S,E,cf,min_cap,capacity", CASES)
def test_expert_choice_layer_equals_per_expert_loop(path, S, E, cf, min_cap, capacity):
    moe = config.MoEConfig(experts=E, router="expert_choice", capacity_factor=cf, min_capacity=min_cap,
                           dispatch=path)
    params = _params(E, seed=S)
    x = jax.random.normal(jax.random.key(S + 100), (S, 8))
    y, stats = jax.jit(lambda p, x: moe_lib.moe_forward(p, x, moe=moe, train=True))(params, x)
    y_ref, unrouted = _layer_reference(params, x, capacity)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["unrouted_fraction"], unrouted, rtol=1e-6)


def test_expert_choice_eval_uses_eval_capacity_factor():
    moe = config.MoEConfig(experts=4, router="expert_choice", capacity_factor=0.5, eval_capacity_factor=2.0,
                           min_capacity=0)
    x = jax.random.normal(jax.random.key(2), (32, 8))
    train = moe_lib.route(_params(4)["gate"], x, moe=moe, train=True, rng=None)
    evaluation = moe_lib.route(_params(4)["gate"], x, moe=moe, train=False, rng=None)
    assert (train.capacity, evaluation.capacity) == (4, 16)


def test_expert_choice_gradients_reach_gate_and_experts():
    moe = config.MoEConfig(experts=4, router="expert_choice", min_capacity=0)
    params = _params(4)
    x = jax.random.normal(jax.random.key(3), (16, 8))
    loss = jax.jit(lambda p: jnp.sum(jnp.sin(moe_lib.moe_forward(p, x, moe=moe, train=True)[0])))
    grads = jax.grad(loss)(params)
    for leaf in jax.tree.leaves(grads):
        assert float(jnp.abs(leaf).max()) > 0
    check_gradient(loss, params)


@pytest.mark.parametrize("path", ["gather", "dropless"])
def test_expert_choice_on_a_mesh_equals_per_shard_reference(path):
    """Each shard routes its own tokens (capacity per shard, as DeepSpeed's capacity): the (1, 8, 1)
    layer equals the single-device layer applied to each shard's tokens alone."""
    moe = config.MoEConfig(experts=8, router="expert_choice", capacity_factor=0.75, min_capacity=0, dispatch=path)
    params = _params(8)
    x = jax.random.normal(jax.random.key(4), (16, 4, 8))
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    y, stats = jax.jit(lambda p, x: moe_lib.moe_forward(p, x, moe=moe, train=True, parallel=par))(params, x)
    per_shard = [moe_lib.moe_forward(params, part, moe=moe, train=True) for part in jnp.split(x, 8)]
    np.testing.assert_allclose(y, jnp.concatenate([out for out, _ in per_shard]), rtol=1e-5, atol=1e-5)
    for name in ("unrouted_fraction", "dropped_fraction"):
        np.testing.assert_allclose(stats[name], np.mean([s[name] for _, s in per_shard]), rtol=1e-6)
    assert float(stats["unrouted_fraction"]) > 0.1 and float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_array_equal(stats["kept_counts"], sum(s["kept_counts"] for _, s in per_shard))


def test_serving_refuses_a_non_causal_router():
    cfg = config.ModelConfig(vocab_size=32, num_layers=2, hidden_size=16, num_heads=2, max_seq_len=16,
                             moe=config.MoEConfig(experts=4, router="expert_choice"))
    assert "expert_choice" in routers_lib.NON_CAUSAL_ROUTERS and "topk" not in routers_lib.NON_CAUSAL_ROUTERS
    with pytest.raises(ValueError, match="cannot generate token by token"):
        inference.serving_config(cfg)
    inference.serving_config(config.replace_moe(cfg, router="topk"))  # a causal router serves


def _micro_config(**moe_fields):
    """A training run config whose step costs milliseconds (the moe config at micro size)."""
    from experiments.configs import load_config_file

    config = load_config_file("moe", "tiny")
    config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.log_every_steps = 1
    config.eval_batches = 1
    config.data.batch_size, config.data.seq_len, config.data.max_bytes = 8, 32, 1 << 19
    config.model.num_layers, config.model.hidden_size, config.model.num_heads = 2, 32, 2
    config.model.ffn_size = config.model.max_seq_len = 64
    config.moe.experts = "4"
    for name, value in moe_fields.items():
        setattr(config.moe, name, value)
    return config


def _metrics(workdir):
    import json

    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_expert_choice_trains_and_logs_the_unrouted_fraction(tmp_path):
    from moe_jax import trainer

    summary = trainer.train_and_evaluate(_micro_config(router="expert_choice", capacity_factor=0.5), str(tmp_path))
    assert np.isfinite(summary["val_loss"])
    record = _metrics(tmp_path)[-1]
    assert record["moe/layer1/unrouted_fraction"] >= 0.5  # cf 0.5: at most half the tokens get an expert
    assert record["moe/layer1/dropped_fraction"] == 0.0
