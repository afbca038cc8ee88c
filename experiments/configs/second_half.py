"""Second-Half MoE: every layer of the second half is MoE (as many MoE layers as every-other placement).

  python experiments/train.py --config=experiments/configs/second_half.py:tiny --workdir=workdirs/second_half

The paper finds Second-Half MoE better than First-Half MoE. tiny: 8 experts, 300 steps, about
2 minutes on 2 CPU cores.
"""
from moe_jax.trainer import default_config

EXPERTS = {"tiny": "8", "350m": "128", "1.3b": "128"}


def get_config(arg: str = "tiny"):
    config = default_config(arg)
    config.moe.experts = EXPERTS[arg]
    config.moe.placement = "second_half"
    return config
