"""Top2-MoE every other layer (the paper's Top2 vs Residual ablation uses 32 experts on 350M).

  python experiments/train.py --config=experiments/configs/top2.py:tiny --workdir=workdirs/top2

tiny: 8 experts, k=2, 300 steps, about 2.5 minutes on 2 CPU cores.
"""
from moe_jax.trainer import default_config

EXPERTS = {"tiny": "8", "350m": "32", "1.3b": "32"}


def get_config(arg: str = "tiny"):
    config = default_config(arg)
    config.moe.experts = EXPERTS[arg]
    config.moe.k = 2
    return config
