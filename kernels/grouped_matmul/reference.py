"""Pure-jnp specification of the grouped matmul over expert-sorted rows (jax.lax.ragged_dot).

    gmm(lhs [N, K], rhs [G, K, Nout], group_sizes [G])  -> [N, Nout]
        rows [start_g, start_g + size_g) are multiplied by rhs[g]; rows past sum(group_sizes) are 0.
        transpose_rhs=True: rhs is [G, Nout, K] and rhs[g].T is used (the backward pass's d_lhs).
    tgmm(lhs [N, K], grad [N, Nout], group_sizes [G])   -> [G, K, Nout]
        per group lhs_g.T @ grad_g (the backward pass's d_rhs); groups with no rows give zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False) -> jax.Array:
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(lhs.dtype)


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The transpose of gmm in rhs, applied to `grad`: jax.vjp of ragged_dot."""
    shape = (group_sizes.shape[0], lhs.shape[1], grad.shape[1])
    _, transpose = jax.vjp(
        lambda rhs: jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                                       preferred_element_type=jnp.float32),
        jnp.zeros(shape, lhs.dtype))
    (d_rhs,) = transpose(grad.astype(jnp.float32))
    return d_rhs.astype(lhs.dtype)
