"""Dense GPT baseline (the paper's 350M / 1.3B bases; an 8-layer, 128-wide model at tiny).

  python experiments/train.py --config=experiments/configs/dense.py:tiny --workdir=workdirs/dense

tiny: 300 steps of 16 x 128 byte tokens on the Python stdlib corpus, about 1.5 minutes on 2 CPU
cores; its test loss beside the MoE variants' is in results/ablations_tiny/results.md (the ablation
suite's, with seeds and intervals). 350m / 1.3b: the paper's settings (300B tokens), GPUs.
"""
from moe_jax.run_config import default_config


def get_config(arg: str = "tiny"):
    return default_config(arg)
