"""The tied input / output embedding on a mesh, with its gradient reduced once.

Its weight wte [V, M] is used twice: the input lookup wte[tokens] and the logits h @ wte^T. On a
batch-sharded mesh each use's gradient is a per-device partial sum, and the partitioner reduces
each on its own (two [V, M] reductions, or a reduction and an all-to-all under ZeRO). Here both uses
read a per-device copy, `copies` = wte broadcast to [n, V, M] over the batch axes (each device holds
its own [V, M], as it holds the replicated wte anyway), inside shard_map: a device's two partial
gradients land in its own copy's cotangent and are added there, and the broadcast's transpose,
the sum over the copies, is the one reduction. The values are the plain lookup and einsum; the
gradient is their sum in another order (float32 rounding).

Used when the mesh splits the batch and not the vocabulary (tensor = 1); otherwise the model keeps
the plain lookup and einsum (a vocab-parallel embedding reduces over tensor as well).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax import grad_precision
from moe_jax.parallel import BATCH_AXES, ParallelConfig


def applies(par: Optional[ParallelConfig], batch_size: int) -> bool:
    """Whether the per-device-copy form is used: a mesh that splits the batch, not the vocabulary."""
    return (par is not None and par.mesh.shape["tensor"] == 1 and par.batch_size_divisor > 1
            and batch_size % par.batch_size_divisor == 0)


def copies(wte: jax.Array, par: ParallelConfig) -> jax.Array:
    """wte [V, M] -> [n, V, M], one copy per batch shard (n = the batch axes' size). The gradient,
    the sum over the copies, is taken in the reduce dtype when one is set (moe_jax.grad_precision)."""
    stacked = grad_precision.copies(par.batch_size_divisor, wte)
    return jax.lax.with_sharding_constraint(stacked, jax.sharding.NamedSharding(par.mesh, P(BATCH_AXES)))


def lookup(wte_copies: jax.Array, tokens: jax.Array, par: ParallelConfig) -> jax.Array:
    """tokens [B, T] (batch-sharded) -> wte[tokens] [B, T, M], each shard from its own copy."""
    return jax.shard_map(lambda w, t: w[0][t], mesh=par.mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES)),
                         out_specs=P(BATCH_AXES))(wte_copies, tokens)


def logits(wte_copies: jax.Array, h: jax.Array, par: ParallelConfig, dtype) -> jax.Array:
    """h [B, T, M] (batch-sharded) -> h @ wte^T [B, T, V] float32, each shard from its own copy."""
    def local(w, x):
        return jnp.einsum("btm,vm->btv", x.astype(dtype), w[0].astype(dtype), preferred_element_type=jnp.float32)

    return jax.shard_map(local, mesh=par.mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES)),
                         out_specs=P(BATCH_AXES))(wte_copies, h)

