"""MoE layer: Residual-MoE by hand, gradients to every part, placement in the model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import moe as moe_lib
from moe_jax.config import MoEConfig
from moe_jax.dispatch import gelu
from moe_jax.gating import top_k_gating


def layer_params(rng, M=16, F=32, E=4, residual=True):
    keys = jax.random.split(rng, 10)
    normal = lambda i, shape, scale=0.3: jax.random.normal(keys[i], shape) * scale
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
