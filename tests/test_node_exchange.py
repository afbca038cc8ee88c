"""The node-deduplicated exchange (mesh.exchange="node_dedup", moe_jax.node_exchange): equal to one
device without dropping, equal to a per-shard loop reference with node-capacity drops, and the
inter-node bytes it saves under group-limited routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, cost, node_exchange, parallel
from moe_jax import moe as moe_lib
from tests.helpers import ffn_reference, moe_layer_params

M, F, E = 16, 32, 8


def _moe(limit=0, **kw):
    return config.MoEConfig(experts=E, k=2, use_rts=False, second_expert_sampling=False,
                            route_groups=2 if limit else 0, route_group_limit=limit, **kw)


@pytest.mark.parametrize("mesh, limit, path", [((1, 8, 1), 0, "gather"), ((1, 8, 1), 1, "einsum"),
                                               pytest.param((2, 4, 1), 1, "gather", marks=pytest.mark.slow),
                                               ((1, 4, 2), 1, "gather")])  # tensor ranks repeat the work
def test_without_dropping_equal_to_one_device(mesh, limit, path):
    moe = _moe(limit, drop_tokens=False, dispatch=path)
    params = moe_layer_params(E, M, F, 5)
    x = jax.random.normal(jax.random.key(6), (16, 4, M))
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh, expert_nodes=2), exchange="node_dedup")

    def loss(params, x, par):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, parallel=par)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"], (y, stats["overflow_fraction"] if par else 0.0)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (_, (y_ref, _)), g_ref = grad(params, x, None)
    (_, (y, overflow)), g = grad(params, x, par)
    assert float(overflow) == 0.0
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)


def _shard_reference(params, tokens, moe, nodes, limit):
    """One shard's layer in NumPy: its own routing and capacity, then the node capacity: per node,
    the first node_capacity tokens (token order) with a kept copy there are sent, the others'
    copies there dropped."""
    routing = moe_lib.route(params["gate"], tokens, moe=moe, train=True, rng=None)
    expert, weight = np.asarray(routing.expert_index), np.asarray(routing.weight)
    kept = np.asarray(routing.kept).copy()
    cap = node_exchange.node_capacity(tokens.shape[0], routing.capacity, E, moe.k, nodes, groups=moe.route_groups,
                                      group_limit=limit, factor=moe.node_capacity_factor)
    node = expert // (E // nodes)
    for g in range(nodes):
        wanting = [s for s in range(tokens.shape[0]) if np.any(kept[s] & (node[s] == g))]
        for s in wanting[cap:]:
            kept[s] &= node[s] != g
    x = np.asarray(tokens, np.float64)
    y = np.zeros_like(x)
    for s in range(x.shape[0]):
        for j in range(moe.k):
            if kept[s, j]:
                y[s] += weight[s, j] * ffn_reference(params["experts"], expert[s, j], x[s])
    return y, kept, np.asarray(routing.kept)


@pytest.mark.parametrize("limit, factor", [(1, 1.0), (0, 1.0), (1, 1.5)])
def test_with_dropping_equal_to_a_per_shard_loop_with_node_capacity(limit, factor):
    moe = _moe(limit, capacity_factor=0.5, min_capacity=0, node_capacity_factor=factor)
    params = moe_layer_params(E, M, F, 7)
    x = jax.random.normal(jax.random.key(8), (16, 8, M))  # 16 tokens per shard on 8 devices
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1, expert_nodes=2), exchange="node_dedup")
    y, stats = jax.jit(lambda p, x: moe_lib.moe_forward(p, x, moe=moe, train=True, parallel=par))(params, x)
    flat = np.asarray(x).reshape(8, -1, M)
    results = [_shard_reference(params, jnp.asarray(part), moe, 2, limit) for part in flat]
    want = np.concatenate([r[0] for r in results]).reshape(x.shape)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    node_dropped = sum(int(np.sum(routed & ~sent)) for _, sent, routed in results)
    copies = x.shape[0] * x.shape[1] * moe.k
    if limit and factor == 1.0:
        assert node_dropped > 0  # the node capacity bites at this size
    np.testing.assert_allclose(stats["overflow_fraction"], node_dropped / copies, rtol=1e-6)
    kept_total = sum(int(np.sum(sent)) for _, sent, _ in results)
    np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept_total / copies, rtol=1e-5)


def _inter_node_bytes(exchange, limit, path="gather"):
    """All-to-all bytes per device over the expert_node axis (groups of the 2 nodes) of one layer's
    forward and backward on (1, 8, 1) split into 2 nodes x 4."""
    moe = _moe(limit, capacity_factor=1.0, dispatch=path)
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1, expert_nodes=2), exchange=exchange)
    params = jax.eval_shape(lambda: moe_layer_params(E, 64, 128, 0))
    x = jax.ShapeDtypeStruct((64, 16, 64), jnp.float32)

    def loss(params, x):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, parallel=par)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"]

    record = cost.compiled_cost(jax.grad(loss, argnums=(0, 1)), params, x)
    exchanges = [c for c in record.collectives if c.kind == "all-to-all"]
    return sum(c.bytes for c in exchanges if c.group_size == 2), sum(c.bytes for c in exchanges)


def test_group_limited_routing_halves_the_inter_node_bytes():
    """Top-2 over 2 nodes: the hierarchical exchange moves the whole capacity buffer over the nodes
    with or without a group limit; once per node, unrestricted routing moves as much (a token may
    use both nodes) and m = 1 half, plus the rows' weights for the node's experts (E/2 per row)."""
    hierarchical, _ = _inter_node_bytes("hierarchical", 0)
    assert _inter_node_bytes("hierarchical", 1)[0] == hierarchical
    free, _ = _inter_node_bytes("node_dedup", 0)
    limited, _ = _inter_node_bytes("node_dedup", 1)
    metadata = 2 * (E // 2) / 64  # per row: E/2 weights (4 B, and their gradient) and choices (1 B), M = 64
    assert 1.0 <= free / hierarchical <= 1.0 + metadata
    assert 0.5 <= limited / hierarchical <= 0.5 * (1.0 + metadata)


def test_node_dedup_needs_a_capacity_buffer_path():
    moe = _moe(0, drop_tokens=False, dispatch="dropless")
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1, expert_nodes=2), exchange="node_dedup")
    with pytest.raises(ValueError, match="mesh.exchange='node_dedup' needs a capacity-buffer dispatch path"):
        moe_lib.moe_forward(moe_layer_params(E, M, F, 5), jnp.ones((16, 4, M)), moe=moe, train=True, parallel=par)


def test_node_capacity_follows_the_nodes_a_token_can_reach():
    # top-2 on 4 nodes, C = 4 of S = 64 tokens, E = 8: C * E / k = 16 tokens admitted
    assert node_exchange.node_capacity(64, 4, 8, 2, 4) == 8  # reach 2 of 4 nodes
    assert node_exchange.node_capacity(64, 4, 8, 2, 4, groups=4, group_limit=1) == 4  # one node
    assert node_exchange.node_capacity(64, 4, 8, 2, 4, groups=2, group_limit=1) == 8  # a group spans 2 nodes
    assert node_exchange.node_capacity(64, 4, 8, 2, 4, group_limit=1, groups=4, factor=1.5) == 6
    assert node_exchange.node_capacity(64, 4, 8, 8, 4, column_per_expert=True) == 8  # 2 experts x C per node
    assert node_exchange.node_capacity(64, 64, 8, 2, 4, groups=4, group_limit=1) == 64  # no dropping


@pytest.mark.parametrize("router, nodes, groups", [("expert_choice", 2, 0), ("topk", 4, 2), ("topk", 2, 4)])
def test_equal_to_the_hierarchical_exchange_where_node_buffers_are_ample(router, nodes, groups):
    """Capacity factor 2: no node buffer overflows, so the layer is the hierarchical exchange's
    (expert-choice: each node's E/G experts take C tokens each; a routing group spanning two nodes)."""
    moe = config.MoEConfig(experts=E, k=2, use_rts=False, second_expert_sampling=False, capacity_factor=2.0,
                           router=router, route_groups=groups, route_group_limit=1 if groups else 0)
    params = moe_layer_params(E, M, F, 9)
    x = jax.random.normal(jax.random.key(10), (16, 4, M))
    out = {}
    for name in ("hierarchical", "node_dedup"):
        par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1, expert_nodes=nodes), exchange=name)
        out[name] = jax.jit(lambda p, x: moe_lib.moe_forward(p, x, moe=moe, train=True, parallel=par))(params, x)
    (y_ref, s_ref), (y, s) = out["hierarchical"], out["node_dedup"]
    assert float(s["overflow_fraction"]) == 0.0
    np.testing.assert_allclose(s["dropped_fraction"], s_ref["dropped_fraction"], rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
