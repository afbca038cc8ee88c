"""The fused gating kernel against moe_jax.gating.top_k_gating and its own jnp spec.

On CPU the Pallas kernel runs in interpret mode and is lowered for CUDA; the jax-triton kernel is
compiled for sm_90 where triton imports (the [gpu] extra); the compiled kernels (Pallas and
jax-triton) run in the `gpu`-marked cases, which skip without a GPU.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from moe_jax import gating as gating_lib
from moe_jax.kernels import platform
from moe_jax.kernels.gating import kernel, ops, reference, triton_kernel
from moe_jax import routing as routing_lib
from tests.helpers import ON_GPU, needs_gpu

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

# interpret=True everywhere; interpret=False (the compiled kernel) only on a GPU.
MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=needs_gpu)]
SMALL_BLOCKS = kernel.BlockSizes(block_tokens=16)  # several blocks even for small S: tests the scan

INT_FIELDS = ("expert_index", "slot", "kept", "expert_counts")
FLOAT_FIELDS = ("weight", "aux_loss", "z_loss", "dropped_fraction", "gate_fraction", "token_fraction")


def make_inputs(num_tokens, num_experts, noise, dtype=jnp.float32, seed=0):
    """Random logits (scaled so experts are unevenly loaded and capacity drops happen) and the
    routing keyword arguments for the requested noise."""
    keys = jax.random.split(jax.random.key(seed), 3)
    logits = (jax.random.normal(keys[0], (num_tokens, num_experts)) * 2).astype(dtype)
    noise_kwargs = {
        None: {},
        "gumbel": {"second_expert_sampling": True, "gumbel": jax.random.gumbel(keys[1], logits.shape)},
        "rng": {"second_expert_sampling": True, "rng": keys[2]},
        "rsample": {"rsample_noise": jax.random.gumbel(keys[1], logits.shape)},
    }[noise]
    return logits, noise_kwargs


def assert_routing_equal(got, want, rtol=1e-6, atol=1e-6):
    assert got.capacity == want.capacity and got.num_experts == want.num_experts
    for field in INT_FIELDS:
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    for field in FLOAT_FIELDS:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=rtol, atol=atol, err_msg=field)


def routing_loss(routing):
    """Touches every differentiable output, each element with its own weight."""
    weight_scale = jnp.linspace(0.5, 1.5, routing.weight.size).reshape(routing.weight.shape)
    gate_scale = jnp.linspace(0.5, 1.5, routing.gate_fraction.size)
    return (jnp.sum(jnp.sin(routing.weight * weight_scale)) + 3.0 * routing.aux_loss + 0.5 * routing.z_loss
            + jnp.sum(routing.gate_fraction * gate_scale))


def routing_and_grad(router, logits, options):
    """(routing, d routing_loss / d logits) in one jitted call: eager dispatch would compile every op.
    Array options (noise, rng) are traced, the rest are static."""
    arrays = {name: value for name, value in options.items() if isinstance(value, jax.Array)}
    static = {name: value for name, value in options.items() if name not in arrays}

    def loss_and_routing(logits, arrays):
        routing = router(logits, **static, **arrays)
        return routing_loss(routing), routing

    (_, routing), grad = jax.jit(jax.value_and_grad(loss_and_routing, has_aux=True))(logits, arrays)
    return routing, grad


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_tokens,num_experts,k,drop_tokens,noise,dtype", [
    (37, 6, 1, True, None, jnp.float32),
    (50, 7, 1, True, "rsample", jnp.bfloat16),  # bfloat16 logits: both route in float32
    (130, 12, 2, True, "gumbel", jnp.float32),
    (64, 16, 2, False, "rng", jnp.float32),
])
def test_matches_reference_router(interpret, num_tokens, num_experts, k, drop_tokens, noise, dtype):
    logits, noise_kwargs = make_inputs(num_tokens, num_experts, noise, dtype)
    options = dict(k=k, capacity_factor=1.0, min_capacity=1, drop_tokens=drop_tokens, **noise_kwargs)
    want, grad_want = routing_and_grad(gating_lib.top_k_gating, logits, options)
    got, grad_got = routing_and_grad(
        functools.partial(ops.top_k_gating, interpret=interpret, block_sizes=SMALL_BLOCKS), logits, options)
    assert_routing_equal(got, want)
    if drop_tokens:
        assert float(want.dropped_fraction) > 0.02, "the case should exercise capacity dropping"
    assert float(jnp.abs(grad_want).sum()) > 0
    np.testing.assert_allclose(grad_got, grad_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_tokens,num_experts,capacity_factor,min_capacity,scores,dtype", [
    (96, 5, 0.5, 1, "rng", jnp.float32),  # heavy overflow: most experts keep a fraction of their tokens
    (6, 12, 1.0, 1, "rng", jnp.float32),  # fewer tokens than experts
    (20, 4, 1.0, 32, "rng", jnp.float32),  # capacity above S: nothing is dropped
    (70, 6, 0.8, 1, "ties", jnp.bfloat16),  # four distinct scores: ties keep the earlier token
])
def test_random_token_selection_matches_reference_router(interpret, num_tokens, num_experts, capacity_factor,
                                                         min_capacity, scores, dtype):
    """use_rts=True (k=1): an over-full expert keeps its C highest-scoring tokens, in the kernel."""
    logits, noise_kwargs = make_inputs(num_tokens, num_experts, "rsample", dtype, seed=num_tokens)
    key = jax.random.key(num_experts)
    if scores == "rng":  # drawn inside both routers, the same way
        noise_kwargs["rng"] = key
    else:
        noise_kwargs["rts_scores"] = jnp.floor(jax.random.uniform(key, logits.shape) * 4) / 4
    options = dict(k=1, capacity_factor=capacity_factor, min_capacity=min_capacity, use_rts=True, **noise_kwargs)
    want, grad_want = routing_and_grad(gating_lib.top_k_gating, logits, options)
    got, grad_got = routing_and_grad(
        functools.partial(ops.top_k_gating, interpret=interpret, block_sizes=SMALL_BLOCKS), logits, options)
    assert_routing_equal(got, want)
    first_come = gating_lib.top_k_gating(logits, **{**options, "use_rts": False})
    if want.capacity >= num_tokens:
        assert bool(jnp.all(want.kept))
    else:
        assert float(want.dropped_fraction) > 0.1
    if num_tokens > 64:  # with many drops the scores, not arrival order, choose the survivors
        assert not np.array_equal(want.kept, first_come.kept)
    np.testing.assert_allclose(grad_got, grad_want, rtol=1e-5, atol=1e-6)


def assert_outputs_equal(got, want):
    """Every field of two GatingOutputs: floats to 1e-6, integers and booleans exactly."""
    for field in got._fields:
        a, b = getattr(got, field), getattr(want, field)
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=field)
        else:
            np.testing.assert_array_equal(a, b, err_msg=field)


def test_kernel_matches_its_spec():
    """kernel.fused_gating against reference.fused_gating directly (the spec ops.py relies on)."""
    logits, _ = make_inputs(70, 9, None, seed=1)
    noise = jax.random.gumbel(jax.random.key(5), logits.shape)
    got = kernel.fused_gating(logits, noise, k=2, capacity=12, block_sizes=SMALL_BLOCKS, interpret=True)
    want = jax.jit(functools.partial(reference.fused_gating, k=2, capacity=12))(logits, noise)
    assert_outputs_equal(got, want)


def test_random_token_selection_kernel_matches_its_spec():
    """kernel.fused_gating with RTS scores against reference.fused_gating, with RSample noise and
    tied scores; an uneven last block (S = 75 with blocks of 16)."""
    logits, _ = make_inputs(75, 7, None, seed=2)
    keys = jax.random.split(jax.random.key(6))
    noise = jax.random.gumbel(keys[0], logits.shape)
    scores = jnp.floor(jax.random.uniform(keys[1], logits.shape) * 8) / 8
    got = kernel.fused_gating(logits, noise, scores, k=1, capacity=6, block_sizes=SMALL_BLOCKS, interpret=True)
    want = jax.jit(functools.partial(reference.fused_gating, k=1, capacity=6))(logits, noise, scores)
    assert float(want.dropped_fraction) > 0.2
    assert_outputs_equal(got, want)


@pytest.mark.parametrize("options,uses_kernel", [
    (dict(k=2, capacity_factor=1.0), True),
    (dict(k=3, capacity_factor=1.0), False),
    (dict(k=1, capacity_factor=1.0, use_rts=True, rng=jax.random.key(3)), True),
    (dict(k=1, capacity_factor=1.0, use_rts=True, rts_scores=jnp.ones((40, 6))), True),
    (dict(k=1, capacity_factor=1.0, use_rts=True), True),  # RTS without randomness: first come
    (dict(k=1, capacity_factor=1.0, use_rts=True, drop_tokens=False, rng=jax.random.key(3)), True),
])
def test_kernel_or_reference(options, uses_kernel):
    """k > 2 goes to moe_jax.gating.top_k_gating; the rest, random token selection included, to the
    kernel (the equality tests above cover both routes' results)."""
    jaxpr = jax.make_jaxpr(lambda lg: ops.top_k_gating(lg, interpret=True, **options))(jnp.ones((40, 6)))
    assert ("pallas_call" in str(jaxpr)) == uses_kernel


def test_bad_arguments():
    with pytest.raises(ValueError, match="k=4"):
        ops.top_k_gating(jnp.ones((8, 3)), k=4, capacity_factor=1.0)
    with pytest.raises(ValueError, match="impl='fast'"):
        ops.top_k_gating(jnp.ones((8, 3)), k=1, capacity_factor=1.0, impl="fast")
    with pytest.raises(ValueError, match="no interpret mode"):
        ops.top_k_gating(jnp.ones((8, 3)), k=1, capacity_factor=1.0, impl="triton", interpret=True)
    with pytest.raises(ValueError, match="no random token selection"):
        ops.top_k_gating(jnp.ones((8, 3)), k=1, capacity_factor=1.0, use_rts=True, rng=jax.random.key(0),
                         impl="triton")
    with pytest.raises(ValueError, match="scores are for k=1"):
        kernel.fused_gating(jnp.ones((8, 3)), None, jnp.ones((8, 3)), k=2, capacity=4, interpret=True)


@pytest.mark.parametrize("num_tokens,num_experts,k,with_noise,rts", [
    (16384, 128, 1, False, False), (16384, 128, 2, True, False), (1000, 100, 2, False, False),
    (77, 3, 1, True, False), (16384, 128, 1, True, True), (1000, 100, 1, False, True)])
def test_lowers_for_cuda(num_tokens, num_experts, k, with_noise, rts):
    """Both passes lower to Triton kernels for an H200, forward and through jax.grad."""
    logits = jax.ShapeDtypeStruct((num_tokens, num_experts), jnp.float32)
    noise = logits if with_noise else None
    scores = logits if rts else None
    hlo = platform.lower_for_gpu(
        lambda lg, n, r: kernel.fused_gating(lg, n, r, k=k, capacity=num_tokens // num_experts + 1),
        logits, noise, scores)
    assert hlo.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 2

    def loss(lg):
        return routing_loss(ops.top_k_gating(lg, k=k, capacity_factor=1.0, impl="pallas", interpret=False,
                                             use_rts=rts, rng=jax.random.key(0)))

    assert pltriton.CUSTOM_CALL_TARGET_NAME in platform.lower_for_gpu(jax.grad(loss), logits)


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_GPU and triton_kernel.available()), reason="needs a GPU and jax-triton")
@pytest.mark.parametrize("num_tokens,num_experts,k", [(4096, 64, 1), (1000, 100, 2)])
def test_jax_triton_kernel_matches_spec(num_tokens, num_experts, k):
    logits, _ = make_inputs(num_tokens, num_experts, None)
    noise = jax.random.gumbel(jax.random.key(7), logits.shape) if k == 2 else None
    capacity = routing_lib.compute_capacity(num_tokens, num_experts, 1.0, 4, k)
    got = triton_kernel.fused_gating(logits, noise, k=k, capacity=capacity)
    want = reference.fused_gating(logits, noise, k=k, capacity=capacity)
    for field in got._fields:
        a, b = getattr(got, field), getattr(want, field)
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=field)
        else:
            np.testing.assert_array_equal(a, b, err_msg=field)


