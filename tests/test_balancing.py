"""Aux-loss-free balancing: the selection bias picks experts only, its update, its state in training."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import balancing, checkpoint, config, parallel, train_lib, trainer
from moe_jax import moe as moe_lib
from moe_jax.gating import top_k_gating
from tests.helpers import losses

CFG = config.ModelConfig(vocab_size=32, num_layers=4, hidden_size=16, num_heads=2, ffn_size=32, max_seq_len=16,
                         moe=config.MoEConfig(experts="4x1,8x1", bias_update_rate=0.01, drop_tokens=False,
                                              use_rts=False))


def test_update_against_hand_computation():
    state = {"block_1": {"moe": {"selection_bias": jnp.array([0.1, -0.2, 0.0, 0.3])}},
             "block_3": {"moe": {"selection_bias": jnp.array([0.5, 0.5])}}}
    layers = {"1": {"expert_counts": jnp.array([10, 2, 4, 0])},  # mean 4
              "3": {"expert_counts": jnp.array([3, 3])}}  # balanced: no change
    updated = balancing.update_selection_bias(state, layers, 0.01)
    np.testing.assert_allclose(updated["block_1"]["moe"]["selection_bias"], [0.09, -0.19, 0.0, 0.31], rtol=1e-6)
    np.testing.assert_allclose(updated["block_3"]["moe"]["selection_bias"], [0.5, 0.5])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bias_moves_the_choice_but_not_the_weights(k):
    logits = jax.random.normal(jax.random.key(k), (32, 4))
    gates = jax.nn.softmax(logits)
    bias = jnp.array([0.0, 0.0, 0.0, 100.0])  # expert 3 is every token's first choice
    routing = top_k_gating(logits, k=k, capacity_factor=4.0, drop_tokens=False, selection_bias=bias)
    assert np.all(routing.expert_index[:, 0] == 3)
    if k == 1:  # the raw softmax probability, not that of the biased logits
        np.testing.assert_allclose(routing.weight[:, 0], gates[:, 3], rtol=1e-6)
    else:  # renormalised over the chosen experts' raw probabilities
        chosen = np.take_along_axis(np.asarray(gates), np.asarray(routing.expert_index), axis=1)
        np.testing.assert_allclose(routing.weight, chosen / chosen.sum(1, keepdims=True), rtol=1e-5)
    # the biased logits choose the other experts too: the rest of each token's order is unchanged
    expected = np.argsort(-np.asarray(logits + bias), axis=1, kind="stable")[:, :k]
    if k != 2:  # top-2's first choice is argmax of the biased logits, its second the next one too
        np.testing.assert_array_equal(np.sort(routing.expert_index, 1), np.sort(expected, 1))
    zero = top_k_gating(logits, k=k, capacity_factor=1.0, selection_bias=jnp.zeros(4))
    plain = top_k_gating(logits, k=k, capacity_factor=1.0)
    jax.tree.map(np.testing.assert_array_equal, zero, plain)


def test_bias_is_not_differentiated():
    moe = config.MoEConfig(experts=4, bias_update_rate=0.01, use_rts=False)
    keys = jax.random.split(jax.random.key(0), 3)
    params = {"gate": {"kernel": jax.random.normal(keys[0], (8, 4))},
              "experts": moe_lib.init_experts(keys[1], 4, 8, 16, 0.3, 0.3, jnp.float32)}
    x = jax.random.normal(keys[2], (16, 8))
    bias = jnp.array([0.3, -0.1, 0.2, 0.0])
    grad = jax.grad(lambda b: jnp.sum(moe_lib.moe_forward(params, x, moe=moe, train=True, selection_bias=b)[0]))(bias)
    np.testing.assert_array_equal(grad, 0.0)


def test_config_rejects_routers_without_a_selection_bias():
    with pytest.raises(ValueError, match="bias_update_rate=0.01 needs a router"):
        config.MoEConfig(bias_update_rate=0.01, router="expert_choice")
    with pytest.raises(ValueError, match="bias_update_rate=-1"):
        config.MoEConfig(bias_update_rate=-1)


def _batch(seed=1):
    keys = jax.random.split(jax.random.key(seed))
    return {"inputs": jax.random.randint(keys[0], (16, 16), 0, 32),
            "targets": jax.random.randint(keys[1], (16, 16), 0, 32)}


def _steps(cfg, par, num_steps=3):
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(warmup_steps=1, total_steps=10))
    state = train_lib.init_state(jax.random.key(0), cfg, optimizer)
    if par is not None:
        state = jax.device_put(state, parallel.shardings(parallel.param_specs(state, par), par.mesh))
    step = jax.jit(lambda s, b: train_lib.train_step(s, b, jax.random.key(2), model_cfg=cfg, optimizer=optimizer,
                                                     parallel=par))
    history = []
    for i in range(num_steps):
        batch = _batch(i)
        old = state["router_state"]
        state, metrics = step(state, batch if par is None else parallel.device_put_batch(batch, par))
        history.append((old, metrics["moe_layers"], state["router_state"]))
    return state, history


def test_train_step_updates_the_bias_from_the_whole_batch_and_equals_one_device_on_a_mesh():
    state, history = _steps(CFG, None)
    assert set(state["router_state"]) == {"block_1", "block_3"}
    assert "router_state" not in jax.tree_util.keystr(state["opt_state"])  # not an optimizer's parameter
    for old, layers, new in history:  # every step is the hand update from that step's loads
        expected = balancing.update_selection_bias(old, layers, 0.01)
        jax.tree.map(np.testing.assert_allclose, new, expected)
    assert float(jnp.abs(state["router_state"]["block_3"]["moe"]["selection_bias"]).max()) > 0
    mesh_state, _ = _steps(CFG, parallel.ParallelConfig(parallel.make_mesh(1, 8, 1)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), mesh_state["router_state"],
                 state["router_state"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), mesh_state["params"],
                 state["params"])


def test_without_the_option_the_state_has_no_router_state():
    cfg = config.replace_moe(CFG, bias_update_rate=0.0)
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig())
    assert "router_state" not in train_lib.init_state(jax.random.key(0), cfg, optimizer)


def _micro_config(steps):
    from experiments.configs import load_config_file

    config_dict = load_config_file("moe", "tiny")
    config_dict.total_steps = steps
    config_dict.log_every_steps = 1
    config_dict.eval_every_steps = config_dict.checkpoint_every_steps = 2
    config_dict.eval_batches = 1
    config_dict.data.batch_size, config_dict.data.seq_len, config_dict.data.max_bytes = 8, 32, 1 << 19
    config_dict.model.num_layers, config_dict.model.hidden_size, config_dict.model.num_heads = 2, 32, 2
    config_dict.model.ffn_size = config_dict.model.max_seq_len = 64
    config_dict.moe.experts = "4"
    config_dict.moe.bias_update_rate = 0.05
    return config_dict


def test_bias_is_checkpointed_and_resumed_exactly(tmp_path):
    straight = _micro_config(4)
    trainer.train_and_evaluate(straight, str(tmp_path / "straight"))
    split = _micro_config(4)
    split.stop_after_steps = 2
    trainer.train_and_evaluate(split, str(tmp_path / "split"))
    split.stop_after_steps = 0
    trainer.train_and_evaluate(split, str(tmp_path / "split"))
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")  # bit for bit
    with checkpoint.Checkpointer(tmp_path / "straight" / "checkpoints", read_only=True) as ckpt:
        items, _ = ckpt.restore(4, {"router_state": None})
    with checkpoint.Checkpointer(tmp_path / "split" / "checkpoints", read_only=True) as ckpt:
        resumed, _ = ckpt.restore(4, {"router_state": None})
    bias = np.asarray(items["router_state"]["block_1"]["moe"]["selection_bias"])
    assert np.abs(bias).max() > 0 and np.all(np.abs(bias) <= 4 * 0.05 + 1e-6)
    np.testing.assert_array_equal(bias, resumed["router_state"]["block_1"]["moe"]["selection_bias"])
    loaded = checkpoint.load_router_state(str(tmp_path / "straight"))  # what generate.py serves with
    np.testing.assert_array_equal(loaded["block_1"]["moe"]["selection_bias"], bias)


def test_serving_routes_with_the_trained_biases():
    from moe_jax import inference

    cfg = config.replace_moe(CFG, dispatch="gather")
    params = train_lib.model_lib.init_params(jax.random.key(3), cfg)
    state = balancing.init_router_state(cfg)
    rng = np.random.default_rng(0)  # biases large enough to move choices away from the gate's argmax
    state = jax.tree.map(lambda b: jnp.asarray(rng.normal(0, 0.5, b.shape), jnp.float32), state)
    tokens = jax.random.randint(jax.random.key(4), (3, 7), 0, 32)
    want, _ = train_lib.model_lib.apply(params, tokens, cfg, router_state=state, train=False)
    unbiased, _ = train_lib.model_lib.apply(params, tokens, cfg, router_state=balancing.init_router_state(cfg),
                                            train=False)
    assert float(jnp.abs(want - unbiased).max()) > 1e-4  # the biases change the routing here
    with pytest.raises(ValueError, match="pass its router_state"):
        inference.Generator(params, cfg)
    serve_cfg = inference.serving_config(cfg)
    logits, _ = inference.prefill(inference.serving_params(params, cfg, state), tokens,
                                  jnp.full((3,), 7, jnp.int32), cfg=serve_cfg, max_len=12)
    np.testing.assert_allclose(logits, want[:, -1], rtol=1e-5, atol=1e-5)
    generator = inference.Generator(params, cfg, router_state=state)
    first = generator.generate(np.asarray(tokens).tolist(), 1).tokens
    assert [row[0] for row in first] == np.asarray(jnp.argmax(want[:, -1], axis=-1)).tolist()
