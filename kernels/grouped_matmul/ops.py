"""Public entry of the grouped matmul: jax.lax.ragged_dot's semantics, trainable.

    out = grouped_matmul(lhs [N, K], rhs [G, K, Nout], group_sizes [G])   -> [N, Nout]

Rows are sorted by group (the dropless / compact expert layout): rows [start_g, start_g + size_g)
use rhs[g]; rows past sum(group_sizes) are zero. lhs and rhs must share a dtype; products are
accumulated in float32 and the result has lhs's dtype.

Backward (`jax.custom_vjp`), both with the kernels: d_lhs = gmm(d_out, rhs, transpose_rhs=True)
and d_rhs = tgmm(lhs, d_out). `interpret` chooses the implementation as platform.mode (CPU
default: jax.lax.ragged_dot, which XLA:CPU runs as a dense masked matmul).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.kernels import platform
from moe_jax.kernels.grouped_matmul import kernel, reference
from moe_jax.kernels.grouped_matmul.kernel import BlockSizes


def _gmm(run, block_sizes, lhs, rhs, group_sizes, transpose_rhs=False):
    if run == platform.REFERENCE:
        return reference.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs)
    return kernel.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, block_sizes=block_sizes,
                      interpret=run == platform.INTERPRET)


def _tgmm(run, block_sizes, lhs, grad, group_sizes):
    if run == platform.REFERENCE:
        return reference.tgmm(lhs, grad, group_sizes)
    return kernel.tgmm(lhs, grad, group_sizes, block_sizes=block_sizes, interpret=run == platform.INTERPRET)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(lhs, rhs, group_sizes, run, block_sizes):
    return _gmm(run, block_sizes, lhs, rhs, group_sizes)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, run, block_sizes):
    return _gmm(run, block_sizes, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(run, block_sizes, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_out = d_out.astype(lhs.dtype)
    d_lhs = _gmm(run, block_sizes, d_out, rhs, group_sizes, transpose_rhs=True)
    d_rhs = _tgmm(run, block_sizes, lhs, d_out, group_sizes)
    return d_lhs, d_rhs.astype(rhs.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   interpret: Optional[bool] = None, block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """lhs [N, K] (rows sorted by group), rhs [G, K, Nout], group_sizes [G] int -> [N, Nout]."""
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"lhs ({lhs.dtype}) and rhs ({rhs.dtype}) must share a dtype; cast one")
    if lhs.shape[1] != rhs.shape[1] or group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"shapes lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape} do not "
                         "match [N, K], [G, K, Nout], [G]")
    return _grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32), platform.mode(interpret), block_sizes)
