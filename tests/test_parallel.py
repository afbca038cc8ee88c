"""Expert / tensor / data parallelism on 8 CPU devices equals the single-device computation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import config, exchange, model, parallel, train_lib
from moe_jax import dispatch as dispatch_lib
from moe_jax import moe as moe_lib
from tests.helpers import moe_layer_params

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1), (1, 4, 2)]
# every mesh with the flat exchange; each other exchange on the meshes where it differs from flat
# (the default run keeps one setting per exchange kind and the three meshes; the rest is slow)
_SLOW = pytest.mark.slow
SETTINGS = ([(mesh, "flat", False, 1) if mesh in ((1, 8, 1), (2, 2, 2))
             else pytest.param(mesh, "flat", False, 1, marks=_SLOW) for mesh in MESHES]
            + [pytest.param((2, 4, 1), "hierarchical", False, 2, marks=_SLOW), ((1, 8, 1), "hierarchical", False, 4),
               pytest.param((2, 2, 2), "coordinated", False, 1, marks=_SLOW), ((1, 4, 2), "coordinated", False, 1),
               ((2, 2, 2), "flat", True, 1), pytest.param((1, 4, 2), "flat", True, 1, marks=_SLOW)])

# No dropping and no random routing: then the sharded model must equal the single-device one.
CFG = config.ModelConfig(
    vocab_size=64, num_layers=4, hidden_size=32, num_heads=4, ffn_size=64, max_seq_len=16,
    moe=config.MoEConfig(experts="8x1,2x1", k=2, drop_tokens=False, second_expert_sampling=False, use_rts=False))
RESIDUAL_CFG = dataclasses.replace(
    CFG, moe=dataclasses.replace(CFG.moe, experts="8x1,16x1", k=1, residual=True))


def _batch(seed=1):
    keys = jax.random.split(jax.random.key(seed))
    return {"inputs": jax.random.randint(keys[0], (16, 16), 0, 64),
            "targets": jax.random.randint(keys[1], (16, 16), 0, 64)}


@functools.lru_cache(maxsize=None)
def _reference(cfg):
    params = model.init_params(jax.random.key(0), cfg)
    return params, *_loss_and_grads(cfg, params, _batch(), None)


def _loss_and_grads(cfg, params, batch, par):
    def loss(params, batch):
        return train_lib.loss_fn(params, batch, cfg, rngs={"gating": jax.random.key(3)}, train=True, parallel=par)[0]

    if par is not None:
        params = jax.device_put(params, parallel.shardings(parallel.param_specs(params, par), par.mesh))
        batch = parallel.device_put_batch(batch, par)
    return jax.jit(jax.value_and_grad(loss))(params, batch)


@pytest.mark.parametrize("mesh,exchange,slicing,nodes", SETTINGS)
def test_loss_and_gradients_equal_single_device(mesh, exchange, slicing, nodes):
    params, ref_loss, ref_grads = _reference(CFG)
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh, expert_nodes=nodes), exchange=exchange,
                                  expert_slicing=slicing)
    loss, grads = _loss_and_grads(CFG, params, _batch(), par)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_residual_top1_equals_single_device(mesh):
    params, ref_loss, ref_grads = _reference(RESIDUAL_CFG)
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh))
    loss, grads = _loss_and_grads(RESIDUAL_CFG, params, _batch(), par)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


@pytest.mark.parametrize("mesh,exchange,slicing,nodes",
                         [((1, 8, 1), "flat", False, 1), ((2, 4, 1), "hierarchical", False, 2),
                          ((1, 4, 2), "coordinated", False, 1), ((2, 2, 2), "flat", True, 1)])
def test_layer_with_dropping_equals_per_shard_reference(mesh, exchange, slicing, nodes):
    """With dropping, capacity is per shard (DeepSpeed's rule): each shard's output equals the
    single-device layer applied to that shard's tokens alone."""
    moe = config.MoEConfig(experts=8, k=2, capacity_factor=0.5, min_capacity=0, second_expert_sampling=False)
    model_dim = 16
    keys = jax.random.split(jax.random.key(5), 6)
    params = {"gate": {"kernel": jax.random.normal(keys[0], (model_dim, 8))},
              "experts": {"w1": jax.random.normal(keys[1], (8, model_dim, 32)) * 0.3,
                          "b1": jax.random.normal(keys[2], (8, 32)) * 0.1,
                          "w2": jax.random.normal(keys[3], (8, 32, model_dim)) * 0.3,
                          "b2": jax.random.normal(keys[4], (8, model_dim)) * 0.1}}
    x = jax.random.normal(keys[5], (16, 8, model_dim))
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh, expert_nodes=nodes), exchange=exchange,
                                  expert_slicing=slicing)
    shards = par.batch_size_divisor
    y, stats = jax.jit(lambda p, x: moe_lib.moe_forward(p, x, moe=moe, train=True, parallel=par))(params, x)
    per_shard = [moe_lib.moe_forward(params, part, moe=moe, train=True) for part in jnp.split(x, shards)]
    np.testing.assert_allclose(y, jnp.concatenate([out for out, _ in per_shard]), rtol=1e-5, atol=1e-5)
    assert float(stats["dropped_fraction"]) > 0.1
    np.testing.assert_allclose(stats["dropped_fraction"], np.mean([s["dropped_fraction"] for _, s in per_shard]),
                               rtol=1e-6)
    np.testing.assert_array_equal(stats["expert_counts"], sum(s["expert_counts"] for _, s in per_shard))


