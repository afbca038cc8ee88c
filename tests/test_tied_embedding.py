"""The tied embedding on a batch-sharded mesh (moe_jax.tied_embedding): the lookup's and the
logits' gradients meet on each device and are reduced once, with the plain model's values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import load_config_file
from moe_jax import config as config_lib
from moe_jax import cost, parallel, run_config
from moe_jax import model as model_lib


def _reduced_bytes(config, mesh_shape) -> int:
    """The bytes a step must all-reduce: per device, every parameter shard replicated over a batch
    axis of the mesh (its gradient is summed over those copies), float32."""
    config = config.copy_and_resolve_references()
    config.mesh.update(data=mesh_shape[0], expert=mesh_shape[1], tensor=mesh_shape[2])
    par = run_config.parallel_config(config)  # the trainer's mesh (DeepSpeed's Pyramid rule included)
    params = jax.eval_shape(lambda: model_lib.init_params(jax.random.key(0), run_config.model_config(config)))
    specs = parallel.param_specs(params, par)
    total = 0
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    for leaf, spec in zip(jax.tree.leaves(params), spec_leaves):
        used = {axis for entry in spec for axis in (entry if isinstance(entry, tuple) else (entry,)) if axis}
        if any(par.mesh.shape[a] > 1 for a in parallel.BATCH_AXES if a not in used):
            split = [math.prod(par.mesh.shape[a] for a in (e if isinstance(e, tuple) else (e,)) if a) if e else 1
                     for e in spec] + [1] * (leaf.ndim - len(spec))
            total += math.prod(d // s for d, s in zip(leaf.shape, split)) * 4
    return total


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), pytest.param((8, 1, 1), marks=pytest.mark.slow)])
def test_the_step_all_reduces_each_replicated_parameter_once(mesh_shape):
    """Tiny PR-MoE, optimizer not sharded: the compiled step's all-reduce bytes are the replicated
    parameters' (and the replicated expert shards of the 4-expert layers) plus a few statistics:
    the embedding's [V, M] gradient is in them once, not twice."""
    config = load_config_file("pr_moe", "tiny")
    config.mesh.shard_optimizer = False
    record = cost.train_step_cost(config, mesh_shape)
    want = _reduced_bytes(config, mesh_shape)
    model_cfg = run_config.model_config(config)
    embedding = model_cfg.vocab_size * model_cfg.hidden_size * 4
    extra = record.collective_bytes("all-reduce") - want
    assert 0 <= extra < 4096, f"all-reduced {extra} bytes beyond the replicated parameters (embedding {embedding})"


def test_values_and_gradients_equal_the_plain_embedding():
    """On (8, 1, 1) the per-device copies give the single-device model's logits and gradients."""
    cfg = config_lib.preset("tiny").replace(num_layers=2, hidden_size=32, num_heads=2, ffn_size=64, max_seq_len=16)
    params = model_lib.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    par = parallel.ParallelConfig(parallel.make_mesh(8, 1, 1))

    def loss(params, parallel_config):
        logits, _ = model_lib.apply(params, tokens[:, :-1], cfg, parallel=parallel_config)
        return model_lib.lm_loss(logits, tokens[:, 1:]), logits

    (plain, plain_logits), plain_grads = jax.value_and_grad(loss, has_aux=True)(params, None)
    (tied, tied_logits), tied_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, par)
    np.testing.assert_allclose(tied_logits, plain_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tied, plain, rtol=1e-6)
    np.testing.assert_allclose(tied_grads["wte"], plain_grads["wte"], rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(plain_grads["wte"]).max()) > 0
    for got, want in zip(jax.tree.leaves(tied_grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
