"""DeepSeek-V3's sigmoid router (moe_jax.routers.sigmoid_gating) against a per-token loop, its bias,
its replay, and a model trained with it on one device and on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, parallel, routing_trace, train_lib
from moe_jax.routers import sigmoid_gating
from moe_jax import routing as routing_lib


def _loop_reference(logits, bias, k, capacity):
    """Token by token, choices in (choice, token) order: the routing as the docstring states it."""
    logits = np.asarray(logits, np.float64)
    num_tokens, num_experts = logits.shape
    scores = 1 / (1 + np.exp(-logits))
    choose = scores + (0 if bias is None else np.asarray(bias, np.float64))
    index = np.stack([np.argsort(-row, kind="stable")[:k] for row in choose])
    filled = np.zeros(num_experts, int)
    slot = np.zeros((num_tokens, k), int)
    kept = np.zeros((num_tokens, k), bool)
    for i in range(k):
        for s in range(num_tokens):
            e = index[s, i]
            slot[s, i] = filled[e]
            kept[s, i] = filled[e] < capacity
            filled[e] += 1
    chosen = np.take_along_axis(scores, index, axis=1) * kept
    weight = chosen / np.maximum(chosen.sum(1, keepdims=True), 1e-30)
    return index, np.where(kept, slot, 0), kept, weight


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_loop_reference(k, drop, with_bias):
    logits = jax.random.normal(jax.random.key(k), (40, 8)) * 2.0
    bias = jax.random.normal(jax.random.key(7), (8,)) * 0.3 if with_bias else None
    routing = sigmoid_gating(logits, k=k, capacity_factor=0.75, min_capacity=1, drop_tokens=drop,
                             selection_bias=bias)
    capacity = routing_lib.compute_capacity(40, 8, 0.75, 1, k) if drop else 40
    assert routing.capacity == capacity
    index, slot, kept, weight = _loop_reference(logits, bias, k, capacity)
    np.testing.assert_array_equal(routing.expert_index, index)
    np.testing.assert_array_equal(routing.kept, kept)
    np.testing.assert_array_equal(routing.slot, slot)
    np.testing.assert_allclose(routing.weight, weight, rtol=1e-5, atol=1e-7)
    if drop:
        assert 0 < float(routing.dropped_fraction) < 1  # the capacity binds: the drop rule is exercised
    np.testing.assert_allclose(routing.token_choices.sum(1), k)
    np.testing.assert_allclose(routing.token_gates.sum(1), 1, rtol=1e-6)


def test_the_bias_chooses_but_never_weighs():
    logits = jax.random.normal(jax.random.key(0), (32, 4))
    bias = jnp.array([0.0, 0.0, 0.0, 10.0])  # expert 3 first for every token
    routing = sigmoid_gating(logits, k=2, capacity_factor=4.0, drop_tokens=False, selection_bias=bias)
    assert np.all(np.asarray(routing.expert_index[:, 0]) == 3)
    scores = jax.nn.sigmoid(logits)
    chosen = np.take_along_axis(np.asarray(scores), np.asarray(routing.expert_index), axis=1)
    np.testing.assert_allclose(routing.weight, chosen / chosen.sum(1, keepdims=True), rtol=1e-6)


def test_balance_loss_is_one_at_perfect_balance_and_grows_with_imbalance():
    balanced = sigmoid_gating(jnp.zeros((8, 4)) + jnp.eye(4)[jnp.arange(8) % 4] * 1e-3, k=1, capacity_factor=2.0)
    np.testing.assert_allclose(balanced.aux_loss, 1.0, rtol=1e-3)
    skewed = sigmoid_gating(jnp.tile(jnp.array([[4.0, -4.0, -4.0, -4.0]]), (8, 1)), k=1, capacity_factor=2.0)
    assert float(skewed.aux_loss) > 2.0


def test_gradients_reach_the_logits_through_the_weights():
    logits = jax.random.normal(jax.random.key(3), (16, 8))
    grad = jax.grad(lambda x: jnp.sum(sigmoid_gating(x, k=2, capacity_factor=2.0).weight * jnp.arange(2.0)))(logits)
    eps = 1e-3  # central differences on the routed columns (the choice is unchanged by a small step)
    direction = jax.random.normal(jax.random.key(4), logits.shape)
    f = lambda x: float(jnp.sum(sigmoid_gating(x, k=2, capacity_factor=2.0).weight * jnp.arange(2.0)))  # noqa: E731
    numeric = (f(logits + eps * direction) - f(logits - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(grad * direction)), numeric, rtol=2e-2, atol=1e-4)


def test_replay_of_its_own_code_reproduces_it():
    logits = jax.random.normal(jax.random.key(5), (24, 8))
    routing = sigmoid_gating(logits, k=2, capacity_factor=0.75, min_capacity=1)
    again = routing_trace.replay(routing, routing_trace.encode(routing), logits)
    for name in ("expert_index", "slot", "kept"):
        np.testing.assert_array_equal(getattr(again, name), getattr(routing, name))
    np.testing.assert_allclose(again.weight, routing.weight, rtol=1e-6)


CFG = config.ModelConfig(vocab_size=32, num_layers=2, hidden_size=16, num_heads=2, ffn_size=32, max_seq_len=16,
                         moe=config.MoEConfig(experts=8, k=2, router="sigmoid", drop_tokens=False, use_rts=False,
                                              bias_update_rate=0.01, aux_loss_coef=0.0))


def _train(par, steps=2):
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(warmup_steps=1, total_steps=10))
    state = train_lib.init_state(jax.random.key(0), CFG, optimizer)
    if par is not None:
        state = jax.device_put(state, parallel.shardings(parallel.state_specs(state, par, optimizer), par.mesh))
    step = jax.jit(lambda s, b: train_lib.train_step(s, b, jax.random.key(1), model_cfg=CFG, optimizer=optimizer,
                                                     parallel=par))
    losses = []
    for i in range(steps):
        keys = jax.random.split(jax.random.key(10 + i))
        batch = {"inputs": jax.random.randint(keys[0], (16, 16), 0, 32),
                 "targets": jax.random.randint(keys[1], (16, 16), 0, 32)}
        state, metrics = step(state, batch if par is None else parallel.device_put_batch(batch, par))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_a_model_with_the_sigmoid_router_and_loss_free_balancing_trains_alike_on_a_mesh():
    first, _ = _train(None, steps=1)
    assert float(jnp.abs(first["router_state"]["block_1"]["moe"]["selection_bias"]).max()) > 0  # biases moved
    state, losses = _train(None)
    assert np.all(np.isfinite(losses))
    mesh_state, mesh_losses = _train(parallel.ParallelConfig(parallel.make_mesh(1, 8, 1)))
    np.testing.assert_allclose(mesh_losses, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), mesh_state["params"],
                 state["params"])
