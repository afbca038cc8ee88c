"""Pure-jnp specification of the three row-movement primitives behind permute / unpermute.

A layout is given by `position [S, k]`: the row of the expert buffer that copy (s, j) of token s
occupies; any value outside [0, R) means the copy was dropped. `row_source [R]` is its inverse:
the token whose copy fills row r, or S for an empty row (ops.py builds it with one scatter).

  gather_rows(x [S, M], row_source [R], row_scale [R] | None)  -> [R, M]
      out[r] = row_scale[r] * x[row_source[r]]   (0 for empty rows)
  combine_rows(rows [R, M], position [S, k], weight [S, k] | None) -> [S, M]
      y[s] = sum_j weight[s, j] * rows[position[s, j]] over kept copies (weight None: 1)
  row_dots(a [S, M], rows [R, M], position [S, k]) -> [S, k] float32
      d[s, j] = <a[s], rows[position[s, j]]>   (0 for dropped copies)

Products and sums are taken in float32 and rounded once to the output dtype, as the kernels do.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def _padded(array: jax.Array) -> jax.Array:
    """[N, M] -> [N + 1, M] with a zero last row: where empty rows and dropped copies point."""
    return jnp.concatenate([array, jnp.zeros((1, array.shape[1]), array.dtype)], axis=0)


def _clean(index: jax.Array, size: int) -> jax.Array:
    """Indices outside [0, size) -> size (the zero row)."""
    return jnp.where((index >= 0) & (index < size), index, size)


def gather_rows(x: jax.Array, row_source: jax.Array, row_scale: Optional[jax.Array] = None) -> jax.Array:
    rows = _padded(x)[_clean(row_source, x.shape[0])].astype(jnp.float32)
    if row_scale is not None:
        rows = rows * row_scale.astype(jnp.float32)[:, None]
    return rows.astype(x.dtype)


def combine_rows(rows: jax.Array, position: jax.Array, weight: Optional[jax.Array] = None) -> jax.Array:
    picked = _padded(rows)[_clean(position, rows.shape[0])].astype(jnp.float32)  # [S, k, M]
    if weight is None:
        return jnp.sum(picked, axis=1).astype(rows.dtype)
    return jnp.einsum("skm,sk->sm", picked, weight.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST).astype(rows.dtype)


def row_dots(a: jax.Array, rows: jax.Array, position: jax.Array) -> jax.Array:
    picked = _padded(rows)[_clean(position, rows.shape[0])].astype(jnp.float32)  # [S, k, M]
    return jnp.einsum("skm,sm->sk", picked, a.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