@pytest.mark.parametrize("path", ["gather", "einsum"])
@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_gradients_with_dropping_equal_per_shard_reference(path, mesh):
    """Loss and gradients with dropping: the reference applies each shard's capacity to its own
    tokens; the aux loss is the whole batch's (fractions averaged over shards before the product)."""
    moe = config.MoEConfig(experts=8, k=2, capacity_factor=0.5, min_capacity=0, second_expert_sampling=False,
                           dispatch=path)
    params = _layer_params()
    x = jax.random.normal(jax.random.key(8), (16, 4, 16))
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh))

    def sharded_loss(params, x):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, parallel=par)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"], stats["dropped_fraction"]

    def reference_loss(params, x):
        parts = jnp.split(x, par.batch_size_divisor)
        outputs = [moe_lib.moe_forward(params, part, moe=moe, train=True)[0] for part in parts]
        _, stats = moe_lib.moe_forward(params, x, moe=moe, train=True)  # aux loss over the whole batch
        return sum(jnp.sum(jnp.sin(y)) for y in outputs) + stats["aux_loss"], stats["dropped_fraction"]

    (loss, dropped), grads = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1), has_aux=True))(params, x)
    (ref_loss, _), ref_grads = jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True))(params, x)
    assert float(dropped) > 0.1
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, ref_grads)


def _layer_params(num_experts=8, model_dim=16, ffn_dim=32, seed=5):
    return moe_layer_params(num_experts, model_dim, ffn_dim, seed)


EP_PATHS = [name for name, path in dispatch_lib.PATHS.items() if path.payload is not None]


