"""MoE layer: Residual-MoE by hand, gradients to every part, placement in the model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import moe as moe_lib
from moe_jax.config import MoEConfig
from moe_jax.experts import gelu
from moe_jax.gating import top_k_gating


def layer_params(rng, M=16, F=32, E=4, residual=True):
    keys = jax.random.split(rng, 10)
    def normal(i, shape, scale=0.3):
        return jax.random.normal(keys[i], shape) * scale
    params = {
        "gate": {"kernel": normal(0, (M, E))},
        "experts": {"w1": normal(1, (E, M, F)), "b1": normal(2, (E, F)), "w2": normal(3, (E, F, M)),
                    "b2": normal(4, (E, M))},
    }
    if residual:
        params["residual"] = {
            "mlp": {"w1": normal(5, (M, F)), "b1": normal(6, (F,)), "w2": normal(7, (F, M)), "b2": normal(8, (M,))},
            "coef": {"kernel": normal(9, (M, 2)), "bias": jnp.array([0.3, -0.2])},
        }
    return params


def test_residual_moe_equals_hand_computation():
    moe = MoEConfig(experts=4, k=1, residual=True, capacity_factor=1.0, min_capacity=0, use_rts=False)
    params = layer_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 12, 16))
    y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, rng=None)
    tokens = np.asarray(x.reshape(-1, 16), np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    routing = top_k_gating(x.reshape(-1, 16) @ params["gate"]["kernel"], k=1, capacity_factor=1.0, min_capacity=0)
    want = np.zeros_like(tokens)
    for s, token in enumerate(tokens):
        e = int(routing.expert_index[s, 0])
        ex = {n: v[e] for n, v in p["experts"].items()}
        expert_out = float(routing.weight[s, 0]) * (np.asarray(gelu(token @ ex["w1"] + ex["b1"])) @ ex["w2"] + ex["b2"])
        if not bool(routing.kept[s, 0]):
            expert_out = np.zeros_like(token)
        mlp = p["residual"]["mlp"]
        dense = np.asarray(gelu(token @ mlp["w1"] + mlp["b1"])) @ mlp["w2"] + mlp["b2"]
        logits = token @ p["residual"]["coef"]["kernel"] + p["residual"]["coef"]["bias"]
        coef = np.exp(logits - logits.max())
        coef /= coef.sum()  # softmax over the last axis (2 entries)
        want[s] = expert_out * coef[0] + dense * coef[1]
    assert 0 < float(stats["dropped_fraction"]) < 1  # some tokens dropped, some kept
    np.testing.assert_allclose(y.reshape(-1, 16), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k,residual", [(1, True), (2, False), (3, False)])
def test_gradients_reach_router_experts_and_coefficient(k, residual):
    moe = MoEConfig(experts=4, k=k, residual=residual, capacity_factor=2.0, min_capacity=0,
                    noisy_gate_policy="Jitter")
    params = layer_params(jax.random.key(2), residual=residual)
    x = jax.random.normal(jax.random.key(3), (40, 16))

    def loss(params):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, rng=jax.random.key(0))
        return jnp.mean(jnp.square(y - 0.5)) + 0.01 * stats["aux_loss"]

    grads = jax.grad(loss)(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for path, grad in flat:
        assert float(jnp.abs(grad).max()) > 0, jax.tree_util.keystr(path)


def test_eval_uses_eval_capacity_factor():
    moe = MoEConfig(experts=4, capacity_factor=0.25, eval_capacity_factor=4.0, min_capacity=0)
    params = layer_params(jax.random.key(4), residual=False)
    x = jax.random.normal(jax.random.key(5), (64, 16))
    _, train_stats = moe_lib.moe_forward(params, x, moe=moe, train=True, rng=jax.random.key(0))
    _, eval_stats = moe_lib.moe_forward(params, x, moe=moe, train=False)
    assert float(train_stats["dropped_fraction"]) > 0
    assert float(eval_stats["dropped_fraction"]) == 0


def test_dropless_layer_never_drops_and_paths_agree():
    params = layer_params(jax.random.key(6), residual=False)
    x = jax.random.normal(jax.random.key(7), (64, 16))
    base = MoEConfig(experts=4, k=2, capacity_factor=0.25, min_capacity=0, second_expert_sampling=False)
    y_dropless, stats = moe_lib.moe_forward(params, x, moe=dataclasses.replace(base, dispatch="dropless"), train=True)
    assert float(stats["dropped_fraction"]) == 0
    no_drop = dataclasses.replace(base, drop_tokens=False)
    for path in ("einsum", "gather"):
        y, _ = moe_lib.moe_forward(params, x, moe=dataclasses.replace(no_drop, dispatch=path), train=True)
        np.testing.assert_allclose(y, y_dropless, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Gate noise against hand computations. The hand computations follow how the key is used: `route`
# splits its rng into (jitter, router), and the top-k router splits its part into (RSample, gating).
# ------------------------------------------------------------------------------------------------

JITTER_LOW, JITTER_HIGH = 1.0 - 1e-2, 1.0 + 1e-2


def _noise_moe(policy, **overrides):
    fields = dict(experts=8, k=1, noisy_gate_policy=policy, use_rts=False, capacity_factor=2.0,
                  eval_capacity_factor=2.0, min_capacity=0)
    return MoEConfig(**{**fields, **overrides})


def test_jitter_multiplies_the_gate_input_by_uniform_noise_in_training_only():
    # With an identity gate (M = E) the logits are the jittered input itself, so the noise is
    # logits / x: it must be the U(1 - 1e-2, 1 + 1e-2) draw of the given key, elementwise.
    x = jax.random.normal(jax.random.key(10), (4096, 8))
    gate = {"kernel": jnp.eye(8)}
    key = jax.random.key(11)
    logits = moe_lib.gate_logits(gate, x, moe=_noise_moe("Jitter"), train=True, rng=key)
    noise = np.asarray(logits, np.float64) / np.asarray(x, np.float64)
    hand = np.asarray(jax.random.uniform(key, x.shape, jnp.float32, JITTER_LOW, JITTER_HIGH), np.float64)
    np.testing.assert_allclose(noise, hand, rtol=1e-6)
    # The distribution: inside the range, filling it, uniform (mean 1, std 0.02 / sqrt(12), flat
    # histogram; bounds at 6 standard errors).
    n = noise.size
    assert JITTER_LOW <= noise.min() < JITTER_LOW + 1e-4 and JITTER_HIGH - 1e-4 < noise.max() <= JITTER_HIGH
    std = 2e-2 / np.sqrt(12)
    assert abs(noise.mean() - 1.0) < 6 * std / np.sqrt(n)
    np.testing.assert_allclose(noise.std(), std, rtol=0.03)
    counts, _ = np.histogram(noise, bins=10, range=(JITTER_LOW, JITTER_HIGH))
    assert np.all(np.abs(counts - n / 10) < 6 * np.sqrt(n / 10 * 0.9)), counts
    # No noise outside training, without the policy, or without a key.
    exact = np.asarray(x)
    for moe, train, rng in [(_noise_moe("Jitter"), False, key), (_noise_moe(None), True, key),
                            (_noise_moe("Jitter"), True, None)]:
        np.testing.assert_array_equal(moe_lib.gate_logits(gate, x, moe=moe, train=train, rng=rng), exact)


def test_route_jitters_with_the_first_half_of_its_key():
    x = jax.random.normal(jax.random.key(12), (256, 16))
    gate = {"kernel": jax.random.normal(jax.random.key(13), (16, 8)) * 0.5}
    key = jax.random.key(14)
    moe = _noise_moe("Jitter")
    rng_jitter, _ = jax.random.split(key)
    jittered = (x * jax.random.uniform(rng_jitter, x.shape, jnp.float32, JITTER_LOW, JITTER_HIGH)) @ gate["kernel"]
    clean = x @ gate["kernel"]
    def route(train):
        return moe_lib.route(gate, x, moe=moe, train=train, rng=key)
    for routing, logits in [(route(True), jittered), (route(False), clean)]:
        want = top_k_gating(logits, k=1, capacity_factor=2.0, min_capacity=0, use_rts=False)
        np.testing.assert_array_equal(routing.expert_index, want.expert_index)
        np.testing.assert_array_equal(routing.kept, want.kept)
        np.testing.assert_allclose(routing.weight, want.weight, rtol=1e-6)
    # The jitter is visible in every token's combine weight (a raw softmax probability).
    assert np.all(np.asarray(route(True).weight) != np.asarray(route(False).weight))


def test_rsample_picks_the_top1_expert_with_gumbel_noise_in_training_only():
    x = jax.random.normal(jax.random.key(15), (512, 16))
    gate = {"kernel": jax.random.normal(jax.random.key(16), (16, 8)) * 0.5}
    key = jax.random.key(17)
    moe = _noise_moe("RSample")
    logits = x @ gate["kernel"]
    _, rng_router = jax.random.split(key)
    rng_rsample, _ = jax.random.split(rng_router)
    noisy_choice = np.argmax(np.asarray(logits + jax.random.gumbel(rng_rsample, logits.shape)), axis=-1)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    train = moe_lib.route(gate, x, moe=moe, train=True, rng=key)
    np.testing.assert_array_equal(train.expert_index[:, 0], noisy_choice)
    # The weight is the raw (noise-free) probability of the sampled expert.
    np.testing.assert_allclose(train.weight[:, 0], probs[np.arange(len(probs)), noisy_choice], rtol=1e-6)
    assert np.mean(noisy_choice != probs.argmax(-1)) > 0.2  # the noise does change choices
    evaluation = moe_lib.route(gate, x, moe=moe, train=False, rng=key)
    np.testing.assert_array_equal(evaluation.expert_index[:, 0], probs.argmax(-1))
    with pytest.raises(ValueError, match="RSample"):
        _noise_moe("RSample", k=2)


def test_rsample_choices_follow_the_softmax_distribution():
    # Gumbel noise on the logits makes the top-1 choice a sample from softmax(logits) (the
    # Gumbel-max trick); other noise (normal, logistic, a scaled Gumbel) misses by > 7 standard errors.
    n = 20000
    x = jnp.tile(jax.random.normal(jax.random.key(18), (1, 16)), (n, 1))
    gate = {"kernel": jax.random.normal(jax.random.key(19), (16, 4)) * 0.3}
    moe = _noise_moe("RSample", experts=4, drop_tokens=False)
    routing = moe_lib.route(gate, x, moe=moe, train=True, rng=jax.random.key(20))
    frequency = np.bincount(np.asarray(routing.expert_index[:, 0]), minlength=4) / n
    probs = np.asarray(jax.nn.softmax(x[0] @ gate["kernel"]), np.float64)
    assert probs.max() < 0.7 and probs.min() > 0.05, probs  # several experts are likely
    standard_error = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(frequency - probs) < 5 * standard_error), (frequency, probs)
