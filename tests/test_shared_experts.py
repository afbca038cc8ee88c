"""Shared experts (moe.shared_experts, DeepSeekMoE): n always-on experts summed with the routed
output, on every dispatch path, one device and meshes; how Residual-MoE relates to them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, model, parallel
from moe_jax import dispatch as dispatch_lib
from moe_jax import moe as moe_lib
from moe_jax.experts import gelu
from tests.helpers import moe_layer_params

M, F, E, N_SHARED = 16, 8, 8, 3


def _params(seed=0):
    params = moe_layer_params(E, M, F, seed)
    keys = jax.random.split(jax.random.key(seed + 100), 4)
    params["shared"] = {"w1": jax.random.normal(keys[0], (M, N_SHARED * F)) * 0.3,
                        "b1": jax.random.normal(keys[1], (N_SHARED * F,)) * 0.1,
                        "w2": jax.random.normal(keys[2], (N_SHARED * F, M)) * 0.3,
                        "b2": jax.random.normal(keys[3], (M,)) * 0.1}
    return params


def _moe(path="gather", shared=N_SHARED):
    return config.MoEConfig(experts=E, k=2, drop_tokens=False, second_expert_sampling=False, use_rts=False,
                            dispatch=path, shared_experts=shared, row_exchange_factor=8.0)


def _loop_shared(shared, x):
    """Token by token, expert by expert: n experts of width F (the columns of the shared MLP), the
    b2 bias once (n experts' output biases summed are one bias)."""
    x = np.asarray(x, np.float64).reshape(-1, M)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), shared)
    out = np.zeros_like(x)
    for s, token in enumerate(x):
        for j in range(N_SHARED):
            cols = slice(j * F, (j + 1) * F)
            hidden = np.asarray(gelu(jnp.asarray(token @ p["w1"][:, cols] + p["b1"][cols])), np.float64)
            out[s] += hidden @ p["w2"][cols]
        out[s] += p["b2"]
    return out


@pytest.mark.parametrize("path", sorted(dispatch_lib.PATHS))
def test_output_is_the_routed_output_plus_each_shared_expert(path):
    params = _params()
    x = jax.random.normal(jax.random.key(1), (4, 6, M))
    routed_only = {k: v for k, v in params.items() if k != "shared"}
    y_routed, _ = moe_lib.moe_forward(routed_only, x, moe=_moe(path, shared=0), train=True)
    y, _ = moe_lib.moe_forward(params, x, moe=_moe(path), train=True)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, M) - np.asarray(y_routed).reshape(-1, M),
                               _loop_shared(params["shared"], x), rtol=1e-4, atol=1e-5)


def test_gradients_equal_the_loop_reference_in_jax():
    params = _params(1)
    x = jax.random.normal(jax.random.key(2), (3, 5, M))

    def loss(p, x):
        return jnp.sum(jnp.sin(moe_lib.moe_forward(p, x, moe=_moe(), train=True)[0]))

    def reference(p, x):  # routed layer alone + n separate experts, each its own MLP
        routed, _ = moe_lib.moe_forward({k: v for k, v in p.items() if k != "shared"}, x, moe=_moe(shared=0),
                                        train=True)
        s = p["shared"]
        extra = s["b2"]
        for j in range(N_SHARED):
            cols = slice(j * F, (j + 1) * F)
            extra = extra + gelu(x @ s["w1"][:, cols] + s["b1"][cols]) @ s["w2"][cols]
        return jnp.sum(jnp.sin(routed + extra))

    got = jax.grad(loss, argnums=(0, 1))(params, x)
    want = jax.grad(reference, argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
    assert float(jnp.abs(got[0]["shared"]["w1"]).max()) > 0.01  # the shared experts learn


EP_PATHS = [name for name, path in dispatch_lib.PATHS.items() if path.payload is not None]


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
@pytest.mark.parametrize("path", EP_PATHS)
def test_on_a_mesh_equal_to_one_device(mesh, path):
    params = _params(2)
    x = jax.random.normal(jax.random.key(3), (16, 4, M))
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh))

    def loss(params, x, par):
        y, stats = moe_lib.moe_forward(params, x, moe=_moe(path), train=True, parallel=par)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"], y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (_, y_ref), grads_ref = grad(params, x, None)
    (_, y), grads = grad(params, x, par)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, grads_ref)


def test_shared_experts_are_split_like_a_dense_mlp_never_over_the_expert_axes():
    cfg = config.ModelConfig(vocab_size=32, num_layers=2, hidden_size=16, num_heads=2, ffn_size=32, max_seq_len=8,
                             moe=config.MoEConfig(experts=8, shared_experts=2))
    params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), cfg))
    assert params["block_1"]["moe"]["shared"]["w1"].shape == (16, 64)
    specs = parallel.param_specs(params, parallel.ParallelConfig(parallel.make_mesh(1, 4, 2)))
    shared = specs["block_1"]["moe"]["shared"]
    assert (shared["w1"], shared["w2"], shared["b2"]) == (
        jax.sharding.PartitionSpec(None, "tensor"), jax.sharding.PartitionSpec("tensor", None),
        jax.sharding.PartitionSpec())
    counts = model.count_params(cfg)
    assert counts.total - counts.active == (8 - 1) * (16 * 32 * 2 + 32 + 16)  # shared ones are all active


def test_residual_moe_at_even_coefficients_is_half_of_one_shared_expert_plus_top1():
    params = moe_layer_params(E, M, 4 * F, 4)
    mlp = {"w1": params["experts"]["w1"][0] * 0.7, "b1": params["experts"]["b1"][1], "w2": params["experts"]["w2"][2],
           "b2": params["experts"]["b2"][3]}
    residual = {**params, "residual": {"mlp": mlp, "coef": {"kernel": jnp.zeros((M, 2)), "bias": jnp.zeros(2)}}}
    shared = {**params, "shared": mlp}
    base = dict(experts=E, k=1, drop_tokens=False, use_rts=False)
    x = jax.random.normal(jax.random.key(5), (2, 7, M))
    y_residual, _ = moe_lib.moe_forward(residual, x, moe=config.MoEConfig(residual=True, **base), train=True)
    y_shared, _ = moe_lib.moe_forward(shared, x, moe=config.MoEConfig(shared_experts=1, **base), train=True)
    np.testing.assert_allclose(y_residual, 0.5 * y_shared, rtol=1e-5, atol=1e-6)


def test_the_tiny_preset_keeps_the_tiny_moe_active_compute():
    moe, fine = config.preset("tiny+moe"), config.preset("tiny+shared-fine")
    routed_and_shared = (fine.moe.k + fine.moe.shared_experts) * fine.expert_ffn_size
    assert routed_and_shared == moe.moe.k * moe.expert_ffn_size == moe.ffn_size
    assert fine.layer_experts()[1] * fine.expert_ffn_size == moe.layer_experts()[1] * moe.expert_ffn_size


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="shared_experts=-1"):
        dataclasses.replace(config.MoEConfig(), shared_experts=-1)


def test_the_config_file_builds_the_preset_at_tiny():
    from experiments.configs import load_config_file
    from moe_jax import run_config

    built = run_config.model_config(load_config_file("shared_fine", "tiny"))
    want = config.preset("tiny+shared-fine")
    assert built.moe == want.moe and built.expert_ffn_size == want.expert_ffn_size == 128
