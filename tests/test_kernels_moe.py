"""The MoE layer's "kernel" path (fused gating, permute, grouped matmul, combine) against the jnp
router and the gather path: forward and gradients with every Pallas kernel in interpret mode on CPU
(compiled on a GPU), the config plumbing, and lowering for CUDA."""

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
from tests.helpers import make_experts, needs_gpu

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=needs_gpu)]


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


def routed_layer(x, gate, experts, *, router, dispatch, routing_options):
    """x [S, M] -> (y [S, M], routing): gate logits in float32, a router, a dispatch path."""
    routing = router(x.astype(jnp.float32) @ gate, **routing_options)
    return dispatch(x, routing, experts), routing


def layer_loss_and_grads(layer, x, gate, experts, rng):
    """Loss over the output and the router's losses, and its gradients in x, gate and experts."""
    def loss(x, gate, experts, rng):
        y, routing = layer(x, gate, experts, rng=rng)
        total = jnp.sum(jnp.sin(y.astype(jnp.float32))) + 0.1 * routing.aux_loss + 0.01 * routing.z_loss
        return total, (y, routing.dropped_fraction)

    grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(grad_fn)(x, gate, experts, rng), str(jax.make_jaxpr(grad_fn)(x, gate, experts, rng))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("routing_options,dtype", [
    (dict(k=1, capacity_factor=0.8, min_capacity=1, use_rts=True), jnp.float32),  # DeepSpeed's top-1
    (dict(k=2, capacity_factor=0.7, min_capacity=1, second_expert_sampling=True), jnp.float32),
    (dict(k=2, capacity_factor=1.0, min_capacity=1, second_expert_sampling=True), jnp.bfloat16),
])
def test_fused_layer_equals_gather_path_with_gradients(interpret, routing_options, dtype):
    """Gate -> fused gating kernel -> permute -> grouped matmuls -> combine, all kernels (the
    backward passes' too), against the jnp router and the gather path on the same rng."""
    num_tokens, num_experts, model_dim, ffn_dim = 56, 6, 16, 32
    keys = jax.random.split(jax.random.key(4), 4)
    x = jax.random.normal(keys[0], (num_tokens, model_dim)).astype(dtype)
    gate = jax.random.normal(keys[1], (model_dim, num_experts))
    experts = make_experts(keys[2], num_experts, model_dim, ffn_dim, dtype)

    def kernel_layer(x, gate, experts, rng):
        return routed_layer(
            x, gate, experts,
            router=lambda lg, **o: gating_ops.top_k_gating(lg, interpret=interpret, rng=rng, **o),
            dispatch=lambda *a: moe_layer.dispatch_kernel(*a, interpret=interpret), routing_options=routing_options)

    def gather_layer(x, gate, experts, rng):
        return routed_layer(x, gate, experts, router=lambda lg, **o: gating_lib.top_k_gating(lg, rng=rng, **o),
                            dispatch=dispatch_lib.dispatch_gather, routing_options=routing_options)

    ((loss, (y, dropped)), grads), jaxpr = layer_loss_and_grads(kernel_layer, x, gate, experts, keys[3])
    ((loss_want, (y_want, _)), grads_want), _ = layer_loss_and_grads(gather_layer, x, gate, experts, keys[3])
    assert float(dropped) > 0.05, "the case should drop tokens"
    for name in ("gather_rows", "combine_rows", "row_dots", "gmm", "tgmm"):
        assert name in jaxpr, f"the kernel path should run the {name} kernel"
    # the router: the Pallas kernel, or (on a GPU with jax-triton and without RTS) the jax-triton one
    assert "gating_route" in jaxpr or (not routing_options.get("use_rts") and "triton_kernel_call" in jaxpr)
    if routing_options.get("use_rts"):
        assert "gating_rts_slots" in jaxpr
    assert_close_for_dtype(y, y_want, dtype)
    assert_close_for_dtype(loss, loss_want, dtype)
    jax.tree.map(lambda got, want: assert_close_for_dtype(got, want, dtype), grads, grads_want)


def assert_close_for_dtype(got, want, dtype):
    """Within a few units in the last place of the largest reference value: float32 differs only in
    the order of accumulation (16 eps), bfloat16 by a rounding or two of the outputs (2 eps)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    ulps = 16 if dtype == jnp.float32 else 2
    atol = ulps * float(jnp.finfo(dtype).eps) * float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


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
