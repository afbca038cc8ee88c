"""Gradient reduction in a chosen dtype (`mesh.grad_reduce_dtype`): where the partitioner reduces.

On a batch-sharded mesh a replicated weight's gradient is a per-device partial sum, and XLA's SPMD
partitioner all-reduces it (or, under ZeRO, all-reduces and slices: a reduce-scatter on GPU) right
after the matmul that produces it, in that matmul's output dtype. JAX's transpose of a matmul
emits the weight gradient in the dtype of the weight as used, i.e. the compute dtype: float32
compute reduces float32 gradients, bfloat16 compute bfloat16 ones. A cast of the gradient after
the matmul does not move the reduction (it is placed before the cast), so the dtype is set where
the gradient is made: `matmul` is an einsum whose weight gradient is emitted in the reduce dtype
(the matmul still accumulates in float32 inside; its output is rounded once, before the
reduction) and cast back to the weight's dtype after it, which is where the float32 optimizer
accumulates it.

`reduce_gradients_in(dtype)` sets the dtype while the train step traces its gradient (as
`jax.default_matmul_precision` sets a precision); outside it every `matmul` is the plain einsum.
Where the reduce dtype equals the compute dtype the plain einsum is used too, so the default
(float32 with float32 compute) traces exactly the program it always did.

Covered: the weight matmuls that run under GSPMD (attention, the dense FFN, Residual-MoE's MLP,
shared experts, the untied logits) through `matmul`; the weights that enter shard_map (the experts
on every dispatch path, the tied embedding) through `copies`: per-device copies whose sum, the
gradient's reduction, is taken in the reduce dtype (their matmuls inside shard_map are local).
Biases and LayerNorm scales outside the experts, the position embedding, the gate and the
Residual-MoE coefficient are reduced as autodiff makes them (float32 under float32 compute, and
`add_bias` keeps bias sums float32 under a float32 reduction with bfloat16 compute): vectors and
[M, E] matrices, 0.5-1% of the tiny model's gradient bytes, and the router's numerics.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

REDUCE_DTYPES = ("float32", "bfloat16")
_REDUCE_DTYPE: contextvars.ContextVar = contextvars.ContextVar("grad_reduce_dtype", default=None)


def check_dtype(name: str) -> str:
    if name not in REDUCE_DTYPES:
        raise ValueError(f"mesh.grad_reduce_dtype={name!r}: expected one of {REDUCE_DTYPES}")
    return name


@contextlib.contextmanager
def reduce_gradients_in(dtype: Optional[str]) -> Iterator[None]:
    """Within: `matmul`s emit their weight gradients in `dtype` (None: as autodiff does)."""
    token = _REDUCE_DTYPE.set(None if dtype is None else jnp.dtype(check_dtype(dtype)))
    try:
        yield
    finally:
        _REDUCE_DTYPE.reset(token)


def current() -> Optional[jnp.dtype]:
    return _REDUCE_DTYPE.get()


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype=None, preferred_element_type=None) -> jax.Array:
    """jnp.einsum(spec, x, w.astype(dtype)) (dtype: the compute dtype, None: w's), with w's gradient
    made in the reduce dtype and returned in w's own dtype (the parameter's float32: a float32
    reduction under bfloat16 compute keeps float32 values). spec: "<x>,<w>-><out>", a matmul: no
    index repeated, every index of w in x or the output and every index of x in w or the output."""
    compute = jnp.dtype(dtype or w.dtype)
    reduce = _REDUCE_DTYPE.get()
    if reduce is None or reduce == compute:
        return jnp.einsum(spec, x, w.astype(compute), preferred_element_type=preferred_element_type)
    return _matmul(spec, reduce, compute, preferred_element_type, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _matmul(spec, reduce, compute, preferred, x, w):
    return jnp.einsum(spec, x, w.astype(compute), preferred_element_type=preferred)


def _matmul_fwd(spec, reduce, compute, preferred, x, w):
    return _matmul(spec, reduce, compute, preferred, x, w), (x, w)


def _matmul_bwd(spec, reduce, compute, preferred, residuals, g):
    x, w = residuals
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    d_x = jnp.einsum(f"{out},{w_spec}->{x_spec}", g, w.astype(compute), preferred_element_type=jnp.float32)
    d_w = jnp.einsum(f"{x_spec},{out}->{w_spec}", x, g, preferred_element_type=reduce)
    return d_x.astype(x.dtype), d_w.astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def add_bias(h: jax.Array, b: jax.Array) -> jax.Array:
    """h + b.astype(h.dtype). Under a float32 reduce dtype with a lower-precision h (bfloat16
    compute) the bias gradient, a sum over the batch, is taken in float32 (autodiff sums it in h's
    dtype); otherwise the plain add."""
    dtype = _REDUCE_DTYPE.get()
    if dtype != jnp.float32 or h.dtype == jnp.float32:
        return h + b.astype(h.dtype)
    return _add_bias(h, b)


@jax.custom_vjp
def _add_bias(h, b):
    return h + b.astype(h.dtype)


def _add_bias_fwd(h, b):
    return _add_bias(h, b), b


def _add_bias_bwd(b, g):
    return g, jnp.sum(g.astype(jnp.float32), axis=tuple(range(g.ndim - 1))).astype(b.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def copies(n: int, w: jax.Array) -> jax.Array:
    """w -> [n, *w.shape], n copies (one per device of the axes a caller shards axis 0 over), whose
    gradient, the sum over the copies, is taken in the reduce dtype (`sum_copies`). Used where a
    weight enters shard_map (the tied embedding, the experts) so that its reduction happens here, in
    the program, rather than as shard_map's own float32 sum of a replicated input's cotangent."""
    dtype = _REDUCE_DTYPE.get()
    if dtype is None or dtype == w.dtype:
        return jnp.broadcast_to(w[None], (n, *w.shape))
    return _copies(n, dtype, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _copies(n, dtype, w):
    return jnp.broadcast_to(w[None], (n, *w.shape))


def _copies_fwd(n, dtype, w):
    return _copies(n, dtype, w), None


def _copies_bwd(n, dtype, _, cotangent):
    return (sum_copies(cotangent, dtype),)


_copies.defvjp(_copies_fwd, _copies_bwd)


def sum_copies(copies_cotangent: jax.Array, dtype=None) -> jax.Array:
    """The sum over axis 0 (the per-device copies of a weight), in `dtype` when it is lower than the
    cotangent's (lax.reduce in that dtype: jnp.sum would upcast a bfloat16 sum to float32)."""
    if dtype is None or jnp.dtype(dtype) == copies_cotangent.dtype:
        return jnp.sum(copies_cotangent, axis=0)
    low = copies_cotangent.astype(dtype)
    return jax.lax.reduce(low, jnp.zeros((), dtype), jax.lax.add, (0,)).astype(copies_cotangent.dtype)
