"""The balance loss's scope: the whole batch, each expert-parallel shard (DeepSpeed's), each sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, parallel
from moe_jax import moe as moe_lib


def _params(num_experts=8, model_dim=16, seed=5):
    keys = jax.random.split(jax.random.key(seed), 2)
    return {"gate": {"kernel": jax.random.normal(keys[0], (model_dim, num_experts))},
            "experts": moe_lib.init_experts(keys[1], num_experts, model_dim, 32, 0.3, 0.3, jnp.float32)}


def _moe(scope, k=1):
    return config.MoEConfig(experts=8, k=k, use_rts=False, second_expert_sampling=False, balance_loss_scope=scope)


@pytest.mark.parametrize("k", [1, 2])
def test_sequence_scope_against_hand_computation(k):
    params = _params()
    x = jax.random.normal(jax.random.key(1), (3, 8, 16))
    logits = np.asarray(x.reshape(-1, 16) @ params["gate"]["kernel"], np.float64).reshape(3, 8, 8)
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    first = np.eye(8)[gates.argmax(-1)]  # [B, T, E]: the aux loss counts first choices (k = 1, 2)
    expected = np.mean([8 * np.sum(gates[b].mean(0) * first[b].mean(0)) for b in range(3)])
    _, stats = moe_lib.moe_forward(params, x, moe=_moe("sequence", k), train=True)
    np.testing.assert_allclose(stats["aux_loss"], expected, rtol=1e-5)
    _, whole = moe_lib.moe_forward(params, x, moe=_moe("global", k), train=True)
    whole_expected = 8 * np.sum(gates.reshape(-1, 8).mean(0) * first.reshape(-1, 8).mean(0))
    np.testing.assert_allclose(whole["aux_loss"], whole_expected, rtol=1e-5)
    assert abs(float(stats["aux_loss"]) - float(whole["aux_loss"])) > 1e-3


def test_scopes_on_a_mesh():
    """(1, 8, 1): "per_shard" is the mean of each shard's own loss, "global" and "sequence" equal
    one device on the whole batch; per-shard differs from global there."""
    params = _params()
    x = jax.random.normal(jax.random.key(2), (16, 4, 16))
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    aux = {}
    for scope in ("global", "per_shard", "sequence"):
        moe = _moe(scope)
        _, stats = jax.jit(lambda p, x: moe_lib.moe_forward(p, x, moe=moe, train=True, parallel=par))(params, x)
        aux[scope] = float(stats["aux_loss"])
        if scope != "per_shard":
            _, single = moe_lib.moe_forward(params, x, moe=moe, train=True)
            np.testing.assert_allclose(aux[scope], single["aux_loss"], rtol=1e-5)
    shards = [moe_lib.moe_forward(params, part, moe=_moe("global"), train=True)[1]["aux_loss"]
              for part in jnp.split(x, 8)]
    np.testing.assert_allclose(aux["per_shard"], np.mean(shards), rtol=1e-5)
    assert abs(aux["per_shard"] - aux["global"]) > 1e-3
    _, single = moe_lib.moe_forward(params, x, moe=_moe("per_shard"), train=True)  # one device: one shard
    np.testing.assert_allclose(single["aux_loss"], aux["global"], rtol=1e-5)


def test_bad_scope_is_named():
    with pytest.raises(ValueError, match="balance_loss_scope='batch' is unknown"):
        config.MoEConfig(balance_loss_scope="batch")


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("scope", ["global", "sequence"])
def test_kernel_router_gives_the_jnp_routers_statistics(k, scope):
    """moe.router_impl='kernel' (its jnp spec off GPU) reports the per-token terms too: the sequence
    scope's loss and its gradient, and the router entropy, equal the jnp router's (they were NaN or
    raised before)."""
    import dataclasses

    params = _params()
    x = jax.random.normal(jax.random.key(2), (3, 8, 16))
    moe = _moe(scope, k)

    def run(impl):
        def loss(params):
            _, stats = moe_lib.moe_forward(params, x, moe=dataclasses.replace(moe, router_impl=impl), train=True)
            return stats["aux_loss"], stats
        (aux, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return aux, stats, grads["gate"]["kernel"]

    aux, stats, grad = run("kernel")
    aux_want, stats_want, grad_want = run("jnp")
    np.testing.assert_allclose(aux, aux_want, rtol=1e-5)
    np.testing.assert_allclose(grad, grad_want, rtol=1e-4, atol=1e-7)
    assert np.isfinite(float(stats["router_entropy"]))
    np.testing.assert_allclose(stats["router_entropy"], stats_want["router_entropy"], rtol=1e-5)
