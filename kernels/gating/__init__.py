"""Fused top-1 / top-2 gating: ops.top_k_gating is a drop-in for moe_jax.gating.top_k_gating."""
