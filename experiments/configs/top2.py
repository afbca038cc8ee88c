"""Top2-MoE every other layer (the paper's Top2 vs Residual ablation uses 32 experts on 350M).

  python experiments/train.py --config=experiments/configs/top2.py:tiny --workdir=workdirs/top2

tiny: 8 experts, k=2, 300 steps, about 2.5 minutes on 2 CPU cores.
"""
from experiments.configs import moe
from moe_jax.run_config import default_config

EXPERTS = {"350m": "32", "1.3b": "32"}  # the paper's ablation; other scales: moe.py's experts


def get_config(arg: str = "tiny"):
    config = default_config(arg, moe.PRESETS)
    config.moe.experts = EXPERTS.get(arg, config.moe.experts)
    config.moe.k = 2
    return config
