"""Gradients reduced in bfloat16 (mesh.grad_reduce_dtype, moe_jax.grad_precision): the values, the
training, and the bytes the partitioned step reduces."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import load_config_file
from moe_jax import config, cost, grad_precision, hlo, parallel, train_lib
from tests.helpers import random_tokens, train_on_mesh

CFG = config.ModelConfig(vocab_size=32, num_layers=4, hidden_size=16, num_heads=2, ffn_size=32, max_seq_len=16,
                         moe=config.MoEConfig(experts="4x1,8x1", drop_tokens=False, use_rts=False,
                                              shared_experts=1))
OPTIMIZER = train_lib.make_optimizer(train_lib.OptimConfig(warmup_steps=1, total_steps=10))
BF16_EPS = 2.0 ** -8  # bfloat16's relative rounding error


@pytest.mark.parametrize("spec, x_shape, w_shape, preferred", [
    ("btm,mf->btf", (2, 5, 8), (8, 12), None),
    ("...m,mf->...f", (3, 4, 8), (8, 6), None),
    ("btm,vm->btv", (2, 3, 8), (10, 8), jnp.float32),
    ("ecm,emf->ecf", (4, 6, 8), (4, 8, 5), None),
])
def test_matmul_makes_the_weight_gradient_in_the_reduce_dtype(spec, x_shape, w_shape, preferred):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    out_shape = jnp.einsum(spec, x, w).shape
    probe = jax.random.normal(kg, out_shape)

    def loss(fn):
        return jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w) * probe), argnums=(0, 1))(x, w)

    plain, (plain_dx, plain_dw) = loss(lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=preferred))
    with grad_precision.reduce_gradients_in("bfloat16"):
        low, (dx, dw) = loss(lambda x, w: grad_precision.matmul(spec, x, w, preferred_element_type=preferred))
    assert low == plain  # the forward pass is the plain einsum
    np.testing.assert_allclose(dx, plain_dx, rtol=1e-5, atol=1e-5)  # the input gradient stays float32
    assert dw.dtype == jnp.float32
    np.testing.assert_allclose(dw, plain_dw.astype(jnp.bfloat16).astype(jnp.float32), rtol=BF16_EPS, atol=1e-6)
    assert not np.array_equal(dw, plain_dw)  # rounded to bfloat16 on the way


def test_float32_reduction_under_bf16_compute_keeps_float32_values():
    """bf16 activations and compute, float32 parameter: the weight gradient is made and returned in
    float32 (autodiff would make it in bf16, the cast weight's dtype), with float32 values."""
    x = jax.random.normal(jax.random.key(0), (4, 32, 8)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (8, 6))
    probe = jax.random.normal(jax.random.key(2), (4, 32, 6))

    def grad(fn):
        return jax.grad(lambda w: jnp.sum(fn(w).astype(jnp.float32) * probe))(w)

    with grad_precision.reduce_gradients_in("float32"):
        dw = grad(lambda w: grad_precision.matmul("btm,mf->btf", x, w, jnp.bfloat16))
    want = jnp.einsum("btm,btf->mf", x.astype(jnp.float32), probe.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(dw, dw.astype(jnp.bfloat16).astype(jnp.float32))  # not rounded to bf16
    autodiff = grad(lambda w: jnp.einsum("btm,mf->btf", x, w.astype(jnp.bfloat16)))
    assert np.array_equal(autodiff, autodiff.astype(jnp.bfloat16).astype(jnp.float32))  # what it replaces


def test_copies_take_the_reduce_dtype_when_traced():
    """A pullback built inside reduce_gradients_in and run outside it still sums in bf16."""
    w = jax.random.normal(jax.random.key(1), (5, 3))
    weights = jax.random.normal(jax.random.key(2), (4, 5, 3)) * 1000.0
    with grad_precision.reduce_gradients_in("bfloat16"):
        _, pullback = jax.vjp(lambda w: grad_precision.copies(4, w) * weights, w)
    (inside,) = pullback(jnp.ones((4, 5, 3)))
    with grad_precision.reduce_gradients_in("bfloat16"):
        (again,) = pullback(jnp.ones((4, 5, 3)))
    assert np.array_equal(inside, again)
    assert not np.array_equal(inside, np.sum(np.asarray(weights), axis=0))


def test_matmul_and_copies_are_the_plain_ops_without_a_lower_dtype():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    for dtype in (None, "float32"):
        with grad_precision.reduce_gradients_in(dtype):
            traced = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(grad_precision.matmul("bm,mf->bf", x, w))))(w))
            copied = str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(grad_precision.copies(4, w))))(w))
        assert "custom_vjp" not in traced and "custom_vjp" not in copied


