"""Grouped matmul over expert-sorted rows: ops.grouped_matmul (jax.lax.ragged_dot semantics, trainable)."""
