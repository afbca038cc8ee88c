"""Fused top-1 / top-2 gating in Pallas (Triton backend): router logits [S, E] -> the mapping table.

Two passes over blocks of `block_tokens` tokens, because a token's slot depends on every earlier
token (a prefix count across blocks) and GPU programs run in no fixed order:

  pass 1 (one program per block): softmax, the k argmax passes, each copy's rank among the block's
         copies of the same expert and choice (a cumsum over the block's one-hot rows), the block's
         per-expert copy counts, its sum of gates (for the aux loss) and of logsumexp^2 (z-loss).
  scan   (XLA, on the tiny [blocks, k, E] counts): exclusive prefix over blocks; second choices
         start after all first choices. Also the statistics: expert counts, aux loss, z-loss,
         dropped fraction (kept per expert = min(count, C): slots are dense).
  pass 2 (one program per block): slot = rank + the block's offset for that expert; capacity
         drop (slot >= C); weights (top-2: renormalised over the surviving choices).

With random token selection (RTS, k=1: `scores` [S, E]) an over-full expert keeps its C
highest-scoring tokens, which depends on every token, not only earlier ones:

  pass 1 also writes each token's priority (its score at its chosen expert).
  XLA    ranks the tokens within their expert by decreasing priority (one stable sort of
         (expert, -priority, token), ties to the earlier token): kept = rank < C; then the
         exclusive prefix over blocks of the per-block kept counts.
  pass 2 (`_rts_slot_kernel`) packs the kept tokens into slots in token order: slot = the number of
         kept tokens of the same expert earlier in the block (a cumsum) + the block's offset.

E is padded in-kernel to a power of two (Triton's tensors need one) with -inf logits; the last
token block is masked. Per-token data moves once in each pass: O(S * E) reads, O(S * k) writes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moe_jax.kernels import platform
from moe_jax.kernels.gating.reference import GatingOutputs, rank_within_expert


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_tokens: tokens per program (a power of two). None: about 8K logits per program."""

    block_tokens: Optional[int] = None
    num_warps: int = 4

    def resolve(self, num_tokens: int, padded_experts: int) -> int:
        if self.block_tokens is not None:
            return self.block_tokens
        block = max(16, min(128, 8192 // padded_experts))
        return min(block, platform.next_power_of_2(num_tokens))


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _route_block_kernel(*refs, k, num_tokens, num_experts, block_tokens, has_noise, has_scores):
    """Pass 1 on one block. Refs: logits [B, Ep], noise [B, Ep] (if has_noise), scores [B, Ep]
    (if has_scores); outputs expert [B, k] i32, gate [B, k] f32, rank [B, k] i32,
    counts [1, k, Ep] i32, gate_sum [1, Ep] f32, z_sum [1, 1] f32, priority [B, 1] f32 (if has_scores)."""
    num_inputs = 1 + has_noise + has_scores
    logits_ref, noise_ref, scores_ref = refs[0], refs[1] if has_noise else None, refs[num_inputs - 1]
    expert_ref, gate_ref, rank_ref, counts_ref, gate_sum_ref, z_ref = refs[num_inputs:num_inputs + 6]
    logits = logits_ref[...].astype(jnp.float32)
    shape = logits.shape
    column = _iota(shape, 1)
    real_column = column < num_experts
    token = pl.program_id(0) * block_tokens + _iota((shape[0],), 0)
    real_token = token < num_tokens
    real_token_2d = real_token[:, None] & (column >= 0)
    # Padded tokens get finite logits (their rows are masked out of every sum below); padded
    # experts get -inf so they have zero probability and are never chosen.
    logits = jnp.where(real_column, jnp.where(real_token_2d, logits, 0.0), -jnp.inf)

    row_max = jnp.max(logits, axis=1, keepdims=True)
    unnormalised = jnp.exp(logits - row_max)
    row_sum = jnp.sum(unnormalised, axis=1, keepdims=True)
    gates = unnormalised / row_sum  # the same expression as jax.nn.softmax
    logsumexp = row_max[:, 0] + jnp.log(row_sum[:, 0])

    if k == 1:
        choose_from = gates
        if has_noise:  # RSample: the expert is argmax(logits + noise); the weight stays the softmax
            choose_from = jnp.where(real_column, logits + noise_ref[...].astype(jnp.float32), -jnp.inf)
        experts = [jnp.argmax(choose_from, axis=1).astype(jnp.int32)]
    else:
        first = jnp.argmax(gates, axis=1).astype(jnp.int32)
        noisy = logits + noise_ref[...].astype(jnp.float32) if has_noise else logits
        masked = jnp.where((column == first[:, None]) | ~real_column, -jnp.inf, noisy)
        experts = [first, jnp.argmax(masked, axis=1).astype(jnp.int32)]

    for choice, expert in enumerate(experts):
        chosen = column == expert[:, None]
        one_hot = (chosen & real_token_2d).astype(jnp.int32)
        earlier = jnp.cumsum(one_hot, axis=0) - one_hot  # copies of each expert before this token
        expert_ref[:, choice] = expert
        gate_ref[:, choice] = jnp.sum(jnp.where(chosen, gates, 0.0), axis=1)
        rank_ref[:, choice] = jnp.sum(earlier * one_hot, axis=1)
        counts_ref[0, choice, :] = jnp.sum(one_hot, axis=0)
    if has_scores:  # scores of padded rows and columns are never selected
        chosen = column == experts[0][:, None]
        priority_ref = refs[num_inputs + 6]
        priority_ref[:, 0] = jnp.sum(jnp.where(chosen, scores_ref[...].astype(jnp.float32), 0.0), axis=1)
    gate_sum_ref[0, :] = jnp.sum(jnp.where(real_token_2d, gates, 0.0), axis=0)
    z_ref[...] = jnp.sum(jnp.where(real_token, logsumexp * logsumexp, 0.0), axis=0).reshape(1, 1)


def _slot_kernel(expert_ref, rank_ref, gate_ref, offset_ref, slot_ref, weight_ref, kept_ref, *,
                 k, capacity):
    """Pass 2 on one block. Refs: expert, rank [B, k] i32, gate [B, k] f32, offset [1, k, Ep] i32;
    outputs slot [B, k] i32 (0 where dropped), weight [B, k] f32, kept [B, k] i32."""
    block = expert_ref.shape[0]
    padded_experts = offset_ref.shape[2]
    column = _iota((block, padded_experts), 1)
    slots, probs = [], []
    for choice in range(k):
        expert = expert_ref[:, choice]
        offset = offset_ref[0, choice, :]
        slot = rank_ref[:, choice] + jnp.sum(jnp.where(column == expert[:, None], offset[None, :], 0), axis=1)
        kept = slot < capacity
        slots.append(slot)
        probs.append(jnp.where(kept, gate_ref[:, choice], 0.0))
        slot_ref[:, choice] = jnp.where(kept, slot, 0)
        kept_ref[:, choice] = kept.astype(jnp.int32)
    if k == 1:
        weight_ref[:, 0] = probs[0]
    else:  # DeepSpeed's top-2 renormalisation after dropping
        denom = jnp.maximum(probs[0] + probs[1], jnp.finfo(jnp.float32).eps)
        weight_ref[:, 0] = probs[0] / denom
        weight_ref[:, 1] = probs[1] / denom


def _rts_slot_kernel(expert_ref, kept_ref, gate_ref, offset_ref, slot_ref, weight_ref):
    """Pass 2 under RTS (k=1) on one block. Refs: expert [B, 1] i32, kept [B, 1] i32, gate [B, 1] f32,
    offset [1, 1, Ep] i32 (kept tokens of each expert in earlier blocks); outputs slot [B, 1] i32
    (0 where dropped), weight [B, 1] f32."""
    block = expert_ref.shape[0]
    column = _iota((block, offset_ref.shape[2]), 1)
    expert = expert_ref[:, 0]
    kept = kept_ref[:, 0] > 0
    chosen = column == expert[:, None]
    # Rows past S (last block) come after every real row, so the cumsum never counts them for a real one.
    one_hot = (chosen & kept[:, None]).astype(jnp.int32)
    earlier = jnp.sum((jnp.cumsum(one_hot, axis=0) - one_hot) * one_hot, axis=1)
    offset = jnp.sum(jnp.where(chosen, offset_ref[0, 0, :][None, :], 0), axis=1)
    slot_ref[:, 0] = jnp.where(kept, earlier + offset, 0)
    weight_ref[:, 0] = jnp.where(kept, gate_ref[:, 0], 0.0)


def rts_keep(expert: jax.Array, priority: jax.Array, *, num_experts: int, padded_experts: int,
             capacity: int, block_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The XLA step between the passes under RTS: expert, priority [S] -> (kept [S] bool, offsets
    [blocks, 1, Ep] i32: where each block's kept tokens of each expert start in its buffer)."""
    num_tokens = expert.shape[0]
    kept = rank_within_expert(expert, priority, num_experts) < capacity
    num_blocks = pl.cdiv(num_tokens, block_tokens)
    block = jnp.arange(num_tokens, dtype=jnp.int32) // block_tokens
    kept_counts = jnp.zeros((num_blocks, padded_experts), jnp.int32).at[block, expert].add(kept.astype(jnp.int32))
    return kept, (jnp.cumsum(kept_counts, axis=0) - kept_counts)[:, None, :]


def block_offsets(counts: jax.Array) -> jax.Array:
    """counts [blocks, k, Ep] -> offsets [blocks, k, Ep]: where each block's copies of each expert
    and choice start in that expert's buffer (second choices after all first choices)."""
    offsets = jnp.cumsum(counts, axis=0) - counts
    if counts.shape[1] == 2:
        offsets = offsets.at[:, 1, :].add(jnp.sum(counts[:, 0, :], axis=0))
    return offsets


def statistics(counts: jax.Array, gate_sum: jax.Array, z_sum: jax.Array, *, num_tokens: int,
               num_experts: int, capacity: int):
    """Per-block sums -> (expert_counts [E], aux_loss, z_loss, dropped_fraction, gate_fraction [E],
    token_fraction [E]), the reference's formulas (reference.py)."""
    k = counts.shape[1]
    per_choice = jnp.sum(counts, axis=0)[:, :num_experts]  # [k, E]
    expert_counts = jnp.sum(per_choice, axis=0)
    me = jnp.sum(gate_sum, axis=0)[:num_experts] / num_tokens
    ce = per_choice[0].astype(jnp.float32) / num_tokens
    aux_loss = num_experts * jnp.sum(me * ce)
    z_loss = jnp.sum(z_sum) / num_tokens
    # Slots are dense (0, 1, ... per expert), so an expert keeps min(count, C) copies.
    kept_copies = jnp.sum(jnp.minimum(expert_counts, capacity))
    dropped_fraction = 1.0 - kept_copies.astype(jnp.float32) / (num_tokens * k)
    return expert_counts, aux_loss, z_loss, dropped_fraction, me, ce


@functools.partial(jax.jit, static_argnames=("k", "capacity", "block_sizes", "interpret"))
def fused_gating(logits: jax.Array, noise: Optional[jax.Array] = None, scores: Optional[jax.Array] = None,
                 *, k: int, capacity: int, block_sizes: BlockSizes = BlockSizes(),
                 interpret: bool = False) -> GatingOutputs:
    """The fused gating kernel: logits [S, E], noise [S, E] or None, RTS scores [S, E] or None
    (k=1 only; reference.py) -> GatingOutputs."""
    if k not in (1, 2):
        raise ValueError(f"the fused gating kernel handles k=1 and k=2; got k={k}")
    if scores is not None and k != 1:
        raise ValueError(f"random token selection scores are for k=1; got k={k}")
    num_tokens, num_experts = logits.shape
    padded_experts = platform.next_power_of_2(num_experts)
    block = block_sizes.resolve(num_tokens, padded_experts)
    num_blocks = pl.cdiv(num_tokens, block)
    # Every tiled array in whole blocks (platform.py: the Triton backend does not mask edge blocks);
    # the kernel masks the padded tokens and experts, and the per-copy results are sliced to S.
    padded_tokens = num_blocks * block
    params = platform.compiler_params(num_warps=block_sizes.num_warps)
    token_spec = pl.BlockSpec((block, padded_experts), lambda i: (i, 0))
    per_copy_spec = pl.BlockSpec((block, k), lambda i: (i, 0))
    inputs = [platform.pad_to(array, (block, padded_experts)) for array in (logits, noise, scores)
              if array is not None]
    per_copy_i32 = jax.ShapeDtypeStruct((padded_tokens, k), jnp.int32)
    per_copy_f32 = jax.ShapeDtypeStruct((padded_tokens, k), jnp.float32)

    expert, gate, rank, counts, gate_sum, z_sum, *priority = pl.pallas_call(
        functools.partial(_route_block_kernel, k=k, num_tokens=num_tokens, num_experts=num_experts,
                          block_tokens=block, has_noise=noise is not None, has_scores=scores is not None),
        out_shape=(
            per_copy_i32, per_copy_f32, per_copy_i32,
            jax.ShapeDtypeStruct((num_blocks, k, padded_experts), jnp.int32),
            jax.ShapeDtypeStruct((num_blocks, padded_experts), jnp.float32),
            jax.ShapeDtypeStruct((num_blocks, 1), jnp.float32),
        ) + ((per_copy_f32,) if scores is not None else ()),
        grid=(num_blocks,),
        in_specs=[token_spec] * len(inputs),
        out_specs=(
            per_copy_spec, per_copy_spec, per_copy_spec,
            pl.BlockSpec((1, k, padded_experts), lambda i: (i, 0, 0)),
            pl.BlockSpec((1, padded_experts), lambda i: (i, 0)),
            pl.BlockSpec((1, 1), lambda i: (i, 0)),
        ) + ((per_copy_spec,) if scores is not None else ()),
        compiler_params=params, interpret=interpret, name="gating_route",
    )(*inputs)
    stats = statistics(counts, gate_sum, z_sum, num_tokens=num_tokens, num_experts=num_experts,
                       capacity=capacity)

    if scores is not None:
        kept, offsets = rts_keep(expert[:num_tokens, 0], priority[0][:num_tokens, 0], num_experts=num_experts,
                                 padded_experts=padded_experts, capacity=capacity, block_tokens=block)
        slot, weight = pl.pallas_call(
            _rts_slot_kernel,
            out_shape=(per_copy_i32, per_copy_f32),
            grid=(num_blocks,),
            in_specs=[per_copy_spec, per_copy_spec, per_copy_spec,
                      pl.BlockSpec((1, 1, padded_experts), lambda i: (i, 0, 0))],
            out_specs=(per_copy_spec, per_copy_spec),
            compiler_params=params, interpret=interpret, name="gating_rts_slots",
        )(expert, platform.pad_to(kept[:, None].astype(jnp.int32), (block, None)), gate, offsets)
        return GatingOutputs(expert[:num_tokens], slot[:num_tokens], weight[:num_tokens], kept[:, None], *stats)

    slot, weight, kept = pl.pallas_call(
        functools.partial(_slot_kernel, k=k, capacity=capacity),
        out_shape=(per_copy_i32, per_copy_f32, per_copy_i32),
        grid=(num_blocks,),
        in_specs=[per_copy_spec, per_copy_spec, per_copy_spec,
                  pl.BlockSpec((1, k, padded_experts), lambda i: (i, 0, 0))],
        out_specs=(per_copy_spec, per_copy_spec, per_copy_spec),
        compiler_params=params, interpret=interpret, name="gating_slots",
    )(expert, rank, gate, block_offsets(counts))
    return GatingOutputs(expert[:num_tokens], slot[:num_tokens], weight[:num_tokens], kept[:num_tokens] > 0,
                         *stats)
