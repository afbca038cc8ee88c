"""Router gradient diagnostics: does the balance loss pull the gate against the language model?

At each evaluation the trainer computes, for one fixed batch routed as in training (fixed key), the
gradient of the language-model loss (cross-entropy) and of the balance term (aux_loss_coef x the
summed aux losses) on every MoE layer's gate kernel, and logs per layer:

  router_grad/layer<i>/cosine        cosine of the two gradients: near -1 the balance loss undoes
                                    what the language model asks of the router (collapse pressure
                                    fought by the aux loss); near 0 they act on different directions
  router_grad/layer<i>/lm_norm       |grad of the LM loss| on the gate
  router_grad/layer<i>/balance_norm  |grad of the balance term| on the gate

beside the layer's router entropy and expert load, which the training records already hold
(moe/layer<i>/router_entropy, moe/layer<i>/expert_counts). Router collapse shows as the entropy
falling while the balance gradient grows against the LM gradient. Two backward passes of one batch
per evaluation; config.router_diagnostics=False turns it off.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import model as model_lib
from moe_jax.config import ModelConfig
from moe_jax.parallel import ParallelConfig


def gate_kernels(params: dict, model_cfg: ModelConfig) -> dict:
    """{"<layer>": the layer's gate kernel [M, E]} of every MoE layer."""
    return {str(i): params[f"block_{i}"]["moe"]["gate"]["kernel"]
            for i, experts in enumerate(model_cfg.layer_experts()) if experts}


def router_gradients(params: dict, batch: dict, model_cfg: ModelConfig, rng: jax.Array, *,
                     parallel: Optional[ParallelConfig] = None, router_state: Optional[dict] = None) -> dict:
    """{"<layer>": {"cosine", "lm_norm", "balance_norm"}} (module docstring); {} for a dense model.
    The batch is routed as in training (train=True, `rng` the 'gating' key); jit it."""
    if model_cfg.moe is None or not any(model_cfg.layer_experts()):
        return {}

    def losses(p):
        logits, aux = model_lib.apply(p, batch["inputs"], model_cfg, router_state=router_state, train=True,
                                      rngs={"gating": rng}, parallel=parallel)
        ce = model_lib.lm_loss(logits, batch["targets"], batch.get("mask"))
        return ce, model_cfg.moe.aux_loss_coef * aux["aux_loss"]

    lm = gate_kernels(jax.grad(lambda p: losses(p)[0])(params), model_cfg)
    balance = gate_kernels(jax.grad(lambda p: losses(p)[1])(params), model_cfg)
    out = {}
    for layer, g_lm in lm.items():
        g_lm, g_bal = g_lm.astype(jnp.float32), balance[layer].astype(jnp.float32)
        lm_norm, bal_norm = jnp.linalg.norm(g_lm), jnp.linalg.norm(g_bal)
        cosine = jnp.sum(g_lm * g_bal) / jnp.maximum(lm_norm * bal_norm, jnp.finfo(jnp.float32).tiny)
        out[layer] = {"cosine": cosine, "lm_norm": lm_norm, "balance_norm": bal_norm}
    return out