@pytest.mark.skipif(triton_kernel.triton is None, reason="needs triton (the [gpu] extra)")
@pytest.mark.parametrize("num_tokens,num_experts,k,has_noise", [(4096, 64, 1, False), (1000, 100, 2, True)])
def test_jax_triton_kernel_compiles_for_sm90(num_tokens, num_experts, k, has_noise):
    """Triton compiles both passes to PTX and a cubin for an H200 on any machine."""
    capacity = routing_lib.compute_capacity(num_tokens, num_experts, 1.0, 4, k)
    compiled = triton_kernel.compile_for_gpu(num_tokens, num_experts, k=k, capacity=capacity, has_noise=has_noise)
    for name, function in [("route", "_route_block_kernel"), ("slots", "_slot_kernel")]:
        ptx = compiled[name].asm["ptx"]
        assert re.search(r"^\.target sm_90", ptx, re.MULTILINE), name
        assert re.search(rf"\.entry {function}", ptx), name
        assert len(compiled[name].asm["cubin"]) > 0, name


@pytest.mark.skipif(not platform.jax_triton_available(), reason="needs jax_triton and triton")
def test_default_gpu_kernel_can_be_jitted():
    """ops picks the jax-triton kernel on a GPU only where this jax can jit a triton_call; where it
    cannot (jax 0.12 with jax-triton 0.4.1), jitting one fails and ops picks the Pallas kernel."""
    impl, _ = ops._resolve_impl(None, interpret=False)
    if triton_kernel.jax_triton_fits_jax():
        assert impl == "triton"
        return
    assert impl == "pallas"
    logits = jax.ShapeDtypeStruct((64, 8), jnp.float32)
    per_copy = jax.ShapeDtypeStruct((64, 1), jnp.int32)

    def route(logits):
        return triton_kernel._triton_call(
            logits, logits, kernel=triton_kernel._route_block_kernel, grid=(1,), num_warps=4,
            out_shapes=(per_copy, jax.ShapeDtypeStruct((64, 1), jnp.float32), per_copy,
                        jax.ShapeDtypeStruct((1, 1, 8), jnp.int32), jax.ShapeDtypeStruct((1, 8), jnp.float32),
                        jax.ShapeDtypeStruct((1,), jnp.float32)),
            NUM_TOKENS=64, NUM_EXPERTS=8, K=1, BLOCK=64, PADDED_EXPERTS=8, HAS_NOISE=False)

    with pytest.raises(TypeError, match="positional arguments"):
        platform.lower_for_gpu(route, logits)