def test_copies_sum_their_gradient_in_the_reduce_dtype():
    w = jax.random.normal(jax.random.key(1), (5, 3))
    weights = jax.random.normal(jax.random.key(2), (4, 5, 3)) * 1000.0

    def loss(w):
        return jnp.sum(grad_precision.copies(4, w) * weights)

    with grad_precision.reduce_gradients_in("bfloat16"):
        low = jax.grad(loss)(w)
    terms = np.asarray(weights.astype(jnp.bfloat16), np.float32)  # each copy's gradient, rounded
    # summed in bfloat16 as a bf16 all-reduce sums: each of the 3 additions rounds once
    assert np.all(np.abs(low - terms.sum(0)) <= 3 * BF16_EPS * np.abs(terms).sum(0))
    assert low.dtype == jnp.float32 and not np.array_equal(low, np.sum(np.asarray(weights), axis=0))


def test_add_bias_sums_a_bf16_gradient_in_float32_under_float32_reduction():
    h = jax.random.normal(jax.random.key(3), (4, 64, 8)).astype(jnp.bfloat16)
    b = jax.random.normal(jax.random.key(4), (8,))
    probe = jax.random.normal(jax.random.key(5), (4, 64, 8)).astype(jnp.bfloat16)

    def grads(fn):
        return jax.grad(lambda h, b: jnp.sum((fn(h, b) * probe).astype(jnp.float32)), argnums=(0, 1))(h, b)

    plain_dh, plain_db = grads(lambda h, b: h + b.astype(h.dtype))
    with grad_precision.reduce_gradients_in("float32"):
        dh, db = grads(grad_precision.add_bias)
    assert np.array_equal(dh, plain_dh)
    np.testing.assert_allclose(db, np.asarray(probe, np.float32).sum((0, 1)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(plain_db, db, rtol=1e-6, atol=1e-6)  # autodiff's own sum ran in bfloat16


def test_an_unknown_reduce_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="grad_reduce_dtype='float16'"):
        parallel.ParallelConfig(parallel.make_mesh(8, 1, 1), grad_reduce_dtype="float16")


def _train(par, num_steps=3):
    batches = [{"inputs": random_tokens(256, 32, seed=i).reshape(16, 16).astype(np.int32),
                "targets": random_tokens(256, 32, seed=100 + i).reshape(16, 16).astype(np.int32)}
               for i in range(num_steps)]
    state, metrics = train_on_mesh(CFG, OPTIMIZER, par, batches)
    return state, [(float(m["loss"]), float(m["grad_norm"])) for m in metrics]


@pytest.mark.parametrize("mesh", [(2, 2, 2), pytest.param((1, 8, 1), marks=pytest.mark.slow)],
                         ids=lambda m: "x".join(map(str, m)))
def test_bf16_reduction_trains_as_float32_within_its_rounding(mesh):
    """Same forward pass (the first loss is equal); gradients rounded once to bfloat16 before the
    reduction: the gradient norm within bfloat16's rounding, the parameters after three AdamW steps
    (lr 1e-3 at most) within a few bfloat16 roundings of an update."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        par = parallel.ParallelConfig(parallel.make_mesh(*mesh), shard_optimizer=True, grad_reduce_dtype=dtype)
        runs[dtype] = _train(par)
    (f32_state, f32), (low_state, low) = runs["float32"], runs["bfloat16"]
    assert low[0][0] == f32[0][0]
    np.testing.assert_allclose([g for _, g in low], [g for _, g in f32], rtol=8 * BF16_EPS)
    np.testing.assert_allclose([loss for loss, _ in low], [loss for loss, _ in f32], rtol=1e-4)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), low_state["params"],
                                         f32_state["params"]))
    assert 0 < max(moved) < 3e-3 * 0.1  # AdamW's update is lr * O(1); its bf16 error a small part of it


def _partitioned_all_reduces(mesh, dtype, compute_dtype="float32", zero=False):
    c = load_config_file("pr_moe", "tiny")
    c.mesh.grad_reduce_dtype, c.mesh.shard_optimizer, c.model.compute_dtype = dtype, zero, compute_dtype
    record = cost.train_step_cost(c, mesh, partitioned=True)
    return [col for col in record.collectives if col.kind == "all-reduce"]


def _shape_of(collective, text):
    return re.search(rf"%{re.escape(collective.name)} = (\w+)\[([0-9,]*)\]", text).groups()


@pytest.mark.parametrize("mesh, zero", [((1, 8, 1), False), pytest.param((8, 1, 1), True, marks=pytest.mark.slow),
                                        pytest.param((2, 2, 2), True, marks=pytest.mark.slow)])
def test_bf16_reduction_halves_the_gradient_bytes_of_the_partitioned_step(mesh, zero, monkeypatch):
    """Tiny PR-MoE: every weight matrix's gradient is all-reduced in bfloat16 (2 bytes) as XLA's
    SPMD partitioner emits the step (a GPU runs it so; XLA:CPU promotes it to float32 afterwards);
    what stays float32 is vectors, the position embedding, gates, statistics, and the tensor-parallel
    activations' reductions (the same bytes in both)."""
    texts = []
    real = cost.compile_partitioned

    def keep(lowered, options):
        compiled, text = real(lowered, options)
        texts.append(text)
        return compiled, text

    monkeypatch.setattr(cost, "compile_partitioned", keep)
    f32 = _partitioned_all_reduces(mesh, "float32", zero=zero)
    low = _partitioned_all_reduces(mesh, "bfloat16", zero=zero)
    assert all(_shape_of(c, texts[0])[0] != "bf16" for c in f32)
    shapes = [_shape_of(c, texts[1]) for c in low]
    f32_matrices = [s for c, s in zip(low, shapes) if s[0] == "f32" and s[1].count(",") >= 1 and c.bytes > 70_000]
    assert len(f32_matrices) <= (38 if mesh[2] > 1 else 1), f32_matrices  # TP activations; the position embedding
    f32_bytes, low_bytes = sum(c.bytes for c in f32), sum(c.bytes for c in low)
    gradient_share = {1: (0.49, 0.53), 2: (0.70, 0.80)}[mesh[2]]  # tensor = 2: 10 MB of activations in both
    assert gradient_share[0] < low_bytes / f32_bytes < gradient_share[1]


@pytest.mark.slow  # the unit tests above check matmul and add_bias under bf16 compute
def test_float32_reduction_under_bf16_compute_keeps_weight_gradients_float32(monkeypatch):
    """bfloat16 compute alone would reduce the matmul weights' gradients in bfloat16 (autodiff makes
    them in the weights' compute dtype); grad_reduce_dtype=float32, the default, makes them float32."""
    texts = []
    real = hlo.compile_partitioned
    monkeypatch.setattr(cost, "compile_partitioned", lambda lowered, options: (
        lambda result: texts.append(result[1]) or result)(real(lowered, options)))
    f32 = _partitioned_all_reduces((1, 8, 1), "float32", compute_dtype="bfloat16")
    low = _partitioned_all_reduces((1, 8, 1), "bfloat16", compute_dtype="bfloat16")
    assert not [c for c in f32 if _shape_of(c, texts[0])[0] == "bf16"]  # matrices and biases float32
    assert 0.49 < sum(c.bytes for c in low) / sum(c.bytes for c in f32) < 0.53
