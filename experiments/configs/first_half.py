"""First-Half MoE: every layer of the first half is MoE (as many MoE layers as every-other placement).

  python experiments/train.py --config=experiments/configs/first_half.py:tiny --workdir=workdirs/first_half

The paper finds Second-Half MoE better than First-Half MoE. tiny: 8 experts, 300 steps, about
2 minutes on 2 CPU cores.
"""
from experiments.configs import moe
from moe_jax.run_config import default_config


def get_config(arg: str = "tiny"):
    config = default_config(arg, moe.PRESETS)  # the experts of moe.py, placed in one half
    config.moe.placement = "first_half"
    return config
