"""Pyramid-MoE: more experts in the last MoE layers (no residual MLP).

  python experiments/train.py --config=experiments/configs/pyramid.py:tiny --workdir=workdirs/pyramid

350m: 32 experts x 10 layers, 64 x 2; 1.3b: 64 x 10, 128 x 2; tiny: 4 x 3, 8 x 1.
"""
from experiments.configs import pr_moe
from moe_jax.run_config import default_config


def get_config(arg: str = "tiny"):
    config = default_config(arg, pr_moe.PRESETS)  # PR-MoE's expert lists without the residual MLP
    config.moe.residual = False
    return config
