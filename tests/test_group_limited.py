"""Group-limited routing (moe.route_groups / route_group_limit): a token's experts come from at most
m groups, the ones with its best scores; equal to a loop reference, and to one device on a
two-node mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, parallel
from moe_jax import moe as moe_lib
from tests.helpers import moe_layer_params

E, G, M = 16, 4, 8


def _reference(logits, k, limit):
    logits = np.asarray(logits, np.float64)
    out = []
    for row in logits:
        best = row.reshape(G, E // G).max(axis=1)
        groups = np.argsort(-best, kind="stable")[:limit]
        allowed = np.isin(np.arange(E) // (E // G), groups)
        masked = np.where(allowed, row, -np.inf)
        out.append(np.argsort(-masked, kind="stable")[:k])
    return np.array(out)


def _moe(k, limit, router="topk"):
    return config.MoEConfig(experts=E, k=k, router=router, drop_tokens=False, use_rts=False,
                            second_expert_sampling=False, route_groups=G, route_group_limit=limit)


@pytest.mark.parametrize("k,limit", [(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_at_most_m_groups_and_equal_to_the_loop_reference(k, limit, seed):
    gate = {"kernel": jax.random.normal(jax.random.key(seed), (M, E))}
    x = jax.random.normal(jax.random.key(seed + 10), (64, M))
    routing = moe_lib.route(gate, x, moe=_moe(k, limit), train=False, rng=None)
    index = np.asarray(routing.expert_index)
    groups_used = np.array([len(set(row // (E // G))) for row in index])
    assert groups_used.max() <= limit
    logits = x @ gate["kernel"]
    np.testing.assert_array_equal(np.sort(index, axis=1), np.sort(_reference(logits, k, limit), axis=1))
    if k == 1:  # the weight is still the softmax over every expert: the limit chooses, never weighs
        gates = jax.nn.softmax(logits, axis=-1)
        np.testing.assert_allclose(routing.weight[:, 0], np.take_along_axis(np.asarray(gates), index, 1)[:, 0],
                                   rtol=1e-6)
    if limit < min(k, G):  # the limit binds somewhere: without it some token would span more groups
        free = moe_lib.route(gate, x, moe=_moe(k, 0), train=False, rng=None)
        assert max(len(set(row // (E // G))) for row in np.asarray(free.expert_index)) > limit


def test_a_limit_of_every_group_is_no_limit_and_the_sigmoid_router_takes_it_too():
    gate = {"kernel": jax.random.normal(jax.random.key(3), (M, E))}
    x = jax.random.normal(jax.random.key(4), (48, M))
    for router in ("topk", "sigmoid"):
        free = moe_lib.route(gate, x, moe=_moe(2, 0, router), train=False, rng=None)
        full = moe_lib.route(gate, x, moe=_moe(2, G, router), train=False, rng=None)
        np.testing.assert_array_equal(full.expert_index, free.expert_index)
        np.testing.assert_allclose(full.weight, free.weight, rtol=1e-6)
        limited = moe_lib.route(gate, x, moe=_moe(2, 1, router), train=False, rng=None)
        assert all(len(set(row // (E // G))) == 1 for row in np.asarray(limited.expert_index))


def test_on_a_two_node_mesh_equal_to_one_device():
    moe = config.MoEConfig(experts=8, k=2, drop_tokens=False, use_rts=False, second_expert_sampling=False,
                           route_groups=2, route_group_limit=1)
    params = moe_layer_params(8, M, 16, 5)
    x = jax.random.normal(jax.random.key(6), (16, 4, M))
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1, expert_nodes=2), exchange="hierarchical")

    def loss(params, x, par):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, parallel=par)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"], y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (_, y_ref), g_ref = grad(params, x, None)
    (_, y), g = grad(params, x, par)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="route_group_limit=3 needs moe.route_groups"):
        config.MoEConfig(experts=E, route_groups=2, route_group_limit=3)
    with pytest.raises(ValueError, match="router='expert_choice'"):
        config.MoEConfig(experts=E, router="expert_choice", route_groups=4, route_group_limit=1)
    gate = {"kernel": jnp.ones((M, E))}
    with pytest.raises(ValueError, match="moe.k=4 experts cannot come from"):
        moe_lib.route(gate, jnp.ones((4, M)), moe=config.MoEConfig(experts=E, k=4, route_groups=8,
                                                                   route_group_limit=1), train=False, rng=None)
