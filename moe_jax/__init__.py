"""moe-jax: DeepSpeed-MoE in JAX (README.md)."""
# Installed, the kernels live inside the package (moe_jax/kernels); in the source tree they are the
# top-level kernels/ folder, mapped there by the editable install. A source tree placed ahead of a
# non-editable install on sys.path (pytest's pythonpath, the experiments' own path entry, as in the
# GPU check) must still find moe_jax.kernels: every moe_jax folder on sys.path is part of the package.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)
