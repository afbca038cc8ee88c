"""The inverse-map VJPs of the mapping table's gathers against autodiff of the plain gathers.

experiments/dispatch_autodiff.py keeps gather_to_buffer, combine_from_buffer and the dropless path as
the plain gathers that autodiff differentiates with scatter-adds; the library's backward passes are
the inverse-map gathers. Forward outputs must not change and gradients must agree, on random data with
dropped copies, empty slots and k = 2, in float32 and bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import dispatch_autodiff
from moe_jax import dispatch as dispatch_lib
from moe_jax.gating import top_k_gating

# Differences between the two backward passes come only from the order of a sum over a token's k
# copies: none in float32, a rounding of the last bit in bfloat16 (8 mantissa bits).
TOLERANCE = {jnp.float32: dict(rtol=1e-6, atol=1e-6), jnp.bfloat16: dict(rtol=2 ** -7, atol=2 ** -7)}


@functools.lru_cache(maxsize=None)  # routing runs op by op: build each case once
def make_case(S, E, k, cf, M=16, F=24, seed=0, dtype=jnp.float32):
    kx, kl, ke, kc = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (S, M)).astype(dtype)
    logits = jax.random.normal(kl, (S, E)) * 2
    routing = top_k_gating(logits, k=k, capacity_factor=cf, min_capacity=0, drop_tokens=True)
    keys = jax.random.split(ke, 4)
    experts = {
        "w1": jax.random.normal(keys[0], (E, M, F)) / np.sqrt(M),
        "b1": jax.random.normal(keys[1], (E, F)) * 0.1,
        "w2": jax.random.normal(keys[2], (E, F, M)) / np.sqrt(F),
        "b2": jax.random.normal(keys[3], (E, M)) * 0.1,
    }
    cotangent = jax.random.normal(kc, (S, M)).astype(dtype)
    return x, routing, experts, cotangent


# (S, E, k, cf): each has dropped copies and empty slots (checked in the test).
CASES = [(48, 8, 2, 0.6), (64, 4, 1, 1.0), (60, 6, 3, 0.8)]


def both_ways(fn, *args):
    """(value, grads) of fn(library, *args) with the library's inverse-map VJPs and with autodiff of
    the plain gathers (`library` is the module whose gather_to_buffer, combine_from_buffer and
    dispatch_dropless fn calls)."""
    argnums = tuple(range(len(args)))
    return [jax.jit(jax.value_and_grad(functools.partial(fn, library), argnums=argnums))(*args)
            for library in (dispatch_lib, dispatch_autodiff)]


def assert_same(custom, autodiff, dtype):
    (value_c, grads_c), (value_a, grads_a) = custom, autodiff
    np.testing.assert_array_equal(np.asarray(value_c, np.float32), np.asarray(value_a, np.float32))
    for got, want in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_a)):
        assert got.dtype == want.dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(want).max() > 0  # random inputs: a zero gradient would prove nothing
        np.testing.assert_allclose(got, want, **TOLERANCE[dtype])


def check_case(routing):
    kept = np.asarray(routing.kept_counts())
    assert float(routing.dropped_fraction) > 0, "the case must drop copies"
    assert kept.min() < routing.capacity, "the case must leave empty slots"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("S,E,k,cf", CASES)
def test_gather_to_buffer_vjp(S, E, k, cf, dtype):
    x, routing, _, _ = make_case(S, E, k, cf, dtype=dtype)
    check_case(routing)
    probe = jax.random.normal(jax.random.key(7), (E, routing.capacity, x.shape[1])).astype(dtype)

    def loss(library, x):
        return jnp.sum(library.gather_to_buffer(x, routing) * probe)

    assert_same(*both_ways(loss, x), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("S,E,k,cf", CASES)
def test_combine_from_buffer_vjp(S, E, k, cf, dtype):
    x, routing, _, cotangent = make_case(S, E, k, cf, dtype=dtype)
    check_case(routing)
    out = jax.random.normal(jax.random.key(8), (E, routing.capacity, x.shape[1])).astype(dtype)

    def loss(library, out, weight):
        return jnp.sum(library.combine_from_buffer(out, routing.replace(weight=weight)) * cotangent)

    custom, autodiff = both_ways(loss, out, routing.weight)
    assert_same(custom, autodiff, dtype)
    # the weight's gradient flows (for kept copies) and is zero for dropped ones, as autodiff's
    d_weight = np.asarray(custom[1][1])
    kept = np.asarray(routing.kept)
    assert np.all(d_weight[~kept] == 0) and np.all(d_weight[kept] != 0)


@pytest.mark.parametrize("S,E,k,cf,dtype,impl", [
    (*CASES[0], jnp.float32, "tiles"), (*CASES[0], jnp.bfloat16, "tiles"), (*CASES[0], jnp.float32, "ragged"),
    (*CASES[0], jnp.bfloat16, "ragged"), (*CASES[1], jnp.float32, "tiles"), (*CASES[2], jnp.float32, "tiles")])
def test_dropless_vjp(S, E, k, cf, dtype, impl):
    x, routing, experts, cotangent = make_case(S, E, k, cf, dtype=dtype)

    def loss(library, x, experts, weight):
        y = library.dispatch_dropless(x, routing.replace(weight=weight), experts, impl=impl)
        return jnp.sum(y * cotangent)

    assert_same(*both_ways(loss, x, experts, routing.weight), dtype)


def test_dropless_vjp_without_drops():
    """The layout dropless runs in training: drop_tokens=False, every copy computed."""
    x, _, experts, cotangent = make_case(50, 16, 2, 1.0)
    routing = top_k_gating(jax.random.normal(jax.random.key(3), (50, 16)) * 2, k=2, capacity_factor=1.0,
                           min_capacity=0, drop_tokens=False)
    assert np.asarray(routing.kept).all()

    def loss(library, x, experts, weight):
        return jnp.sum(library.dispatch_dropless(x, routing.replace(weight=weight), experts) * cotangent)

    assert_same(*both_ways(loss, x, experts, routing.weight), jnp.float32)


def test_gather_copies_is_a_partial_permutation():
    """gather_copies / combine_copies on a hand-made table: row 0 empty, copy (1, 0) dropped."""
    x = jnp.arange(6.0).reshape(3, 2)  # tokens 0, 1, 2
    position = jnp.array([[2, 3], [4, 1], [5, 4]])  # R = 4 rows; 4 and 5 are "no row"
    row_copy = dispatch_lib._row_copies(position, 4)
    np.testing.assert_array_equal(row_copy, [6, 3, 0, 1])  # S * k = 6 marks the empty row
    rows = dispatch_lib.gather_copies(x, row_copy, position)
    np.testing.assert_array_equal(rows, [[0, 0], [2, 3], [0, 1], [0, 1]])
    weights = jnp.arange(8.0).reshape(4, 2)
    d_x = jax.grad(lambda x: jnp.sum(dispatch_lib.gather_copies(x, row_copy, position) * weights))(x)
    np.testing.assert_array_equal(d_x, [[4 + 6, 5 + 7], [2, 3], [0, 0]])
    weight = jnp.array([[0.5, 2.0], [3.0, 0.25], [1.0, 1.0]])
    y = dispatch_lib.combine_copies(rows, position, row_copy, weight)
    np.testing.assert_array_equal(y, [[0 * 0.5 + 0 * 2, 1 * 0.5 + 1 * 2], [2 * 0.25, 3 * 0.25], [0, 0]])


@pytest.mark.parametrize("path", ["gather", "dropless"])
def test_a_path_registered_outside_the_library_runs_in_the_layer(path):
    """experiments/dispatch_autodiff.py adds its paths with register_path alone: the MoE layer runs
    them by name, equal to the library's path forward and backward."""
    from moe_jax import moe as moe_lib
    from moe_jax.config import MoEConfig

    E, M, F, S = 6, 16, 24, 40
    keys = jax.random.split(jax.random.key(5), 6)
    params = {"gate": {"kernel": jax.random.normal(keys[0], (M, E))},
              "experts": {"w1": jax.random.normal(keys[1], (E, M, F)) / np.sqrt(M),
                          "b1": jax.random.normal(keys[2], (E, F)) * 0.1,
                          "w2": jax.random.normal(keys[3], (E, F, M)) / np.sqrt(F),
                          "b2": jax.random.normal(keys[4], (E, M)) * 0.1}}
    x = jax.random.normal(keys[5], (S, M))

    def loss(params, x, dispatch):
        moe = MoEConfig(experts=E, k=2, capacity_factor=0.8, min_capacity=0, use_rts=False, dispatch=dispatch,
                        drop_tokens=path != "dropless")
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True)
        return jnp.sum(y * y) + stats["aux_loss"]

    want = jax.value_and_grad(loss, argnums=(0, 1))(params, x, path)
    got = jax.value_and_grad(loss, argnums=(0, 1))(params, x, path + dispatch_autodiff.SUFFIX)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