@pytest.mark.parametrize("path", EP_PATHS)
@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_every_dispatch_path_under_expert_parallelism_equals_one_device(path, mesh):
    """The configured path runs on the mesh (its own exchange), forward and gradients equal to one
    device; nothing is dropped (no capacity, and a row bound that cannot overflow: factor = ep)."""
    moe = config.MoEConfig(experts=8, k=2, drop_tokens=False, second_expert_sampling=False, use_rts=False,
                           dispatch=path, row_exchange_factor=8.0)
    params = _layer_params()
    x = jax.random.normal(jax.random.key(6), (16, 4, 16))
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh))

    def loss(params, x, par):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, parallel=par)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"], (y, stats)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (_, (y_ref, _)), grads_ref = grad(params, x, None)
    (_, (y, stats)), grads = grad(params, x, par)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, grads_ref)
    assert float(stats["overflow_fraction"]) == 0.0 and float(stats["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 4, 2)])
def test_rows_exchange_overflow_is_dropped_and_counted(mesh):
    """With a row bound below the load, each shard processes, per destination device, its first
    `bound` copies in (token, choice) order; the rest contribute 0 and are counted as overflow.
    Reference: the single-device layer on each shard with those copies marked dropped."""
    factor = 0.5
    moe = config.MoEConfig(experts=8, k=2, second_expert_sampling=False, use_rts=False, dispatch="dropless",
                           row_exchange_factor=factor)
    params = _layer_params()
    x = jax.random.normal(jax.random.key(7), (8, 6, 16))
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh))
    y, stats = jax.jit(lambda p, x: moe_lib.moe_forward(p, x, moe=moe, train=True, parallel=par))(params, x)
    ep, tp = par.expert_size, par.tensor_size
    outputs, overflowed, copies = [], 0, 0
    for shard in jnp.split(x, par.batch_size_divisor):
        tokens = shard.reshape(-1, 16)
        routing = moe_lib.route(params["gate"], tokens, moe=moe, train=True, rng=None)
        expert = np.asarray(routing.expert_index)
        share = -(-tokens.shape[0] // tp)  # with tensor ranks, each sends the copies of its share of tokens
        bound = exchange.row_bound(share * moe.k, par.expert_size, factor)
        processed = np.zeros_like(expert, bool)
        for rank in range(tp):
            seen = np.zeros(ep, int)
            for s in range(rank * share, min((rank + 1) * share, tokens.shape[0])):
                for j in range(moe.k):
                    dest = expert[s, j] // (8 // ep)
                    processed[s, j] = seen[dest] < bound
                    seen[dest] += 1
        overflowed += int((~processed).sum())
        copies += processed.size
        dropped = routing.replace(kept=jnp.asarray(processed), weight=routing.weight * processed)
        outputs.append(dispatch_lib.dispatch_gather(tokens, dropped, params["experts"]))
    assert overflowed > 0  # the bound really binds
    np.testing.assert_allclose(y.reshape(-1, 16), jnp.concatenate(outputs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["overflow_fraction"], overflowed / copies, rtol=1e-6)
    np.testing.assert_allclose(stats["dropped_fraction"], overflowed / copies, rtol=1e-6)


def test_path_without_exchange_is_rejected_on_an_expert_mesh():
    moe = config.MoEConfig(experts=8, k=1, dispatch="kernel")
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    with pytest.raises(ValueError, match="moe.dispatch='kernel' has no expert-parallel exchange"):
        moe_lib.moe_forward(_layer_params(), jnp.ones((8, 2, 16)), moe=moe, train=False, parallel=par)


def test_train_steps_equal_single_device():
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10))
    step = functools.partial(train_lib.train_step, model_cfg=CFG, optimizer=optimizer)
    state = train_lib.init_state(jax.random.key(0), CFG, optimizer)
    par = parallel.ParallelConfig(parallel.make_mesh(2, 2, 2))
    specs = parallel.param_specs(jax.eval_shape(lambda: state), par)
    state_sharded = jax.device_put(state, parallel.shardings(specs, par.mesh))
    single = jax.jit(step)
    sharded = jax.jit(functools.partial(step, parallel=par))
    for i in range(3):
        batch = _batch(seed=10 + i)
        state, metrics = single(state, batch, jax.random.key(1))
        state_sharded, metrics_sharded = sharded(state_sharded, parallel.device_put_batch(batch, par),
                                                 jax.random.key(1))
        np.testing.assert_allclose(metrics_sharded["loss"], metrics["loss"], rtol=1e-5)
    # atol: the key bias has a zero true gradient (softmax ignores it); Adam turns rounding noise
    # there into updates of up to about eps-limited size.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5),
                 state_sharded["params"], state["params"])
    w1 = state_sharded["params"]["block_1"]["moe"]["experts"]["w1"]
    assert w1.addressable_shards[0].data.shape[0] == 8 // par.expert_size  # experts really are split


