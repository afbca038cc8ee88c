"""Where a kernel runs: the choice every ops.py makes, and the GPU facts the kernels rely on.

Every op has three implementations with one signature: the Pallas kernel (compiled for the GPU),
the same kernel in Pallas interpret mode (any backend; how the CPU tests run it) and the pure-jnp
reference. `mode(interpret)` picks one:

  interpret=None   the compiled kernel on a GPU, the reference elsewhere (the default)
  interpret=True   the kernel in interpret mode, on any backend (tests, debugging)
  interpret=False  the compiled kernel, whatever the default backend: this is how the tests lower
                   every kernel for "cuda" on a CPU machine (compiling it for the CPU fails in Pallas)

Pallas on GPU has two backends in jax 0.11-0.12: Triton (what `pl.pallas_call` lowers to when it
is given no compiler params or `pallas.triton.CompilerParams`; marked deprecated in 0.12) and Mosaic
GPU (`pallas.mosaic_gpu`; needs explicit layouts and cannot yet lower the gathers, argmax and
cumsum these kernels are made of). Every kernel here targets the Triton backend.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

# H200 ceilings used by the benchmarks' roofline columns (dense bf16 tensor-core peak, HBM3e).
H200_BF16_TFLOPS = 790.0
H200_HBM_TBPS = 4.3

KERNEL = "kernel"
INTERPRET = "interpret"
REFERENCE = "reference"


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def mode(interpret: Optional[bool]) -> str:
    """KERNEL, INTERPRET or REFERENCE for an ops entry's `interpret` argument (module docstring)."""
    if interpret is None:
        return KERNEL if on_gpu() else REFERENCE
    return INTERPRET if interpret else KERNEL


def compiler_params(num_warps: int = 4, num_stages: Optional[int] = None) -> pltriton.CompilerParams:
    """Selects the Pallas Triton backend explicitly (also its default for pallas_call in jax 0.12)."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_power_of_2(n: int) -> int:
    """Triton tensors need power-of-two sizes; blocks are rounded up and masked."""
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def jax_triton_available() -> bool:
    """jax_triton and triton import (never on CPU installs: they live in the [gpu] extra)."""
    try:
        import jax_triton  # noqa: F401
        import triton  # noqa: F401
    except Exception:  # an ImportError, or jax-triton 0.3 failing to find a GPU at import
        return False
    return True


def lower_for_gpu(fn, *args, device_kind: str = "NVIDIA H200", num_cores: int = 132) -> str:
    """Lowers jax.jit(fn)(*args) for CUDA on any machine (a CPU CI checks the GPU kernels this way)
    and returns the StableHLO text. args may be arrays or jax.ShapeDtypeStruct. Pallas needs to
    know the GPU it lowers for: an abstract device stands in for it."""
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def pad_to(x: jax.Array, multiples: tuple[Optional[int], ...], value=0) -> jax.Array:
    """x padded at the end of each axis to a multiple of multiples[axis] (None: that axis as it is);
    x itself when nothing needs padding (no copy)."""
    widths = [(0, 0 if m is None else -size % m) for size, m in zip(x.shape, multiples)]
    widths += [(0, 0)] * (x.ndim - len(widths))
    if not any(after for _, after in widths):
        return x
    return jnp.pad(x, widths, constant_values=value)


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def ragged_blocks(fn, *args) -> list[str]:
    """Every pallas_call operand or result in jax.make_jaxpr(fn)(*args) whose BlockSpec block does
    not divide the array (an edge block the Triton backend would not mask; module docstring), as
    'kernel name: array shape / block shape' lines. Empty when every block fits whole."""
    from jax._src.pallas import core as pallas_core

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = eqn.params.get("name") or getattr(eqn.params.get("name_and_src_info"), "name", "pallas_call")
                for mapping in eqn.params["grid_mapping"].block_mappings:
                    shape = mapping.array_aval.shape
                    block = tuple(1 if b is None or isinstance(b, pallas_core.Squeezed)
                                  else pallas_core.get_block_size(b) for b in mapping.block_shape)
                    if any(size % b for size, b in zip(shape, block)):
                        found.append(f"{name}: array {tuple(shape)} / block {block}")
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found
