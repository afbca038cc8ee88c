"""Rematerialisation (model.remat): the same loss and gradients as keeping every activation, less
memory, and the MoE-aware policy exchanging fewer tokens than recomputing whole blocks."""

import dataclasses

import jax
import numpy as np
import pytest

from moe_jax import config, cost, model, train_lib

BASE = config.ModelConfig(vocab_size=64, num_layers=4, hidden_size=32, num_heads=4, ffn_size=128, max_seq_len=32,
                          moe=config.MoEConfig(experts="4x1,8x1", k=2, drop_tokens=False, use_rts=False))


def _batch():
    keys = jax.random.split(jax.random.key(1))
    return {"inputs": jax.random.randint(keys[0], (16, 32), 0, 64),
            "targets": jax.random.randint(keys[1], (16, 32), 0, 64)}


def _value_and_grad(cfg):
    return jax.value_and_grad(lambda p, b: train_lib.loss_fn(p, b, cfg, rngs={"gating": jax.random.key(3)},
                                                             train=True)[0])


@pytest.mark.parametrize("remat,dispatch", [("block", "gather"), ("moe", "gather"), ("moe", "dropless"),
                                            pytest.param("moe", "einsum", marks=pytest.mark.slow),
                                            pytest.param("block", "dropless", marks=pytest.mark.slow)])
def test_loss_and_gradients_equal_the_plain_step(remat, dispatch):
    plain_cfg = config.replace_moe(BASE, dispatch=dispatch)
    cfg = dataclasses.replace(plain_cfg, remat=remat)
    params = model.init_params(jax.random.key(0), plain_cfg)
    assert jax.tree.structure(model.init_params(jax.random.key(0), cfg)) == jax.tree.structure(params)
    want = jax.jit(_value_and_grad(plain_cfg))(params, _batch())
    got = jax.jit(_value_and_grad(cfg))(params, _batch())
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got[1], want[1])


def _step_cost(remat, mesh):
    from experiments.configs import load_config_file

    c = load_config_file("pr_moe", "micro")
    c.model.remat = remat
    return cost.train_step_cost(c, mesh)


@pytest.mark.slow  # three compiles of a whole step on 8 devices; the equality tests above stay in the default run
def test_on_an_expert_mesh_moe_remat_saves_memory_without_exchanging_twice():
    plain, block, moe = (_step_cost(r, "1,8,1") for r in ("none", "block", "moe"))
    assert block.peak_memory < plain.peak_memory and moe.peak_memory < plain.peak_memory
    exchanged = {name: r.collective_bytes("all-to-all") for name, r in
                 (("none", plain), ("block", block), ("moe", moe))}
    # the dispatch exchange is never redone with the routing and expert inputs kept
    assert exchanged["none"] < exchanged["moe"] < exchanged["block"]


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="model.remat='all'"):
        dataclasses.replace(BASE, remat="all")
