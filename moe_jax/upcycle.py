"""Dense-to-MoE upcycling (Komatsuzaki et al., 2022, "Sparse Upcycling"): an MoE model that starts
from a trained dense model instead of from scratch.

`upcycle_params(dense, cfg, rng, noise=...)` maps the parameters of a dense GPT (moe_jax.model with
no MoE layer) onto the MoE (or PR-MoE, Residual-MoE, ...) model of `cfg`:

  * embeddings (wte, wpe), every block's layer norms and attention, and the final norm: copied;
  * a dense block of the MoE model: its MLP copied;
  * an MoE block: every expert starts as that layer's dense FFN; with noise > 0 each expert's copy
    of each weight matrix gets independent Gaussian noise of std noise * std(that matrix), so the
    experts can tell themselves apart from the first step (biases are copied exactly); the gate
    keeps `cfg`'s fresh initialisation (normal, std init_std: small, so the first routing is
    nearly uniform in probability); with Residual-MoE the residual MLP is the dense FFN too and
    its mixing coefficient is freshly initialised.

The dense model must have the same vocabulary, hidden size, heads, layer count, maximum sequence
length, and FFN size equal to the MoE model's expert FFN size; a ValueError names the first
parameter whose shape does not fit. The trainer uses it for `config.init_from` pointing at a dense
run while this run is an MoE model (moe_jax.trainer's start order).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from moe_jax import model as model_lib
from moe_jax.config import ModelConfig
from moe_jax.pytree import path_name

_EXPERT_MATRICES = ("w1", "w2")


def is_dense(params: dict) -> bool:
    """Whether a parameter tree is a dense GPT's (no block has an MoE layer)."""
    return not any(isinstance(block, dict) and "moe" in block for block in params.values())


def _check(name: str, source: Any, shape: tuple, fix: str) -> jax.Array:
    source_shape = tuple(getattr(source, "shape", ()))
    if source_shape != tuple(shape):
        raise ValueError(f"upcycling: the dense model's {name} has shape {source_shape}, this model needs "
                         f"{tuple(shape)}; {fix}")
    return jnp.asarray(source)


def upcycle_params(dense: dict, cfg: ModelConfig, rng: jax.Array, *, noise: float = 0.0) -> dict:
    """The parameters of cfg's MoE model from a dense model's (module docstring). rng draws the
    fresh gates and coefficients (exactly those of `model.init_params(rng, cfg)`) and the noise."""
    if not noise >= 0:
        raise ValueError(f"upcycling noise={noise} must be >= 0 (a fraction of each matrix's std)")
    if not is_dense(dense):
        raise ValueError("upcycling reads a dense model's parameters, but these have MoE layers; to continue an "
                         "MoE run from its own parameters the two models must be the same")
    fix = ("the dense run must have this model's vocab_size, hidden_size, num_heads, num_layers, max_seq_len, and "
           "ffn_size equal to the expert FFN size")
    init_rng, noise_rng = jax.random.split(rng)
    fresh = model_lib.init_params(init_rng, cfg)
    out: dict = {}
    for name, leaf in fresh.items():
        if not name.startswith("block_"):
            if name not in dense:
                raise ValueError(f"upcycling: the dense model has no {name}; {fix}")
            out[name] = jax.tree.map(lambda f, d, n=name: _check(n, d, f.shape, fix).astype(f.dtype), leaf, dense[name])
            continue
        if name not in dense:
            raise ValueError(f"upcycling: the dense model has no {name} (it has fewer layers); {fix}")
        source = dense[name]
        block = {}
        for part, sub in leaf.items():
            if part == "moe":
                block["moe"] = _upcycle_layer(sub, source["mlp"], f"{name}/mlp", jax.random.fold_in(noise_rng,
                                              int(name.removeprefix("block_"))), noise, fix)
            else:
                block[part] = jax.tree_util.tree_map_with_path(
                    lambda path, f, d, p=f"{name}/{part}": _check(
                        p + "/" + path_name(path), d, f.shape, fix).astype(f.dtype),
                    sub, source[part])
        out[name] = block
    return out


def _upcycle_layer(fresh: dict, mlp: dict, where: str, rng: jax.Array, noise: float, fix: str) -> dict:
    layer = dict(fresh)
    experts = {}
    num_experts = fresh["experts"]["w1"].shape[0]
    for i, (weight, target) in enumerate(fresh["experts"].items()):
        source = _check(f"{where}/{weight}", mlp[weight], target.shape[1:], fix).astype(jnp.float32)
        copies = jnp.broadcast_to(source, (num_experts, *source.shape))
        if noise > 0 and weight in _EXPERT_MATRICES:
            std = jnp.std(source)
            copies = copies + noise * std * jax.random.normal(jax.random.fold_in(rng, i), copies.shape, jnp.float32)
        experts[weight] = copies.astype(target.dtype)
    layer["experts"] = experts
    if "residual" in fresh:
        residual_mlp = {weight: _check(f"{where}/{weight}", mlp[weight], target.shape, fix).astype(target.dtype)
                        for weight, target in fresh["residual"]["mlp"].items()}
        layer["residual"] = {**fresh["residual"], "mlp": residual_mlp}
    return layer