def test_pyramid_layer_smaller_than_expert_group_is_replicated():
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    params = jax.eval_shape(lambda: model.init_params(jax.random.key(0), CFG))
    specs = parallel.param_specs(params, par)
    assert specs["block_1"]["moe"]["experts"]["w1"][0] == parallel.EXPERT_AXES  # 8 experts over 8 devices
    assert specs["block_3"]["moe"]["experts"]["w1"][0] is None  # 2 experts: replicated


PYRAMID_CFG = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, experts="4x1,8x1"))


@pytest.mark.parametrize("path", ["gather", "dropless"])
def test_pyramid_layer_smaller_than_expert_group_splits_over_its_own_group(path):
    """DeepSpeed's rule on (1, 8, 1): the 4-expert layer is split over a group of 4 devices (one expert
    each, replicated over the 2 groups), the 8-expert layer over all 8; equal to one device."""
    cfg = dataclasses.replace(PYRAMID_CFG, moe=dataclasses.replace(PYRAMID_CFG.moe, dispatch=path,
                                                                   row_exchange_factor=8.0))
    group = parallel.smallest_expert_group(cfg.layer_experts(), 8)
    assert group == 4
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1, expert_group=group))
    params, ref_loss, ref_grads = _reference(cfg)
    specs = parallel.param_specs(params, par)
    assert specs["block_1"]["moe"]["experts"]["w1"] == P("expert", None, None)
    assert specs["block_3"]["moe"]["experts"]["w1"][0] == parallel.EXPERT_AXES
    sharded = jax.device_put(params, parallel.shardings(specs, par.mesh))
    assert sharded["block_1"]["moe"]["experts"]["w1"].addressable_shards[0].data.shape[0] == 1  # 4 / min(8, 4)
    loss, grads = _loss_and_grads(cfg, params, _batch(), par)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads)


def test_clear_errors():
    with pytest.raises(ValueError, match="!= 8 devices"):
        parallel.make_mesh(2, 2, 1)
    with pytest.raises(ValueError, match="only one mesh size may be -1"):
        parallel.make_mesh(-1, -1, 1)
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    bad_experts = dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, experts="12x1,2x1"))
    with pytest.raises(ValueError, match="num_experts=12, not divisible by the expert mesh axis"):
        parallel.validate(bad_experts, par, 16)
    with pytest.raises(ValueError, match="data.batch_size=12 is not divisible"):
        parallel.validate(CFG, par, 12)
    with pytest.raises(ValueError, match="choose one"):
        parallel.ParallelConfig(parallel.make_mesh(1, 4, 2), exchange="coordinated", expert_slicing=True)


def test_hierarchical_exchange_needs_each_expert_group_within_one_host():
    class Device:
        def __init__(self, process_index):
            self.process_index = process_index

    class FakeMesh:  # 2 hosts x 4 devices, as (data, expert_node, expert_replica, expert, tensor)
        def __init__(self, hosts):
            self.devices = np.array([Device(h) for h in hosts], dtype=object).reshape(1, 2, 2, 2, 1)
            self.shape = {"data": 1, "expert_node": 2, "expert_replica": 2, "expert": 2, "tensor": 1}

    for name in ("hierarchical", "node_dedup"):
        parallel._check_expert_axis_within_hosts(FakeMesh([0, 0, 0, 0, 1, 1, 1, 1]), name)  # one host per node
        with pytest.raises(ValueError, match=f"mesh.exchange='{name}' runs its intra-node stage .* puts "
                                             "devices of processes \\[0, 1\\] in one node's group"):
            parallel._check_expert_axis_within_hosts(FakeMesh([0, 1, 0, 1, 0, 1, 0, 1]), name)


def test_a_sharding_that_does_not_divide_is_logged(caplog):
    par = parallel.ParallelConfig(parallel.make_mesh(1, 1, 8))
    params = {"odd": {"mlp": {"w1": jax.ShapeDtypeStruct((4, 12), jnp.float32)}}}  # 12 columns over 8 ranks
    with caplog.at_level("WARNING"):
        specs = parallel.param_specs(params, par)
    assert specs["odd"]["mlp"]["w1"] == P(None, None)
    assert "odd/mlp/w1: dimension 1 (size 12) does not divide" in caplog.text
