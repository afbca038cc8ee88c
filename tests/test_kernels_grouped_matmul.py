"""The grouped matmul kernels against jax.lax.ragged_dot: forward, gradients, lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as pltriton

from moe_jax.kernels import platform
from moe_jax.kernels.grouped_matmul import kernel, ops, reference
from tests.helpers import ON_GPU, needs_gpu

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=needs_gpu)]
SMALL_TILES = kernel.BlockSizes(block_m=16, block_n=16, block_k=16, group_width=2)
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}


def loss_and_grads(matmul):
    def loss(lhs, rhs, group_sizes):
        out = matmul(lhs, rhs, group_sizes)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("group_sizes,inner,cols,dtype", [
    ([30, 0, 17, 40, 13], 40, 24, jnp.float32),  # an empty group; tiles straddle three boundaries
    ([3, 20, 0, 0, 50, 9], 24, 40, jnp.bfloat16),  # sum 82 < 100 rows: the tail must be zero
])
def test_matches_ragged_dot(interpret, group_sizes, inner, cols, dtype):
    num_rows = 100
    keys = jax.random.split(jax.random.key(0), 2)
    lhs = jax.random.normal(keys[0], (num_rows, inner)).astype(dtype)
    rhs = (jax.random.normal(keys[1], (len(group_sizes), inner, cols)) / np.sqrt(inner)).astype(dtype)
    sizes = jnp.asarray(group_sizes, jnp.int32)

    (_, out), grads = loss_and_grads(
        lambda lg, r, s: ops.grouped_matmul(lg, r, s, interpret=interpret, block_sizes=SMALL_TILES))(lhs, rhs, sizes)
    (_, out_want), grads_want = loss_and_grads(reference.gmm)(lhs, rhs, sizes)

    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_want, np.float32), rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(out[sum(group_sizes):], np.float32), 0)
    for got, want, name in zip(grads, grads_want, ("lhs", "rhs")):
        assert float(jnp.abs(want.astype(jnp.float32)).sum()) > 0, name
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tol, atol=tol * 2, err_msg=name)


def test_schedule_covers_every_row_once():
    """Each row lies in exactly one used (tile, group) pair, in its own group (or the zero tail)."""
    sizes = jnp.asarray([5, 0, 33, 16, 1, 0, 20], jnp.int32)  # sum 75 of 90 rows
    group, tile, row_lo, row_hi = (np.asarray(a) for a in kernel.schedule(sizes, 90, 16))
    ends = np.cumsum(sizes)
    owner = np.searchsorted(ends, np.arange(90), side="right")  # 7 (= G) past the last group
    covered = np.zeros(90, int)
    for g, t, lo, hi in zip(group, tile, row_lo, row_hi):
        if lo == hi:  # an unused pair
            continue
        assert t * 16 <= lo < hi <= (t + 1) * 16
        covered[lo:hi] += 1
        assert np.all(owner[lo:hi] == g)
    np.testing.assert_array_equal(covered, 1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_for_cuda(dtype):
    """gmm, its transposed-rhs form and tgmm lower to Triton at the benchmark's size."""
    lhs = jax.ShapeDtypeStruct((16384, 2048), dtype)
    rhs = jax.ShapeDtypeStruct((128, 2048, 8192), dtype)
    sizes = jax.ShapeDtypeStruct((128,), jnp.int32)

    def loss(lhs, rhs, sizes):
        return jnp.sum(ops.grouped_matmul(lhs, rhs, sizes, interpret=False).astype(jnp.float32))

    hlo = platform.lower_for_gpu(jax.value_and_grad(loss, argnums=(0, 1)), lhs, rhs, sizes)
    assert hlo.count(pltriton.CUSTOM_CALL_TARGET_NAME) == 3  # gmm, gmm(transpose_rhs), tgmm


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_large_bfloat16_matches_ragged_dot_on_gpu():
    num_rows, inner, cols, num_groups = 4096, 1024, 2048, 16
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (num_rows, inner), jnp.bfloat16)
    rhs = (jax.random.normal(keys[1], (num_groups, inner, cols)) / 32).astype(jnp.bfloat16)
    sizes = jnp.asarray(np.random.default_rng(0).multinomial(num_rows, np.full(num_groups, 1 / num_groups)),
                        jnp.int32)
    want = reference.gmm(lhs, rhs, sizes).astype(jnp.float32)
    got = kernel.gmm(lhs, rhs, sizes).astype(jnp.float32)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    try:
        import tokamax  # optional: compare when installed
    except ImportError:
        return
    np.testing.assert_allclose(tokamax.ragged_dot(lhs, rhs, sizes).astype(jnp.float32), want, rtol=2e-2, atol=2e-2)
