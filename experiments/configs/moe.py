"""Top-1 MoE every other layer (the paper's 350M+MoE-128 and 1.3B+MoE-128; 8 experts at tiny).

  python experiments/train.py --config=experiments/configs/moe.py:tiny --workdir=workdirs/moe
"""
from moe_jax.run_config import default_config

# The models of moe_jax.config.PRESETS per scale (micro and small: the tiny one at their size).
PRESETS = {"tiny": "tiny+moe", "350m": "350m+moe-128", "1.3b": "1.3b+moe-128"}
LEARNING_RATES = {"350m": (2e-4, 2e-6), "1.3b": (1.2e-4, 1e-6)}  # the paper's MoE learning rates


def get_config(arg: str = "tiny"):
    config = default_config(arg, PRESETS)
    if arg in LEARNING_RATES:
        config.optim.learning_rate, config.optim.min_learning_rate = LEARNING_RATES[arg]
    return config
