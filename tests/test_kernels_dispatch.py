"""Permute / unpermute kernels against moe_jax.dispatch's gathers: forward, gradients, lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from moe_jax import dispatch as dispatch_lib
from moe_jax import gating as gating_lib
from moe_jax.kernels import platform
from moe_jax.kernels.dispatch import kernel, ops, reference
from tests.helpers import needs_gpu

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=needs_gpu)]
SMALL_TILES = kernel.BlockSizes(block_rows=16, block_cols=16)  # several tiles per axis, ragged edges
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_case(num_tokens, num_experts, model_dim, k, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    logits = jax.random.normal(keys[0], (num_tokens, num_experts)) * 2
    routing = gating_lib.top_k_gating(logits, k=k, capacity_factor=1.0, min_capacity=1)
    x = jax.random.normal(keys[1], (num_tokens, model_dim)).astype(dtype)
    scale = jax.random.normal(keys[2], (num_experts, routing.capacity, model_dim)).astype(dtype)
    return routing, x, scale


def permute_combine_loss(permute, combine):
    """A loss through both ops, with a per-slot expert stand-in (scale * buffer) between them."""
    def loss(x, scale, weight, routing):
        buffer = permute(x, routing)
        y = combine(scale * buffer, routing.replace(weight=weight))
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), (buffer, y)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("num_tokens,num_experts,model_dim,k,dtype", [
    (45, 6, 40, 1, jnp.float32),
    (33, 5, 24, 2, jnp.bfloat16),
])
def test_matches_gather_path(interpret, num_tokens, num_experts, model_dim, k, dtype):
    routing, x, scale = make_case(num_tokens, num_experts, model_dim, k, dtype)
    assert float(routing.dropped_fraction) > 0.02, "the case should drop copies"

    def kernel_permute(x, routing):
        return ops.dispatch_to_buffer(x, routing.expert_index, routing.slot, routing.kept,
                                      num_experts=num_experts, capacity=routing.capacity,
                                      interpret=interpret, block_sizes=SMALL_TILES)

    def kernel_combine(out, routing):
        return ops.combine_from_buffer(out, routing.expert_index, routing.slot, routing.kept, routing.weight,
                                       interpret=interpret, block_sizes=SMALL_TILES)

    (_, (buffer, y)), grads = permute_combine_loss(kernel_permute, kernel_combine)(x, scale, routing.weight, routing)
    (_, (buffer_want, y_want)), grads_want = permute_combine_loss(
        dispatch_lib.gather_to_buffer, dispatch_lib.combine_from_buffer)(x, scale, routing.weight, routing)

    np.testing.assert_array_equal(np.asarray(buffer, np.float32), np.asarray(buffer_want, np.float32))
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_want, np.float32), rtol=tol, atol=tol)
    for got, want, name in zip(grads, grads_want, ("x", "expert outputs", "weights")):
        assert float(jnp.abs(want.astype(jnp.float32)).sum()) > 0, name
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=5 * tol, atol=5 * tol, err_msg=name)


def test_row_primitives_match_spec_with_scales_and_unit_weights():
    """The variants the backward passes use: gather with row scales, combine with unit weights."""
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (21, 40))
    source = jax.random.randint(keys[1], (37,), -2, 24)  # out-of-range sources are empty rows
    row_scale = jax.random.normal(keys[2], (37,))
    position = jax.random.randint(keys[3], (21, 2), -1, 40)
    rows = jax.random.normal(keys[0], (37, 40))
    np.testing.assert_allclose(
        kernel.gather_rows(x, source, row_scale, block_sizes=SMALL_TILES, interpret=True),
        reference.gather_rows(x, source, row_scale), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(kernel.combine_rows(rows, position, block_sizes=SMALL_TILES, interpret=True),
                               reference.combine_rows(rows, position), rtol=1e-6, atol=1e-6)


def test_lowers_for_cuda():
    """Forward and backward kernels lower to Triton at a realistic size, bfloat16."""
    num_tokens, num_experts, capacity, model_dim, k = 16384, 128, 160, 2048, 2
    table = jax.ShapeDtypeStruct((num_tokens, k), jnp.int32)
    x = jax.ShapeDtypeStruct((num_tokens, model_dim), jnp.bfloat16)
    buffer = jax.ShapeDtypeStruct((num_experts, capacity, model_dim), jnp.bfloat16)
    weight = jax.ShapeDtypeStruct((num_tokens, k), jnp.float32)
    kept = jax.ShapeDtypeStruct((num_tokens, k), jnp.bool_)

    def loss(x, buffer, weight, expert_index, slot, kept):
        dispatched = ops.dispatch_to_buffer(x, expert_index, slot, kept, num_experts=num_experts,
                                            capacity=capacity, interpret=False)
        y = ops.combine_from_buffer(buffer * dispatched, expert_index, slot, kept, weight, interpret=False)
        return jnp.sum(y.astype(jnp.float32))

    hlo = platform.lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), x, buffer, weight, table, table, kept)
    # forward gather; backward: combine (d_x), gather with row scales (d_buffer), row dots (d_weight)
    assert hlo.count(pltriton.CUSTOM_CALL_TARGET_NAME) >= 4
