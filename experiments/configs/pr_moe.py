"""PR-MoE: Pyramid expert counts plus the Residual dense MLP (the paper's 350M+PR-MoE-32/64 at 4B
parameters, 1.3B+PR-MoE-64/128 at 31B). The README's demo trains this at tiny.

  python experiments/train.py --config=experiments/configs/pr_moe.py:tiny --workdir=workdirs/pr_moe

tiny: 4 experts in MoE layers 2, 4, 6 and 8 in layer 8; 300 steps of 16 x 128 byte tokens on the
Python stdlib corpus, about 2 minutes on 2 CPU cores; how it compares with the dense model and the
other variants, over seeds on the test split: results/ablations_tiny/results.md.
"""
from moe_jax.run_config import default_config

# The models of moe_jax.config.PRESETS per scale (micro and small: the tiny one at their size).
PRESETS = {"tiny": "tiny+pr-moe", "350m": "350m+pr-moe-32/64", "1.3b": "1.3b+pr-moe-64/128"}
LEARNING_RATES = {"350m": (3e-4, 1e-6), "1.3b": (1.2e-4, 1e-6)}  # the paper's


def get_config(arg: str = "tiny"):
    config = default_config(arg, PRESETS)
    if arg in LEARNING_RATES:
        config.optim.learning_rate, config.optim.min_learning_rate = LEARNING_RATES[arg]
    return config
