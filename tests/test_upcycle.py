"""Dense-to-MoE upcycling: which parameters are copied, the noise, the errors, and the trainer's init_from."""

import jax
import numpy as np
import pytest

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config, model, run_config, trainer, upcycle

DENSE = config.ModelConfig(vocab_size=40, num_layers=4, hidden_size=16, num_heads=2, ffn_size=32, max_seq_len=16)
PR_MOE = DENSE.replace(moe=config.MoEConfig(experts="2x1,4x1", residual=True, k=1))
TOP2 = DENSE.replace(moe=config.MoEConfig(experts="4", k=2, drop_tokens=False, use_rts=False))


def _trained_dense(seed=0):
    """Dense parameters with nothing at its initial value (biases and norms moved too)."""
    params = model.init_params(jax.random.key(seed), DENSE)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_copies_dense_weights_into_every_expert_and_the_residual():
    dense = _trained_dense()
    rng = jax.random.key(7)
    params = upcycle.upcycle_params(dense, PR_MOE, rng)
    fresh = model.init_params(jax.random.split(rng)[0], PR_MOE)
    assert jax.tree.structure(params) == jax.tree.structure(fresh)
    for name in ("wte", "wpe", "ln_f"):
        jax.tree.map(np.testing.assert_array_equal, params[name], dense[name])
    for i, experts in enumerate(PR_MOE.layer_experts()):
        block, source = params[f"block_{i}"], dense[f"block_{i}"]
        for part in ("ln1", "attn", "ln2"):
            jax.tree.map(np.testing.assert_array_equal, block[part], source[part])
        if not experts:
            jax.tree.map(np.testing.assert_array_equal, block["mlp"], source["mlp"])
            continue
        layer = block["moe"]
        for weight, value in layer["experts"].items():
            assert value.shape[0] == experts
            for e in range(experts):
                np.testing.assert_array_equal(value[e], source["mlp"][weight])
        jax.tree.map(np.testing.assert_array_equal, layer["residual"]["mlp"], source["mlp"])
        # the gate and the mixing coefficient are the fresh model's
        jax.tree.map(np.testing.assert_array_equal, layer["gate"], fresh[f"block_{i}"]["moe"]["gate"])
        jax.tree.map(np.testing.assert_array_equal, layer["residual"]["coef"],
                     fresh[f"block_{i}"]["moe"]["residual"]["coef"])


def test_noise_separates_the_experts_by_the_asked_fraction():
    dense = _trained_dense()
    params = upcycle.upcycle_params(dense, PR_MOE, jax.random.key(1), noise=0.1)
    layer, source = params["block_3"]["moe"]["experts"], dense["block_3"]["mlp"]
    for weight in ("w1", "w2"):
        delta = np.asarray(layer[weight]) - np.asarray(source[weight])[None]
        ratio = delta.std() / np.asarray(source[weight]).std()
        assert 0.08 < ratio < 0.12, (weight, ratio)
        assert np.abs(delta[0] - delta[1]).max() > 0  # each expert its own draw
    for bias in ("b1", "b2"):
        np.testing.assert_array_equal(layer[bias], np.broadcast_to(source[bias], layer[bias].shape))
    with pytest.raises(ValueError, match="noise=-1"):
        upcycle.upcycle_params(dense, PR_MOE, jax.random.key(1), noise=-1)


def test_upcycled_top2_without_dropping_computes_the_dense_model():
    """Identical experts whose two weights sum to 1: the MoE layer is the dense FFN exactly."""
    dense = _trained_dense(3)
    params = upcycle.upcycle_params(dense, TOP2, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 40)
    want, _ = model.apply(dense, tokens, DENSE)
    got, _ = model.apply(params, tokens, TOP2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shapes_that_do_not_fit_are_named():
    dense = _trained_dense()
    wider = PR_MOE.replace(moe=config.replace_moe(PR_MOE, expert_ffn_size=64).moe)
    with pytest.raises(ValueError, match=r"block_1/mlp/w1 has shape \(16, 32\), this model needs \(16, 64\)"):
        upcycle.upcycle_params(dense, wider, jax.random.key(0))
    deeper = PR_MOE.replace(num_layers=6, moe=config.MoEConfig(experts="2x2,4x1", residual=True))
    with pytest.raises(ValueError, match="no block_4"):
        upcycle.upcycle_params(dense, deeper, jax.random.key(0))
    moe_params = model.init_params(jax.random.key(0), PR_MOE)
    with pytest.raises(ValueError, match="these have MoE layers"):
        upcycle.upcycle_params(moe_params, PR_MOE, jax.random.key(0))


def _micro(name, steps):
    from experiments.configs import load_config_file

    c = load_config_file(name, "micro")
    c.total_steps, c.log_every_steps, c.eval_batches = steps, 1, 1
    c.eval_every_steps = c.checkpoint_every_steps = steps
    return c


def test_trainer_upcycles_a_dense_run_through_init_from(tmp_path):
    """The first step has learning rate 0 (warmup), so the step-1 checkpoint holds the upcycled
    parameters unchanged: they equal upcycle_params of the dense run's parameters."""
    dense_config = _micro("dense", 2)
    trainer.train_and_evaluate(dense_config, str(tmp_path / "dense"))
    dense_params, _ = checkpoint_lib.load_params(str(tmp_path / "dense"), "saved")

    moe_config = _micro("pr_moe", 2)
    moe_config.checkpoint_every_steps, moe_config.stop_after_steps = 1, 1
    moe_config.init_from, moe_config.init_from_noise = str(tmp_path / "dense"), 0.05
    moe_config.optim.warmup_steps = 1
    trainer.train_and_evaluate(moe_config, str(tmp_path / "pr_moe"))
    params, step = checkpoint_lib.load_params(str(tmp_path / "pr_moe"))
    assert step == 1
    model_cfg = run_config.model_config(moe_config, vocab_size=params["wte"].shape[0])
    want = upcycle.upcycle_params(dense_params, model_cfg, jax.random.split(jax.random.key(moe_config.seed))[0],
                                  noise=0.05)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, want)

    wide = _micro("pr_moe", 1)
    wide.model.hidden_size *= 2
    wide.init_from = str(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"config.init_from=.*dense: upcycling: the dense model's wte has shape"):
        trainer.train_and_evaluate(wide, str(tmp_path / "wide"))
