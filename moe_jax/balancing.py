"""Aux-loss-free balancing (DeepSeek-V3, Wang et al. 2024): the routers' per-expert selection bias.

With `MoEConfig.bias_update_rate > 0` every MoE layer keeps a bias b [E] in the model's
`router_state` variable collection (moe_jax.moe.ROUTER_STATE). The router adds it to the gate
logits when choosing experts only; combine weights and the aux loss read the raw logits. After each
training step the bias moves against the load:

    b <- b + rate * sign(mean_e(load) - load)        load [E] = copies routed to each expert

so an overloaded expert becomes less attractive and an idle one more. The load is the layer's
`expert_counts` statistic, which is already the whole batch's (summed over shards under expert
parallelism), so every device applies the same update. The bias is state, not a parameter: the
optimizer never sees it; the train state carries it as `router_state` and checkpoints save it as an
item of its own, so a resumed run continues with exactly the bias it stopped with.

router_state layout: {"block_<i>": {"moe": {"selection_bias": [E] float32}}} for each MoE layer i,
as Flax names the model's variables; {} when the model has no loss-free layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax import model as model_lib
from moe_jax.config import ModelConfig
from moe_jax.moe import ROUTER_STATE


def uses_router_state(cfg: ModelConfig) -> bool:
    return cfg.moe is not None and cfg.moe.bias_update_rate > 0 and any(cfg.layer_experts())


def init_router_state(cfg: ModelConfig) -> dict:
    """The initial router state: zero biases for every MoE layer ({} without loss-free balancing)."""
    if not uses_router_state(cfg):
        return {}
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model_lib.GPT(cfg).init({"params": jax.random.key(0)}, tokens))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes[ROUTER_STATE]))


def update_selection_bias(router_state: dict, moe_layers: dict, rate: float) -> dict:
    """One step of the bias update. moe_layers: {"<i>": stats of MoE layer i} (the training
    metrics' "moe_layers"), whose expert_counts [E] give each layer's load."""
    updated = {}
    for block, tree in router_state.items():
        load = moe_layers[block.removeprefix("block_")]["expert_counts"].astype(jnp.float32)
        bias = tree["moe"]["selection_bias"]
        updated[block] = {"moe": {"selection_bias": bias + rate * jnp.sign(jnp.mean(load) - load)}}
    return updated
