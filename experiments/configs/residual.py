"""Residual-MoE every other layer: a dense MLP plus one routed expert, mixed per token.

  python experiments/train.py --config=experiments/configs/residual.py:tiny --workdir=workdirs/residual

The paper finds it as good as Top2-MoE and over 10% faster per step. tiny: 8 experts, 300 steps,
about 2 minutes on 2 CPU cores.
"""
from experiments.configs import moe
from moe_jax.run_config import default_config

EXPERTS = {"350m": "32", "1.3b": "32"}  # the paper's Top2 vs Residual ablation; other scales: moe.py's


def get_config(arg: str = "tiny"):
    config = default_config(arg, moe.PRESETS)
    config.moe.experts = EXPERTS.get(arg, config.moe.experts)
    config.moe.residual = True
    return config
