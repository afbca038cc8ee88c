"""Every dispatch path against the others and against a per-token loop, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch as dispatch_lib
from moe_jax import experts as experts_lib
from moe_jax.gating import top_k_gating
from tests.helpers import make_experts


def loop_reference(x, routing, experts):
    """y[s] = sum over kept copies i of weight[s, i] * FFN_{e_i}(x[s]), one token at a time."""
    x = np.asarray(x, np.float64)
    params = {name: np.asarray(value, np.float64) for name, value in experts.items()}
    index, weight, kept = (np.asarray(a) for a in (routing.expert_index, routing.weight, routing.kept))
    y = np.zeros_like(x)
    for s in range(x.shape[0]):
        for i in range(index.shape[1]):
            if kept[s, i]:
                e = index[s, i]
                h = x[s] @ params["w1"][e] + params["b1"][e]
                h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
                y[s] += weight[s, i] * (h @ params["w2"][e] + params["b2"][e])
    return y


def setup(S, E, k, M=16, F=24, cf=1.0, drop=True, seed=0):
    kx, kl, ke = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (S, M))
    logits = jax.random.normal(kl, (S, E)) * 2
    routing = top_k_gating(logits, k=k, capacity_factor=cf, min_capacity=0, drop_tokens=drop)
    return x, routing, make_experts(ke, E, M, F)


@pytest.mark.parametrize("S,E,k", [(1, 2, 1), pytest.param(37, 4, 1, marks=pytest.mark.slow), (64, 8, 2), (50, 16, 3),
                                   pytest.param(130, 5, 2, marks=pytest.mark.slow)])
def test_paths_equal_loop_without_drops(S, E, k):
    x, routing, experts = setup(S, E, k, drop=False)
    want = loop_reference(x, routing, experts)
    for path in dispatch_lib.PATHS:
        np.testing.assert_allclose(dispatch_lib.dispatch(path, x, routing, experts), want, rtol=1e-4, atol=1e-5,
                                   err_msg=path)
    for impl in dispatch_lib.DROPLESS_IMPLS:
        np.testing.assert_allclose(dispatch_lib.dispatch_dropless(x, routing, experts, impl=impl), want,
                                   rtol=1e-4, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("S,E,k,cf", [(64, 4, 1, 0.5), (96, 8, 2, 0.3), (60, 6, 3, 0.4)])
def test_paths_equal_with_drops(S, E, k, cf):
    x, routing, experts = setup(S, E, k, cf=cf)
    assert float(routing.dropped_fraction) > 0.05
    want = loop_reference(x, routing, experts)
    for path in dispatch_lib.PATHS:  # dropless computes dropped copies but weights them 0
        np.testing.assert_allclose(dispatch_lib.dispatch(path, x, routing, experts), want, rtol=1e-4, atol=1e-5,
                                   err_msg=path)


def token_reference(x, experts, weight, expert_index, mask):
    """y[s] = sum_i mask[s, i] * weight[s, i] * FFN_{expert_index[s, i]}(x[s]): each token reads its
    experts' weights directly, no buffer, no capacity; differentiable in x, experts and weight."""
    params = jax.tree.map(lambda p: p[expert_index], experts)  # [S, k, ...]
    hidden = jnp.einsum("sm,skmf->skf", x, params["w1"]) + params["b1"]
    out = jnp.einsum("skf,skfm->skm", experts_lib.gelu(hidden), params["w2"]) + params["b2"]
    return jnp.einsum("skm,sk->sm", out, weight * mask)


def reference_gradients(x, experts, routing, mask, cotangent):
    """Gradients of sum(y * cotangent) of the token reference in float64, for x, experts, weight."""
    with jax.enable_x64(True):
        def f64(a):
            return jnp.asarray(np.asarray(a, np.float64))

        def loss(x, experts, weight):
            reference = token_reference(x, experts, weight, jnp.asarray(routing.expert_index), f64(mask))
            return jnp.sum(reference * f64(cotangent))
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(f64(x), jax.tree.map(f64, experts), f64(routing.weight))
        return jax.tree.map(np.asarray, grads)


