"""GPU kernels for the MoE layer (installed as moe_jax.kernels).

  gating/          fused top-1/top-2 router: logits [S, E] -> the mapping table (Pallas; jax-triton)
  dispatch/        permute tokens into the expert buffer and combine them back (Pallas, custom VJP)
  grouped_matmul/  the experts' matmul over expert-sorted rows, ragged_dot semantics (Pallas, custom VJP)
  moe_layer.py     the layer's "kernel" dispatch path built from the three (moe_jax.dispatch "kernel")
  platform.py      which implementation runs where; lowering for CUDA on any machine
  bench_util.py    timing and report helpers for each op's benchmark.py and experiments/bench_kernels.py

Each op has kernel.py (Pallas, Triton backend), reference.py (pure jnp, the spec), ops.py (the public
entry: the compiled kernel on a GPU, the reference elsewhere, the kernel in interpret mode with
interpret=True) and benchmark.py (`python -m moe_jax.kernels.<op>.benchmark`).
"""
