"""Top-1 MoE every other layer (the paper's 350M+MoE-128 and 1.3B+MoE-128; 8 experts at tiny).

  python experiments/train.py --config=experiments/configs/moe.py:tiny --workdir=workdirs/moe
"""
from moe_jax.trainer import default_config

EXPERTS = {"tiny": "8", "350m": "128", "1.3b": "128"}


def get_config(arg: str = "tiny"):
    config = default_config(arg)
    config.moe.experts = EXPERTS[arg]
    if arg != "tiny":  # the paper's MoE learning rates
        config.optim.learning_rate, config.optim.min_learning_rate = {"350m": (2e-4, 2e-6), "1.3b": (1.2e-4, 1e-6)}[arg]
    return config
