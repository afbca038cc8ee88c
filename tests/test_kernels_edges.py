"""No kernel relies on Pallas masking an edge block: at ragged shapes (S, M, N, K, F not multiples
of the tiles; E not a power of two) every BlockSpec'd operand and result of every pallas_call, in
the forward and the backward pass, is a whole number of blocks (kernels/platform.py: the Triton
backend does not mask edge blocks, which an H200 showed as wrong rows; interpret mode clips them,
so equality tests on the CPU cannot see it)."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from moe_jax import gating as gating_lib
from moe_jax.kernels import moe_layer, platform
from moe_jax.kernels.dispatch import kernel as dispatch_kernel
from moe_jax.kernels.dispatch import ops as dispatch_ops
from moe_jax.kernels.gating import kernel as gating_kernel
from moe_jax.kernels.grouped_matmul import kernel as gmm_kernel
from moe_jax.kernels.grouped_matmul import ops as gmm_ops

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def test_the_check_finds_a_ragged_block():
    """The check itself: a copy kernel with 16-row blocks over 40 rows is reported."""
    def copy(x):
        def body(x_ref, o_ref):
            o_ref[...] = x_ref[...]
        spec = pl.BlockSpec((16, 8), lambda i: (i, 0))
        return pl.pallas_call(body, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(3,),
                              in_specs=[spec], out_specs=spec, interpret=True, name="ragged_copy")(x)

    found = platform.ragged_blocks(copy, jnp.ones((40, 8)))
    assert found == ["ragged_copy: array (40, 8) / block (16, 8)"] * 2  # the input and the output
    assert platform.ragged_blocks(copy, jnp.ones((48, 8))) == []


def test_pad_to_pads_only_what_is_needed():
    x = jnp.arange(12.0).reshape(3, 4)
    assert platform.pad_to(x, (4, None)) .shape == (4, 4)
    assert platform.pad_to(x, (3, 2)) is x  # nothing to pad: no copy
    padded = platform.pad_to(x, (2, 8), -1)
    assert padded.shape == (4, 8) and float(padded[3, 0]) == -1 and float(padded[0, 5]) == -1


@pytest.mark.parametrize("num_tokens,num_experts,k,noise",
                         [(37, 6, 1, None), (50, 7, 1, "rts"), (130, 12, 2, "gumbel")])
def test_gating_kernel_blocks_are_whole(num_tokens, num_experts, k, noise):
    logits = jax.random.normal(jax.random.key(0), (num_tokens, num_experts))
    extra = {"rts": (None, jax.random.uniform(jax.random.key(1), logits.shape)),
             "gumbel": (jax.random.gumbel(jax.random.key(2), logits.shape), None), None: (None, None)}[noise]
    blocks = gating_kernel.BlockSizes(block_tokens=16)
    assert platform.ragged_blocks(lambda lg: gating_kernel.fused_gating(lg, *extra, k=k, capacity=9, block_sizes=blocks,
                                                                       interpret=True), logits) == []


def test_dispatch_kernels_blocks_are_whole_forward_and_backward():
    num_tokens, num_experts, model_dim, k = 45, 6, 40, 2
    routing = gating_lib.top_k_gating(jax.random.normal(jax.random.key(0), (num_tokens, num_experts)), k=k,
                                      capacity_factor=1.0, min_capacity=1)
    x = jax.random.normal(jax.random.key(1), (num_tokens, model_dim))
    tiles = dispatch_kernel.BlockSizes(block_rows=16, block_cols=16)

    def loss(x, weight):
        buffer = dispatch_ops.dispatch_to_buffer(x, routing.expert_index, routing.slot, routing.kept,
                                                 num_experts=num_experts, capacity=routing.capacity,
                                                 interpret=True, block_sizes=tiles)
        y = dispatch_ops.combine_from_buffer(jnp.sin(buffer), routing.expert_index, routing.slot, routing.kept,
                                             weight, interpret=True, block_sizes=tiles)
        return jnp.sum(y)

    assert platform.ragged_blocks(jax.grad(loss, argnums=(0, 1)), x, routing.weight) == []


def test_grouped_matmul_blocks_are_whole_forward_and_backward():
    lhs = jax.random.normal(jax.random.key(0), (100, 40))
    rhs = jax.random.normal(jax.random.key(1), (5, 40, 24))
    sizes = jnp.asarray([30, 0, 17, 40, 13], jnp.int32)
    tiles = gmm_kernel.BlockSizes(block_m=16, block_n=16, block_k=16, group_width=2)

    def loss(lhs, rhs):
        return jnp.sum(gmm_ops.grouped_matmul(lhs, rhs, sizes, interpret=True, block_sizes=tiles))

    assert platform.ragged_blocks(jax.grad(loss, argnums=(0, 1)), lhs, rhs) == []


def test_kernel_dispatch_path_blocks_are_whole_forward_and_backward():
    num_tokens, num_experts, model_dim, ffn_dim = 56, 6, 24, 40
    keys = jax.random.split(jax.random.key(3), 4)
    routing = gating_lib.top_k_gating(jax.random.normal(keys[0], (num_tokens, num_experts)), k=2,
                                      capacity_factor=0.8, min_capacity=1)
    experts = {"w1": jax.random.normal(keys[1], (num_experts, model_dim, ffn_dim)),
               "b1": jnp.zeros((num_experts, ffn_dim)),
               "w2": jax.random.normal(keys[2], (num_experts, ffn_dim, model_dim)),
               "b2": jnp.zeros((num_experts, model_dim))}
    x = jax.random.normal(keys[3], (num_tokens, model_dim))

    def loss(x, experts):
        return jnp.sum(moe_layer.dispatch_kernel(x, routing, experts, interpret=True))

    assert platform.ragged_blocks(jax.grad(loss, argnums=(0, 1)), x, experts) == []