# (S, E, k, cf): drops and empty slots at k = 1, 2, 3; and a decode-sized step for "serve"'s
# per-copy branch (2 * S * k <= E).
GRADIENT_CASES = [(48, 8, 2, 0.6), (64, 4, 1, 1.0), (60, 6, 3, 0.8), (3, 16, 2, 1.0)]


@pytest.mark.parametrize("S,E,k,cf", GRADIENT_CASES)
def test_gradients_of_every_path_equal_reference(S, E, k, cf):
    x, routing, experts = setup(S, E, k, cf=cf)
    if S > 8:
        assert float(routing.dropped_fraction) > 0 and int(routing.kept_counts().min()) < routing.capacity
    cotangent = jax.random.normal(jax.random.key(9), x.shape)

    def loss(path, x, experts, weight):
        return jnp.sum(dispatch_lib.dispatch(path, x, routing.replace(weight=weight), experts) * cotangent)

    kept = np.asarray(routing.kept, np.float64)
    # A path with capacity gives dropped copies nothing (weight gradient 0); one without computes
    # every copy, so a dropped copy's weight (0 in the forward pass) gets its gradient.
    wants = {uses_capacity: reference_gradients(x, experts, routing, kept if uses_capacity else np.ones_like(kept),
                                                cotangent) for uses_capacity in (True, False)}
    for path, spec in dispatch_lib.PATHS.items():
        want = wants[spec.uses_capacity]
        got = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(path, x, experts, routing.weight)
        for (name, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            assert np.abs(w).max() > 0
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(),
                                       err_msg=f"{path} {jax.tree_util.keystr(name)}")


def test_gather_buffer_layout_matches_dispatch_mask():
    x, routing, _ = setup(40, 4, 2, cf=0.5)
    _, dispatch_mask = routing.to_dense()
    buffer = dispatch_lib.gather_to_buffer(x, routing)
    np.testing.assert_allclose(buffer, jnp.einsum("sec,sm->ecm", dispatch_mask.astype(x.dtype), x), atol=1e-6)


def test_bfloat16_paths_agree():
    x, routing, experts = setup(64, 8, 1, cf=2.0)
    x16 = x.astype(jnp.bfloat16)
    ref = dispatch_lib.dispatch("einsum", x, routing, experts)
    for path in dispatch_lib.PATHS:
        got = dispatch_lib.dispatch(path, x16, routing, experts)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), ref, rtol=5e-2, atol=5e-2, err_msg=path)


def test_unknown_path():
    x, routing, experts = setup(8, 2, 1)
    with pytest.raises(ValueError, match="'fancy'"):
        dispatch_lib.dispatch("fancy", x, routing, experts)


def test_pallas_grouped_ffn_in_interpret_mode_equals_ragged_dot_with_gradients():
    """The dropless path's "pallas" experts FFN: the Pallas grouped matmul (interpret mode here)
    against jax.lax.ragged_dot, forward and gradients, ragged groups (one empty)."""
    from moe_jax import experts as experts_lib

    keys = jax.random.split(jax.random.key(7), 3)
    group_sizes = jnp.asarray([9, 0, 17, 6], jnp.int32)
    rows = jax.random.normal(keys[0], (32, 24))  # 32 = the groups' total
    sorted_expert = jnp.repeat(jnp.arange(4), group_sizes, total_repeat_length=32)
    experts = make_experts(keys[1], 4, 24, 40)

    def loss(fn):
        return jax.value_and_grad(lambda r, e: jnp.sum(jnp.sin(fn(e, r, sorted_expert, group_sizes))), argnums=(0, 1))

    got, got_grads = loss(lambda *a: experts_lib.grouped_ffn_pallas(*a, interpret=True))(rows, experts)
    want, want_grads = loss(experts_lib.grouped_ffn_ragged)(rows, experts)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_grads, want_grads)
