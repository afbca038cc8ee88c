"""Pyramid-MoE: more experts in the last MoE layers (no residual MLP).

  python experiments/train.py --config=experiments/configs/pyramid.py:tiny --workdir=workdirs/pyramid

350m: 32 experts x 10 layers, 64 x 2; 1.3b: 64 x 10, 128 x 2; tiny: 4 x 3, 8 x 1.
"""
from moe_jax.trainer import default_config

EXPERTS = {"tiny": "4x3,8x1", "350m": "32x10,64x2", "1.3b": "64x10,128x2"}


def get_config(arg: str = "tiny"):
    config = default_config(arg)
    config.moe.experts = EXPERTS[arg]
    return config
