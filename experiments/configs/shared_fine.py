"""Shared + fine-grained experts (DeepSeekMoE): one always-on expert and routed experts a quarter of
the dense FFN's width, four times as many, 3 routed per token, every other layer: the top-1 MoE's
active compute and total expert parameters.

  python experiments/train.py --config=experiments/configs/shared_fine.py:tiny --workdir=workdirs/shared_fine

tiny: 32 routed experts of FFN 128 (the tiny MoE's 8 x 512; the tiny+shared-fine preset), about
2-3 minutes on 2 CPU cores. 350m / 1.3b: moe.py's MoE-128 cut the same way (512 experts of FFN/4). Add
--config.moe.router=sigmoid --config.moe.bias_update_rate=0.01 --config.moe.aux_loss_coef=0
--config.moe.drop_tokens=false for DeepSeek-V3's routing on top.
"""
from experiments.configs import moe

SEGMENTS = 4  # each expert of moe.py cut into this many; k = SEGMENTS - shared routed experts


def get_config(arg: str = "tiny"):
    """moe.py's config at `arg`, its experts segmented (at tiny: the tiny+shared-fine preset)."""
    config = moe.get_config(arg)
    ffn = config.model.get("ffn_size") or 4 * config.model.hidden_size
    config.moe.experts = str(int(config.moe.experts) * SEGMENTS)
    config.moe.expert_ffn_size = ffn // SEGMENTS
    config.moe.shared_experts = 1
    config.moe.k = SEGMENTS - 1
    return config
