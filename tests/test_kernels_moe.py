"""The MoE layer's "kernel" dispatch path: equal to the gather path, trainable, lowers for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from moe_jax import dispatch as dispatch_lib
from moe_jax import gating as gating_lib
from moe_jax import moe as moe_lib
from moe_jax.config import MoEConfig
from moe_jax.kernels import moe_layer, platform
from moe_jax.kernels.gating import ops as gating_ops

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]
MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=needs_gpu)]


def make_experts(key, num_experts, model_dim, ffn_dim, dtype=jnp.float32):
    keys = jax.random.split(key, 4)
    return {
        "w1": (jax.random.normal(keys[0], (num_experts, model_dim, ffn_dim)) / np.sqrt(model_dim)).astype(dtype),
        "b1": (jax.random.normal(keys[1], (num_experts, ffn_dim)) * 0.1).astype(dtype),
        "w2": (jax.random.normal(keys[2], (num_experts, ffn_dim, model_dim)) / np.sqrt(ffn_dim)).astype(dtype),
        "b2": (jax.random.normal(keys[3], (num_experts, model_dim)) * 0.1).astype(dtype),
    }


@pytest.mark.parametrize("interpret", MODES)
def test_kernel_path_equals_gather_path_with_gradients(interpret):
    num_tokens, num_experts, model_dim, ffn_dim = 48, 6, 16, 32
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (num_tokens, model_dim))
    routing = gating_lib.top_k_gating(jax.random.normal(keys[1], (num_tokens, num_experts)) * 2, k=2,
                                      capacity_factor=0.6, min_capacity=0)
    assert float(routing.dropped_fraction) > 0.1
    experts = make_experts(keys[2], num_experts, model_dim, ffn_dim)

    def loss_fn(dispatch):
        def loss(x, experts, weight):
            y = dispatch(x, routing.replace(weight=weight), experts)
            return jnp.sum(jnp.sin(y)), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    (_, y), grads = loss_fn(lambda *a: moe_layer.dispatch_kernel(*a, interpret=interpret))(x, experts, routing.weight)
    (_, y_want), grads_want = loss_fn(dispatch_lib.dispatch_gather)(x, experts, routing.weight)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5), grads, grads_want)


@pytest.mark.parametrize("router_impl", ["jnp", "kernel"])
def test_moe_layer_config_accepts_kernel_path(router_impl):
    """MoEConfig(dispatch="kernel") through moe_forward, with either router implementation (on CPU:
    the kernels' jnp references), equals the gather path with the jnp router."""
    num_tokens, num_experts, model_dim, ffn_dim = 40, 4, 8, 16
    keys = jax.random.split(jax.random.key(1), 3)
    params = {"gate": {"kernel": jax.random.normal(keys[0], (model_dim, num_experts))},
              "experts": make_experts(keys[1], num_experts, model_dim, ffn_dim)}
    x = jax.random.normal(keys[2], (2, num_tokens // 2, model_dim))
    moe = MoEConfig(experts=num_experts, k=2, capacity_factor=1.0, use_rts=False, router_impl=router_impl,
                    dispatch="kernel")
    reference = MoEConfig(experts=num_experts, k=2, capacity_factor=1.0, use_rts=False, dispatch="gather")
    forward = jax.jit(lambda p, x, moe: moe_lib.moe_forward(p, x, moe=moe, train=True, rng=jax.random.key(3))[0],
                      static_argnums=2)
    np.testing.assert_allclose(forward(params, x, moe), forward(params, x, reference), rtol=1e-5, atol=1e-5)


def test_fused_layer_lowers_for_cuda():
    """Gate, fused gating kernel and kernel dispatch, forward and backward, bfloat16, E=128."""
    num_tokens, num_experts, model_dim, ffn_dim = 4096, 128, 512, 1024
    x = jax.ShapeDtypeStruct((num_tokens, model_dim), jnp.bfloat16)
    gate = jax.ShapeDtypeStruct((model_dim, num_experts), jnp.float32)
    experts = jax.eval_shape(lambda: make_experts(jax.random.key(0), num_experts, model_dim, ffn_dim, jnp.bfloat16))

    def loss(x, gate, experts):
        logits = x.astype(jnp.float32) @ gate
        routing = gating_ops.top_k_gating(logits, k=1, capacity_factor=1.0, impl="pallas", interpret=False)
        y = moe_layer.dispatch_kernel(x, routing, experts, interpret=False)
        return jnp.mean(jnp.square(y.astype(jnp.float32))) + 0.01 * routing.aux_loss

    hlo = platform.lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), x, gate, experts)
    # 2 gating + permute + 2 gmm + combine forward; their transposes backward
    assert hlo.count(pltriton.CUSTOM_CALL_TARGET_NAME) >= 10
