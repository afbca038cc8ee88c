"""Shared + fine-grained experts (DeepSeekMoE): one always-on expert and 32 routed experts a quarter
the dense FFN's width, 3 routed per token, every other layer: the tiny MoE's active compute.

  python experiments/train.py --config=experiments/configs/shared_fine.py:tiny --workdir=workdirs/shared_fine

Add --config.moe.router=sigmoid --config.moe.bias_update_rate=0.01 --config.moe.aux_loss_coef=0
--config.moe.drop_tokens=false for DeepSeek-V3's routing on top. tiny only (the paper's scales have
no such preset); about 2-3 minutes on 2 CPU cores.
"""
from moe_jax.run_config import default_config

PRESETS = {"tiny": "tiny+shared-fine"}


def get_config(arg: str = "tiny"):
    if arg not in ("tiny", "micro", "small"):
        raise ValueError(f"shared_fine.py has the tiny preset only (micro and small are its size); got {arg!r}")
    return default_config(arg, PRESETS)
