r"""Grouped matmul: the Pallas kernel vs jax.lax.ragged_dot (and tokamax, JAX's own Mosaic GPU
ragged_dot when they import), bfloat16, sweeping the number of groups and the kernel's tiles.

  python -m moe_jax.kernels.grouped_matmul.benchmark [--quick]

Rows N = S * k = 16384, K = 2048 (the model dim M), Nout = 8192 (the FFN dim F); group sizes from
a random routing (multinomial, so groups are uneven and tiles straddle group boundaries). FLOPs are
the useful ones, 2 * N * K * Nout; bytes are lhs + out + the weights of the non-empty groups. With
many groups each expert's weights serve few rows and the op is bandwidth-bound (the roofline
column uses the slower of the two bounds). Target (reported, not asserted): >= 60% of the bf16 peak
(~790 TFLOP/s) at N=16384, K=2048, Nout=8192.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.kernels import bench_util, platform
from moe_jax.kernels.grouped_matmul import kernel, reference

SHAPES = [(16384, 2048, 8192, 1), (16384, 2048, 8192, 8), (16384, 2048, 8192, 32), (16384, 2048, 8192, 128)]
QUICK_SHAPES = [(16384, 2048, 8192, 8)]
TILES = [kernel.BlockSizes(),
         kernel.BlockSizes(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
         kernel.BlockSizes(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)]


def _optional_baselines(notes: list[str]):
    """Other grouped matmuls to compare with, where installed: name -> fn(lhs, rhs, group_sizes).
    Why one is left out goes to `notes`."""
    found = {}
    try:
        import tokamax  # not a dependency: compared with when present

        found["tokamax ragged_dot"] = lambda lhs, rhs, sizes: tokamax.ragged_dot(lhs, rhs, sizes)
    except Exception as error:
        notes.append(f"tokamax ragged_dot left out: import tokamax failed ({type(error).__name__}: {str(error)[:200]})")
    if platform.on_gpu():
        try:
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

            found["jax ragged_dot_mgpu (Mosaic GPU)"] = lambda lhs, rhs, sizes: ragged_dot_mgpu.ragged_dot(
                lhs, rhs, group_sizes=sizes, block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                grid_block_n=1)
        except Exception as error:
            notes.append(f"jax ragged_dot_mgpu left out: {type(error).__name__}: {str(error)[:200]}")
    return found


def capacity_buffer_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The capacity path's experts matmul on the same rows: a batched [G, C, K] x [G, K, Nout] with
    C = N / G (every expert's buffer full at capacity factor 1.0; group_sizes are not looked at)."""
    del group_sizes
    groups = rhs.shape[0]
    buffer = lhs.reshape(groups, lhs.shape[0] // groups, lhs.shape[1])
    return jnp.einsum("gck,gkn->gcn", buffer, rhs).reshape(lhs.shape[0], rhs.shape[2])


def group_sizes_for(num_rows: int, num_groups: int, seed: int = 0) -> jax.Array:
    """Uneven group sizes summing to num_rows, as a random top-1 routing gives."""
    counts = np.random.default_rng(seed).multinomial(num_rows, np.full(num_groups, 1.0 / num_groups))
    return jnp.asarray(counts, jnp.int32)


def run(shapes=SHAPES, tiles=TILES, notes: list[str] | None = None, on_record=None) -> list[bench_util.Record]:
    """Times each implementation at each shape; `notes` (if given) collects why optional baselines
    were left out, on_record(record) sees each row as it is measured. The capacity buffer's batched
    matmul runs where G divides N."""
    records, notes = [], [] if notes is None else notes
    baselines = _optional_baselines(notes)
    for num_rows, inner, cols, num_groups in shapes:
        keys = jax.random.split(jax.random.key(0), 2)
        lhs = jax.random.normal(keys[0], (num_rows, inner), jnp.bfloat16)
        rhs = (jax.random.normal(keys[1], (num_groups, inner, cols), jnp.bfloat16) * 0.02).astype(jnp.bfloat16)
        sizes = group_sizes_for(num_rows, num_groups)
        shape = f"N={num_rows} K={inner} Nout={cols} G={num_groups}"
        flops = 2.0 * num_rows * inner * cols
        bytes_moved = 2.0 * (num_rows * inner + num_rows * cols + int(jnp.sum(sizes > 0)) * inner * cols)
        impls = [("xla ragged_dot", jax.jit(reference.gmm))]
        if num_rows % num_groups == 0:
            impls.append(("capacity buffer batched matmul", jax.jit(capacity_buffer_matmul)))
        impls += [(name, jax.jit(fn)) for name, fn in baselines.items()]
        if platform.on_gpu():
            for tile in tiles:
                name = (f"pallas kernel {tile.block_m}x{tile.block_n}x{tile.block_k} "
                        f"w{tile.num_warps} s{tile.num_stages}")
                impls.append((name, jax.jit(lambda lg, r, s, tile=tile: kernel.gmm(lg, r, s, block_sizes=tile))))
        baseline = None
        for name, fn in impls:
            try:
                ms = bench_util.time_ms(fn, lhs, rhs, sizes)
            except Exception as error:  # e.g. a tile that does not fit in shared memory
                print(f"{shape} {name}: failed: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
                continue
            baseline = baseline or ms
            peak_fraction = flops / (ms * 1e-3) / 1e12 / platform.H200_BF16_TFLOPS
            records.append(bench_util.Record("grouped matmul", shape, name, ms, bytes_moved=bytes_moved,
                                             flops=flops, baseline_ms=baseline,
                                             note=f"{100 * peak_fraction:.0f}% of bf16 peak"))
            if on_record:
                on_record(records[-1])
    return records


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    bench_util.print_table(run(QUICK_SHAPES if "--quick" in argv else SHAPES))


if __name__ == "__main__":
    main()
