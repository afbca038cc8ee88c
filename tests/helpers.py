"""What several test modules share: random inputs (never zeros), NumPy references, run files, marks."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]


def random_tokens(n: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    """n uniform token ids below vocab, uint16 as corpora hold them."""
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.uint16)


def make_experts(key, num_experts: int, model_dim: int, ffn_dim: int, dtype=jnp.float32) -> dict:
    """Random experts {w1 [E, M, F], b1 [E, F], w2 [E, F, M], b2 [E, M]} at a unit-variance scale,
    nonzero biases."""
    keys = jax.random.split(key, 4)
    return {
        "w1": (jax.random.normal(keys[0], (num_experts, model_dim, ffn_dim)) / np.sqrt(model_dim)).astype(dtype),
        "b1": (jax.random.normal(keys[1], (num_experts, ffn_dim)) * 0.1).astype(dtype),
        "w2": (jax.random.normal(keys[2], (num_experts, ffn_dim, model_dim)) / np.sqrt(ffn_dim)).astype(dtype),
        "b2": (jax.random.normal(keys[3], (num_experts, model_dim)) * 0.1).astype(dtype),
    }


def moe_layer_params(num_experts: int, model_dim: int, ffn_dim: int, seed: int) -> dict:
    """moe_forward's parameters {gate: {kernel [M, E]}, experts: {...}}: random, nonzero biases."""
    keys = jax.random.split(jax.random.key(seed), 5)
    return {"gate": {"kernel": jax.random.normal(keys[0], (model_dim, num_experts))},
            "experts": {"w1": jax.random.normal(keys[1], (num_experts, model_dim, ffn_dim)) * 0.3,
                        "b1": jax.random.normal(keys[2], (num_experts, ffn_dim)) * 0.1,
                        "w2": jax.random.normal(keys[3], (num_experts, ffn_dim, model_dim)) * 0.3,
                        "b2": jax.random.normal(keys[4], (num_experts, model_dim)) * 0.1}}


def ffn_reference(experts: dict, e: int, x: np.ndarray) -> np.ndarray:
    """Expert e's FFN on x in float64 NumPy: gelu(x W1 + b1) W2 + b2 (the tanh GELU)."""
    w1, b1, w2, b2 = (np.asarray(experts[name][e], np.float64) for name in ("w1", "b1", "w2", "b2"))
    h = x @ w1 + b1
    h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return h @ w2 + b2


def read_metrics(workdir) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged step."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir) -> dict[int, float]:
    """{step: training loss} of a run's logged steps."""
    return {record["step"]: record["loss"] for record in read_metrics(workdir) if "loss" in record}


def check_gradient(loss, params, seed: int = 0, eps: float = 1e-3, rtol: float = 2e-2) -> None:
    """Asserts that jax.grad(loss) at params agrees with a central finite difference along a random
    direction: <grad, d> ~ (loss(p + eps d) - loss(p - eps d)) / (2 eps). Routing decisions are
    piecewise constant: at these fixed random inputs no decision flips within eps, so the difference
    sees the same smooth piece the gradient differentiates."""
    grads = jax.grad(loss)(params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, leaf.shape, leaf.dtype)
                                             for k, leaf in zip(keys, leaves)])
    step = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, params, direction)  # noqa: E731
    numeric = (float(loss(step(1.0))) - float(loss(step(-1.0)))) / (2 * eps)
    analytic = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))))
    assert abs(analytic) > 1e-3, "a zero gradient proves nothing"
    np.testing.assert_allclose(analytic, numeric, rtol=rtol)


def train_on_mesh(model_cfg, optimizer, par, batches, key=2):
    """train_lib.train_step on the mesh `par` from seed 0, one step per batch: (state, [metrics])."""
    from moe_jax import parallel, train_lib

    state = train_lib.init_state(jax.random.key(0), model_cfg, optimizer)
    shardings = parallel.shardings(parallel.state_specs(state, par, optimizer), par.mesh)
    state = jax.device_put(state, shardings)
    step = jax.jit(lambda s, b: train_lib.train_step(s, b, jax.random.key(key), model_cfg=model_cfg,
                                                     optimizer=optimizer, parallel=par),
                   out_shardings=(shardings, None))
    metrics = []
    for batch in batches:
        state, m = step(state, parallel.device_put_batch(batch, par))
        metrics.append(m)
    return state, metrics
