"""Sharded optimizer state (ZeRO-1, parallel.shard_optimizer): the layout, training equal to the
replicated optimizer, the memory it saves in the compiled step, and checkpoints across meshes."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import config, parallel, train_lib, trainer
from tests.helpers import losses, train_on_mesh

CFG = config.ModelConfig(vocab_size=32, num_layers=4, hidden_size=16, num_heads=2, ffn_size=32, max_seq_len=16,
                         moe=config.MoEConfig(experts="4x1,8x1", drop_tokens=False, use_rts=False))
MESHES = [(8, 1, 1), (2, 2, 2), (1, 8, 1)]
OPTIMIZER = train_lib.make_optimizer(train_lib.OptimConfig(warmup_steps=1, total_steps=10))


def _par(mesh, zero):
    return parallel.ParallelConfig(parallel.make_mesh(*mesh), shard_optimizer=zero)


def _axes(spec):
    return {a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))}


def test_each_moment_is_split_over_the_batch_axes_its_gradient_is_reduced_over():
    par = _par((2, 2, 2), True)
    params = jax.eval_shape(lambda: train_lib.init_state(jax.random.key(0), CFG, OPTIMIZER)["params"])
    specs = parallel.param_specs(params, par)
    zero = parallel.optimizer_specs(params, par)
    names = {jax.tree_util.keystr(path): (leaf.shape, s, z) for (path, leaf), s, z in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
        jax.tree.leaves(zero, is_leaf=lambda x: isinstance(x, P)))}
    active = {a for a in parallel.BATCH_AXES if par.mesh.shape[a] > 1}
    for name, (shape, spec, zspec) in names.items():
        assert _axes(spec) <= _axes(zspec)
        added = _axes(zspec) - _axes(spec)
        shards = math.prod(par.mesh.shape[a] for a in _axes(zspec))
        assert math.prod(shape) % shards == 0, name
        if "experts" in name:  # 8-expert layers: split over the expert axes; data is what is left
            assert added <= {"data"} | (active - _axes(spec)), name
        elif all(d % math.prod(par.mesh.shape[a] for a in active) for d in shape):
            assert added <= active, name  # a vector too short for every axis: data alone, or nothing
        else:
            assert added == active - _axes(spec), name
    wte = names["['wte']"]
    assert wte[1] == P("tensor", None) and _axes(wte[2]) == {"tensor", "data", "expert"}
    assert parallel.optimizer_specs(params, _par((2, 2, 2), False)) == specs  # off: the parameters' own layout


def _batch(seed):
    keys = jax.random.split(jax.random.key(seed))
    return {"inputs": jax.random.randint(keys[0], (16, 16), 0, 32),
            "targets": jax.random.randint(keys[1], (16, 16), 0, 32)}


def _train(par, num_steps=3):
    state, metrics = train_on_mesh(CFG, OPTIMIZER, par, [_batch(i) for i in range(num_steps)])
    return state, [float(m["loss"]) for m in metrics]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_sharded_optimizer_trains_as_the_replicated_one(mesh):
    """Equal within float32 rounding: the update is elementwise, only the gradient norm's sum runs in
    another order (shards, then across them)."""
    plain, plain_losses = _train(_par(mesh, False))
    zero, zero_losses = _train(_par(mesh, True))
    np.testing.assert_allclose(zero_losses, plain_losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), zero["params"],
                 plain["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), zero["opt_state"],
                 plain["opt_state"])
    # the moments really are split: a replicated matrix's first moment is 1/8 of it on each device
    mu = zero["opt_state"][1][0].mu["block_0"]["attn"]["qkv_kernel"]
    assert mu.addressable_shards[0].data.size * 8 == mu.size
    par = _par(mesh, True)
    jax.tree.map(lambda leaf, spec: assert_layout(leaf, spec, par.mesh), zero["params"],
                 parallel.param_specs(zero["params"], par), is_leaf=lambda x: isinstance(x, P))  # gathered again


def assert_layout(leaf, spec, mesh):
    assert leaf.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), leaf.ndim)


def _state_bytes(state, specs, mesh):
    total = 0
    for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
        total += leaf.size * leaf.dtype.itemsize // math.prod(mesh.shape[a] for a in _axes(spec))
    return total


def _compiled(par):
    state = jax.eval_shape(lambda: train_lib.init_state(jax.random.key(0), CFG, OPTIMIZER))
    specs = parallel.state_specs(state, par, OPTIMIZER)
    shardings = parallel.shardings(specs, par.mesh)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    batch = {k: jax.ShapeDtypeStruct((16, 16), jnp.int32, sharding=parallel.batch_sharding(par))
             for k in ("inputs", "targets")}
    step = jax.jit(lambda s, b: train_lib.train_step(s, b, jax.random.key(2), model_cfg=CFG, optimizer=OPTIMIZER,
                                                     parallel=par),
                   donate_argnums=(0,), out_shardings=(shardings, None))
    return step.lower(state_in, batch).compile(), _state_bytes(state, specs, par.mesh)


@pytest.mark.parametrize("mesh", [(1, 8, 1), pytest.param((2, 2, 2), marks=pytest.mark.slow)],
                         ids=lambda m: "x".join(map(str, m)))
def test_the_compiled_step_holds_a_shard_of_the_moments_and_gathers_the_parameters(mesh):
    from moe_jax import cost

    plain, plain_bytes = _compiled(_par(mesh, False))
    zero, zero_bytes = _compiled(_par(mesh, True))
    saved = plain_bytes - zero_bytes
    assert saved > 0.6 * plain_bytes * 2 / 3 * (1 - 1 / 8)  # most of the moments (2/3 of the state) gone
    # exactly the state's bytes leave the per-device arguments (the batch is the same)
    assert (plain.memory_analysis().argument_size_in_bytes - zero.memory_analysis().argument_size_in_bytes
            == saved)
    gathered = cost.record_of(zero).collective_bytes("all-gather") - cost.record_of(plain).collective_bytes(
        "all-gather")
    state = jax.eval_shape(lambda: train_lib.init_state(jax.random.key(0), CFG, OPTIMIZER))
    par = _par(mesh, True)
    split = [leaf.size * 4 // math.prod(par.mesh.shape[a] for a in _axes(s)) for leaf, s, z in zip(
        jax.tree.leaves(state["params"]), jax.tree.leaves(parallel.param_specs(state["params"], par),
                                                          is_leaf=lambda x: isinstance(x, P)),
        jax.tree.leaves(parallel.optimizer_specs(state["params"], par), is_leaf=lambda x: isinstance(x, P)))
        if z != s]
    assert gathered >= sum(split)  # every parameter updated in shards is gathered whole again


def _micro(steps, mesh):
    from experiments.configs import load_config_file

    c = load_config_file("moe", "tiny")
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps, c.eval_batches = steps, 1, 2, 2, 1
    c.data.batch_size, c.data.seq_len, c.data.max_bytes = 8, 32, 1 << 19
    c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.ffn_size, c.model.max_seq_len = 2, 32, 2, 64, 64
    c.moe.experts, c.moe.drop_tokens, c.moe.use_rts = "8", False, False  # routing independent of the shards
    c.mesh.data, c.mesh.expert, c.mesh.tensor = mesh
    c.routing_probe = False
    return c


def test_a_sharded_checkpoint_resumes_on_another_mesh(tmp_path, caplog):
    whole = _losses_after(tmp_path / "whole", [(8, 1, 1, 4, 0)])
    with caplog.at_level(logging.INFO):
        moved = _losses_after(tmp_path / "moved", [(8, 1, 1, 4, 2), (2, 2, 2, 4, 0)])
    assert any("resumed from" in r.getMessage() and "at step 2" in r.getMessage() for r in caplog.records)
    assert sorted(moved) == sorted(whole) == [1, 2, 3, 4]
    np.testing.assert_allclose([moved[s] for s in (3, 4)], [whole[s] for s in (3, 4)], rtol=2e-5)


def _losses_after(workdir, legs):
    for data, expert, tensor, steps, stop in legs:
        c = _micro(steps, (data, expert, tensor))
        c.stop_after_steps = stop
        trainer.train_and_evaluate(c, str(workdir))
    return losses(workdir)
