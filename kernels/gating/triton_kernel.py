"""The fused gating kernel written directly in Triton and called through jax-triton.

The same two passes and the same XLA scan between them as kernel.py (whose docstring explains the
algorithm); the per-block arrays have the same layout, so `block_offsets` and `statistics` are
shared. Used by ops.py on a GPU when jax_triton imports and fits the installed jax (it lives in the [gpu]
extra; CPU installs never have triton, and this module imports cleanly without it: `available()`
says False). It has no random token selection: ops.py runs RTS in the Pallas kernel.
`compile_for_gpu` compiles both passes for an sm_90 target on any machine (tests do it on CPU).

jax-triton 0.3 names the output argument of `triton_call` `out_shape`, 0.4 renames it `out_type`;
`_triton_call` passes whichever the installed version takes. Sizes are passed as constexpr
metaparameters (never as runtime scalars, whose handling also changed between the two).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.kernels import platform
from moe_jax.kernels.gating.kernel import BlockSizes, block_offsets, statistics
from moe_jax.kernels.gating.reference import GatingOutputs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: triton is only in the [gpu] extra
    triton = None

_FLOAT32_EPS = 1.1920928955078125e-07  # jnp.finfo(jnp.float32).eps, the top-2 denominator floor


def available() -> bool:
    """triton and jax_triton import and the installed jax-triton can be jitted with this jax."""
    return triton is not None and platform.jax_triton_available() and jax_triton_fits_jax()


@functools.lru_cache(maxsize=None)
def jax_triton_fits_jax() -> bool:
    """False where jax-triton's dead-code-elimination rule has the wrong arity for jax: jax 0.12 calls
    such rules as rule(used_outputs, live_inputs, eqn), jax-triton 0.4.1 (the newest release) defines
    rule(used_outputs, eqn), so every jax.jit holding a triton_call fails ("takes 2 positional
    arguments but 3 were given"). ops.py then runs the Pallas kernel instead."""
    from jax._src.interpreters import partial_eval
    from jax_triton import triton_lib

    rule = partial_eval.dce_rules.get(triton_lib.triton_kernel_call_p)
    if rule is None:
        return True
    arity = len(inspect.signature(rule).parameters)
    return arity == (3 if jax.__version_info__ >= (0, 12) else 2)


if triton is not None:

    @triton.jit
    def _first_argmax(values, column, PADDED_EXPERTS: tl.constexpr):
        """[B, Ep] -> [B]: the first column holding the row maximum (jnp.argmax's tie rule)."""
        row_max = tl.max(values, axis=1)
        return tl.min(tl.where(values == row_max[:, None], column[None, :], PADDED_EXPERTS), axis=1)

    @triton.jit
    def _store_choice(expert, gates, column, real_token, token, block, choice, expert_ptr, gate_ptr,
                      rank_ptr, counts_ptr, K: tl.constexpr, PADDED_EXPERTS: tl.constexpr):
        chosen = column[None, :] == expert[:, None]
        one_hot = (chosen & real_token[:, None]).to(tl.int32)
        earlier = tl.cumsum(one_hot, axis=0) - one_hot
        tl.store(expert_ptr + token * K + choice, expert, mask=real_token)
        tl.store(gate_ptr + token * K + choice, tl.sum(tl.where(chosen, gates, 0.0), axis=1), mask=real_token)
        tl.store(rank_ptr + token * K + choice, tl.sum(earlier * one_hot, axis=1), mask=real_token)
        tl.store(counts_ptr + (block * K + choice) * PADDED_EXPERTS + column, tl.sum(one_hot, axis=0))

    @triton.jit
    def _route_block_kernel(logits_ptr, noise_ptr, expert_ptr, gate_ptr, rank_ptr, counts_ptr,
                            gate_sum_ptr, z_ptr, NUM_TOKENS: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                            K: tl.constexpr, BLOCK: tl.constexpr, PADDED_EXPERTS: tl.constexpr,
                            HAS_NOISE: tl.constexpr):
        """Pass 1 (kernel.py `_route_block_kernel`); noise_ptr is ignored unless HAS_NOISE."""
        block = tl.program_id(0)
        token = block * BLOCK + tl.arange(0, BLOCK)
        column = tl.arange(0, PADDED_EXPERTS)
        real_token = token < NUM_TOKENS
        real_column = column < NUM_EXPERTS
        offsets = token[:, None] * NUM_EXPERTS + column[None, :]
        in_bounds = real_token[:, None] & real_column[None, :]
        logits = tl.load(logits_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
        logits = tl.where(real_column[None, :], logits, float("-inf"))

        row_max = tl.max(logits, axis=1)
        unnormalised = tl.exp(logits - row_max[:, None])
        row_sum = tl.sum(unnormalised, axis=1)
        gates = unnormalised / row_sum[:, None]
        logsumexp = row_max + tl.log(row_sum)

        if K == 1:
            if HAS_NOISE:
                noise = tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
                first = _first_argmax(tl.where(real_column[None, :], logits + noise, float("-inf")),
                                      column, PADDED_EXPERTS)
            else:
                first = _first_argmax(gates, column, PADDED_EXPERTS)
            _store_choice(first, gates, column, real_token, token, block, 0, expert_ptr, gate_ptr,
                          rank_ptr, counts_ptr, K, PADDED_EXPERTS)
        else:
            first = _first_argmax(gates, column, PADDED_EXPERTS)
            noisy = logits
            if HAS_NOISE:
                noisy = logits + tl.load(noise_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
            is_first = column[None, :] == first[:, None]
            second = _first_argmax(tl.where(is_first | ~real_column[None, :], float("-inf"), noisy),
                                   column, PADDED_EXPERTS)
            _store_choice(first, gates, column, real_token, token, block, 0, expert_ptr, gate_ptr,
                          rank_ptr, counts_ptr, K, PADDED_EXPERTS)
            _store_choice(second, gates, column, real_token, token, block, 1, expert_ptr, gate_ptr,
                          rank_ptr, counts_ptr, K, PADDED_EXPERTS)
        tl.store(gate_sum_ptr + block * PADDED_EXPERTS + column,
                 tl.sum(tl.where(real_token[:, None], gates, 0.0), axis=0))
        tl.store(z_ptr + block, tl.sum(tl.where(real_token, logsumexp * logsumexp, 0.0), axis=0))

    @triton.jit
    def _slot_of_choice(expert_ptr, rank_ptr, gate_ptr, offset_ptr, slot_ptr, kept_ptr, token, real_token,
                        column, block, choice, K: tl.constexpr, CAPACITY: tl.constexpr,
                        PADDED_EXPERTS: tl.constexpr):
        expert = tl.load(expert_ptr + token * K + choice, mask=real_token, other=0)
        offset = tl.load(offset_ptr + (block * K + choice) * PADDED_EXPERTS + column)
        slot = tl.load(rank_ptr + token * K + choice, mask=real_token, other=0) + tl.sum(
            tl.where(column[None, :] == expert[:, None], offset[None, :], 0), axis=1)
        kept = slot < CAPACITY
        tl.store(slot_ptr + token * K + choice, tl.where(kept, slot, 0), mask=real_token)
        tl.store(kept_ptr + token * K + choice, kept.to(tl.int32), mask=real_token)
        return tl.where(kept, tl.load(gate_ptr + token * K + choice, mask=real_token, other=0.0), 0.0)

    @triton.jit
    def _slot_kernel(expert_ptr, rank_ptr, gate_ptr, offset_ptr, slot_ptr, weight_ptr, kept_ptr,
                     NUM_TOKENS: tl.constexpr, K: tl.constexpr, CAPACITY: tl.constexpr,
                     BLOCK: tl.constexpr, PADDED_EXPERTS: tl.constexpr, EPS: tl.constexpr):
        """Pass 2 (kernel.py `_slot_kernel`)."""
        block = tl.program_id(0)
        token = block * BLOCK + tl.arange(0, BLOCK)
        real_token = token < NUM_TOKENS
        column = tl.arange(0, PADDED_EXPERTS)
        prob0 = _slot_of_choice(expert_ptr, rank_ptr, gate_ptr, offset_ptr, slot_ptr, kept_ptr, token,
                                real_token, column, block, 0, K, CAPACITY, PADDED_EXPERTS)
        if K == 1:
            tl.store(weight_ptr + token, prob0, mask=real_token)
        else:
            prob1 = _slot_of_choice(expert_ptr, rank_ptr, gate_ptr, offset_ptr, slot_ptr, kept_ptr, token,
                                    real_token, column, block, 1, K, CAPACITY, PADDED_EXPERTS)
            denom = tl.maximum(prob0 + prob1, EPS)
            tl.store(weight_ptr + token * K, prob0 / denom, mask=real_token)
            tl.store(weight_ptr + token * K + 1, prob1 / denom, mask=real_token)


def compile_for_gpu(num_tokens: int, num_experts: int, *, k: int, capacity: int, has_noise: bool,
                    compute_capability: int = 90, block_sizes: BlockSizes = BlockSizes()) -> dict:
    """Compiles both passes with Triton for an NVIDIA GPU of the given compute capability (90: H100 /
    H200) on any machine, GPU or not: Triton emits the PTX and its bundled ptxas the cubin.

    Returns {"route": ..., "slots": ...}, triton's compiled kernels (each `.asm` holds "ttir",
    "ttgir", "llir", "ptx" and "cubin"). This checks the kernels themselves; running them through
    jax-triton also needs jaxlib's CUDA plugin (jaxlib.gpu_triton's TritonKernel), which CPU installs
    lack."""
    if triton is None:
        raise RuntimeError("compiling the jax-triton gating kernel needs triton (the [gpu] extra)")
    from triton.backends.compiler import GPUTarget

    padded_experts = platform.next_power_of_2(num_experts)
    block = block_sizes.resolve(num_tokens, padded_experts)
    target = GPUTarget("cuda", compute_capability, 32)
    options = {"num_warps": block_sizes.num_warps}

    def build(fn, pointers, constants):
        signature = {**pointers, **{name: "constexpr" for name in constants}}
        return triton.compile(triton.compiler.ASTSource(fn, signature, constexprs=constants),
                              target=target, options=options)

    route = build(_route_block_kernel, {
        "logits_ptr": "*fp32", "noise_ptr": "*fp32", "expert_ptr": "*i32", "gate_ptr": "*fp32",
        "rank_ptr": "*i32", "counts_ptr": "*i32", "gate_sum_ptr": "*fp32", "z_ptr": "*fp32"}, {
        "NUM_TOKENS": num_tokens, "NUM_EXPERTS": num_experts, "K": k, "BLOCK": block,
        "PADDED_EXPERTS": padded_experts, "HAS_NOISE": has_noise})
    slots = build(_slot_kernel, {
        "expert_ptr": "*i32", "rank_ptr": "*i32", "gate_ptr": "*fp32", "offset_ptr": "*i32",
        "slot_ptr": "*i32", "weight_ptr": "*fp32", "kept_ptr": "*i32"}, {
        "NUM_TOKENS": num_tokens, "K": k, "CAPACITY": capacity, "BLOCK": block,
        "PADDED_EXPERTS": padded_experts, "EPS": _FLOAT32_EPS})
    return {"route": route, "slots": slots}


def _triton_call(*args, kernel, out_shapes, grid, num_warps, **metaparams):
    """jax_triton.triton_call across versions: 0.3 takes `out_shape`, 0.4 `out_type`."""
    import jax_triton

    parameters = inspect.signature(jax_triton.triton_call).parameters
    out_keyword = "out_type" if "out_type" in parameters else "out_shape"
    return jax_triton.triton_call(*args, kernel=kernel, grid=grid, num_warps=num_warps,
                                  **{out_keyword: out_shapes}, **metaparams)


@functools.partial(jax.jit, static_argnames=("k", "capacity", "block_sizes"))
def fused_gating(logits: jax.Array, noise: Optional[jax.Array] = None, *, k: int, capacity: int,
                 block_sizes: BlockSizes = BlockSizes()) -> GatingOutputs:
    """kernel.fused_gating through jax-triton (GPU only): logits [S, E], noise [S, E] or None."""
    if not available():
        raise RuntimeError("the jax-triton gating kernel needs triton and jax_triton (the [gpu] extra) "
                           "and a GPU; use kernel.fused_gating (Pallas) or reference.fused_gating")
    if k not in (1, 2):
        raise ValueError(f"the fused gating kernel handles k=1 and k=2; got k={k}")
    num_tokens, num_experts = logits.shape
    padded_experts = platform.next_power_of_2(num_experts)
    block = block_sizes.resolve(num_tokens, padded_experts)
    num_blocks = -(-num_tokens // block)
    logits = logits.astype(jnp.float32)
    per_copy_i32 = jax.ShapeDtypeStruct((num_tokens, k), jnp.int32)
    per_copy_f32 = jax.ShapeDtypeStruct((num_tokens, k), jnp.float32)

    expert, gate, rank, counts, gate_sum, z_sum = _triton_call(
        logits, logits if noise is None else noise.astype(jnp.float32),
        kernel=_route_block_kernel,
        out_shapes=(per_copy_i32, per_copy_f32, per_copy_i32,
                    jax.ShapeDtypeStruct((num_blocks, k, padded_experts), jnp.int32),
                    jax.ShapeDtypeStruct((num_blocks, padded_experts), jnp.float32),
                    jax.ShapeDtypeStruct((num_blocks,), jnp.float32)),
        grid=(num_blocks,), num_warps=block_sizes.num_warps,
        NUM_TOKENS=num_tokens, NUM_EXPERTS=num_experts, K=k, BLOCK=block,
        PADDED_EXPERTS=padded_experts, HAS_NOISE=noise is not None)

    slot, weight, kept = _triton_call(
        expert, rank, gate, block_offsets(counts),
        kernel=_slot_kernel, out_shapes=(per_copy_i32, per_copy_f32, per_copy_i32),
        grid=(num_blocks,), num_warps=block_sizes.num_warps,
        NUM_TOKENS=num_tokens, K=k, CAPACITY=capacity, BLOCK=block, PADDED_EXPERTS=padded_experts,
        EPS=_FLOAT32_EPS)

    return GatingOutputs(expert, slot, weight, kept > 0, *statistics(
        counts, gate_sum, z_sum, num_tokens=num_tokens, num_experts=num_experts, capacity=capacity))
