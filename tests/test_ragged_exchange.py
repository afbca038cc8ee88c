"""The rows exchange on jax.lax.ragged_all_to_all (the GPU form of dispatch "dropless" / "serve").

XLA:CPU cannot run ragged_all_to_all, so the numerics are tested with the collective swapped for
an emulation of its documented semantics (offsets, sizes, output offsets) built from all_gather
and all_to_all; everything around it is the shipped code. The emulation is itself checked against
the documentation's example. The GPU form is then lowered for "cuda" on an abstract 8-GPU mesh."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe_jax import config, exchange, parallel, run_config, train_lib
from moe_jax import moe as moe_lib
from tests.helpers import moe_layer_params


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """jax.lax.ragged_all_to_all's semantics (one slice per peer) from collectives XLA:CPU runs:
    receive from peer i its rows operand_i[input_offsets_i[me] : + send_sizes_i[me]] and write them
    at output[output_offsets_i[me] : + recv_sizes[i]]."""
    operands = jax.lax.all_gather(operand, axis_name)  # [n, N, ...]
    their_input = jax.lax.all_to_all(input_offsets, axis_name, 0, 0, tiled=True)  # peer i's offset for me
    their_output = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where i's rows land here
    rows = jnp.arange(output.shape[0])
    result = output
    for peer in range(operands.shape[0]):
        inside = (rows >= their_output[peer]) & (rows < their_output[peer] + recv_sizes[peer])
        source = jnp.clip(their_input[peer] + rows - their_output[peer], 0, operand.shape[0] - 1)
        picked = operands[peer][source]
        mask = inside.reshape((-1,) + (1,) * (output.ndim - 1))
        result = jnp.where(mask, picked, result)
    return result


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(exchange, "_ragged_all_to_all", emulated_ragged_all_to_all)


def test_emulation_reproduces_the_documented_example():
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    args = [jnp.array(a, jnp.int32) for a in (
        [[1, 2, 2], [3, 4, 0]],            # operand
        [[0, 0, 0, 0], [0, 0, 0, 0]],      # output
        [[0, 1], [0, 1]],                  # input_offsets
        [[1, 2], [1, 1]],                  # send_sizes
        [[0, 0], [1, 2]],                  # output_offsets
        [[1, 1], [2, 1]])]                 # recv_sizes

    def body(*a):
        return emulated_ragged_all_to_all(*(x[0] for x in a), axis_name="x")[None]

    result = jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x"))(*args)
    np.testing.assert_array_equal(result, [[1, 3, 0, 0], [2, 2, 4, 0]])


def _layer(path, factor):
    return config.MoEConfig(experts=8, k=2, drop_tokens=False, second_expert_sampling=False, use_rts=False,
                            dispatch=path, row_exchange_factor=factor)


def _run(moe, par, params, x):
    def loss(params, x):
        y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, parallel=par)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"], (y, stats)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("path", ["dropless", "serve"])
@pytest.mark.parametrize("mesh,nodes", [((1, 8, 1), 1), ((2, 2, 2), 1), ((1, 4, 2), 1), ((1, 8, 1), 2)])
def test_ragged_exchange_equals_one_device_forward_and_gradients(emulated, path, mesh, nodes):
    moe = _layer(path, factor=8.0)  # a bound that cannot overflow: the exchange is exact
    params = moe_layer_params(8, 16, 32, 5)
    x = jax.random.normal(jax.random.key(6), (16, 4, 16))
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh, expert_nodes=nodes), row_exchange="ragged")
    assert par.resolved_row_exchange == "ragged"
    (_, (y_ref, _)), grads_ref = _run(moe, None, params, x)
    (_, (y, stats)), grads = _run(moe, par, params, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, grads_ref)
    assert float(stats["overflow_fraction"]) == 0.0 and float(stats["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 4, 2)])
def test_ragged_exchange_equals_bounded_exchange_when_rows_overflow(emulated, mesh):
    """With a bound below the load the two forms drop the same copies: equal outputs, gradients and
    overflow statistics."""
    moe = _layer("dropless", factor=0.5)
    params = moe_layer_params(8, 16, 32, 5)
    x = jax.random.normal(jax.random.key(7), (8, 6, 16))
    results = {}
    for form in ("bounded", "ragged"):
        par = parallel.ParallelConfig(parallel.make_mesh(*mesh), row_exchange=form)
        results[form] = _run(moe, par, params, x)
    (_, (y_b, stats_b)), grads_b = results["bounded"]
    (_, (y_r, stats_r)), grads_r = results["ragged"]
    assert float(stats_b["overflow_fraction"]) > 0  # the bound really binds
    np.testing.assert_allclose(y_r, y_b, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_r, grads_b)
    for name in ("overflow_fraction", "dropped_fraction", "aux_loss"):
        np.testing.assert_allclose(stats_r[name], stats_b[name], rtol=1e-6)


def test_row_exchange_is_chosen_by_platform_and_validated():
    cpu = parallel.make_mesh(1, 8, 1)
    assert parallel.ParallelConfig(cpu).resolved_row_exchange == "bounded"
    assert parallel.ParallelConfig(parallel.abstract_mesh(1, 8, 1)).resolved_row_exchange == "ragged"
    assert parallel.ParallelConfig(cpu, row_exchange="ragged").resolved_row_exchange == "ragged"
    with pytest.raises(ValueError, match="mesh.row_exchange='sparse' is unknown"):
        parallel.ParallelConfig(cpu, row_exchange="sparse")


def _cuda_step_text(dispatch: str) -> str:
    """The tiny PR-MoE train step on an abstract (1, 8, 1) mesh of H200s, lowered for CUDA."""
    run = run_config.default_config("micro", {"micro": "tiny+pr-moe"})
    run.moe.dispatch = dispatch
    model_cfg = run_config.model_config(run)
    optimizer = train_lib.make_optimizer(run_config.optim_config(run))
    par = parallel.ParallelConfig(parallel.abstract_mesh(1, 8, 1, expert_group=4))
    state = train_lib.abstract_state(jax.eval_shape(lambda: jax.random.key(0)), model_cfg, optimizer)
    state_sharding = parallel.shardings(parallel.param_specs(state, par), par.mesh)
    tokens = jax.ShapeDtypeStruct((run.data.batch_size, run.data.seq_len), jnp.int32,
                                  sharding=parallel.batch_sharding(par))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sharding)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=jax.sharding.NamedSharding(par.mesh, P()))
    step = functools.partial(train_lib.train_step, model_cfg=model_cfg, optimizer=optimizer, parallel=par)
    with jax.sharding.use_abstract_mesh(par.mesh):
        lowered = jax.jit(step).trace(state, {"inputs": tokens, "targets": tokens}, key)
        return lowered.lower(lowering_platforms=("cuda",)).as_text(), len(model_cfg.moe_layer_indices())


def test_dropless_train_step_lowers_for_cuda_with_ragged_all_to_all_only():
    text, moe_layers = _cuda_step_text("dropless")
    # per MoE layer: rows there, expert ids there, rows back; the backward pass: rows both ways
    assert text.count("ragged_all_to_all") == 5 * moe_layers
    # no padded all_to_all of rows is left: the only all_to_alls are the backward pass's exchange of
    # the [group] int32 offsets (jax's transpose of ragged_all_to_all; groups of 8 and of 4 here)
    types = _all_to_all_types(text)
    assert types and all(re.fullmatch(r"tensor<\d+xi32>", t) for t in types), types
    gather, _ = _cuda_step_text("gather")  # the capacity path keeps its buffer all_to_all
    assert "ragged_all_to_all" not in gather and any("f32" in t for t in _all_to_all_types(gather))


def _all_to_all_types(text: str) -> set[str]:
    """The result types of the plain stablehlo.all_to_all ops in a StableHLO module."""
    return set(re.findall(r'"stablehlo\.all_to_all"\([^)]*\).*?-> (tensor<[^>]*>)', text))
