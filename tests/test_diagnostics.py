"""Router gradient diagnostics (moe_jax.diagnostics): the two gradients are the training loss's
parts, the cosine is theirs, a mesh gives the same numbers, and the trainer logs them."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import config, diagnostics, model, parallel, train_lib, trainer

CFG = config.ModelConfig(vocab_size=32, num_layers=4, hidden_size=16, num_heads=2, ffn_size=32, max_seq_len=16,
                         moe=config.MoEConfig(experts="4x1,8x1", drop_tokens=False, use_rts=False,
                                              aux_loss_coef=0.5))


def _batch():
    keys = jax.random.split(jax.random.key(1))
    return {"inputs": jax.random.randint(keys[0], (16, 16), 0, 32),
            "targets": jax.random.randint(keys[1], (16, 16), 0, 32)}


def _params():
    return model.init_params(jax.random.key(0), CFG)


def test_the_two_gradients_add_up_to_the_training_loss_gradient_on_each_gate():
    params, batch, rng = _params(), _batch(), jax.random.key(2)
    out = diagnostics.router_gradients(params, batch, CFG, rng)
    assert sorted(out) == ["1", "3"]
    full = jax.grad(lambda p: train_lib.loss_fn(p, batch, CFG, rngs={"gating": rng}, train=True)[0])(params)

    def part(which):
        def loss(p):
            logits, aux = model.apply(p, batch["inputs"], CFG, train=True, rngs={"gating": rng})
            return model.lm_loss(logits, batch["targets"]) if which == "lm" else CFG.moe.aux_loss_coef * aux["aux_loss"]
        return diagnostics.gate_kernels(jax.grad(loss)(params), CFG)

    lm, balance = part("lm"), part("balance")
    for layer, stats in out.items():
        total = diagnostics.gate_kernels(full, CFG)[layer]
        np.testing.assert_allclose(lm[layer] + balance[layer], total, rtol=1e-4, atol=1e-7)
        a, b = np.asarray(lm[layer], np.float64).ravel(), np.asarray(balance[layer], np.float64).ravel()
        np.testing.assert_allclose(stats["cosine"], a @ b / np.linalg.norm(a) / np.linalg.norm(b), rtol=1e-4)
        np.testing.assert_allclose(stats["lm_norm"], np.linalg.norm(a), rtol=1e-5)
        np.testing.assert_allclose(stats["balance_norm"], np.linalg.norm(b), rtol=1e-5)
        assert float(stats["balance_norm"]) > 0 and -1 <= float(stats["cosine"]) <= 1


def test_without_a_balance_loss_its_gradient_is_zero_and_the_cosine_zero():
    cfg = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, aux_loss_coef=0.0))
    out = diagnostics.router_gradients(model.init_params(jax.random.key(0), cfg), _batch(), cfg, jax.random.key(2))
    for stats in out.values():
        assert float(stats["balance_norm"]) == 0.0 and float(stats["cosine"]) == 0.0 and float(stats["lm_norm"]) > 0


def test_a_mesh_gives_the_single_device_numbers():
    params, batch, rng = _params(), _batch(), jax.random.key(2)
    want = diagnostics.router_gradients(params, batch, CFG, rng)
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    got = jax.jit(lambda p, b: diagnostics.router_gradients(p, b, CFG, rng, parallel=par))(
        jax.device_put(params, parallel.shardings(parallel.param_specs(params, par), par.mesh)),
        parallel.device_put_batch(batch, par))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, want)


def test_a_dense_model_has_none():
    cfg = dataclasses.replace(CFG, moe=None)
    assert diagnostics.router_gradients(model.init_params(jax.random.key(0), cfg), _batch(), cfg,
                                        jax.random.key(0)) == {}


def test_the_trainer_logs_them_at_each_evaluation(tmp_path):
    from experiments.configs import load_config_file

    c = load_config_file("moe", "tiny")
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps, c.eval_batches = 4, 1, 2, 4, 1
    c.data.batch_size, c.data.seq_len, c.data.max_bytes = 8, 32, 1 << 19
    c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.ffn_size, c.model.max_seq_len = 2, 32, 2, 64, 64
    c.routing_probe = False
    trainer.train_and_evaluate(c, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        records = {r["step"]: r for r in map(json.loads, f) if "step" in r}
    for step in (2, 4):  # the evaluation steps, and only them
        assert -1 <= records[step]["router_grad/layer1/cosine"] <= 1 and records[step]["router_grad/layer1/lm_norm"] > 0
    assert "router_grad/layer1/cosine" not in records[1]
    assert jnp.isfinite(records[4]["moe/layer1/router_entropy"])
