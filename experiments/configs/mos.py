"""Mixture-of-Students: a shallower PR-MoE student distilled from a trained PR-MoE teacher with
staged knowledge distillation (KD on for the first 70% of the steps, then LM loss only).

  # 1. the teacher (the tiny PR-MoE: 8 layers, "4x3,8x1", residual)
  python experiments/train.py --config=experiments/configs/pr_moe.py:tiny --workdir=workdirs/pr_moe
  # 2. the student (7 layers, "4x2,8x1"), distilled from it
  python experiments/distill.py --config=experiments/configs/mos.py:tiny --teacher_workdir=workdirs/pr_moe \
      --workdir=workdirs/mos
  # variants: KD throughout (--config.kd.schedule=constant), a linear fade of the KD weight
  # (--config.kd.schedule=linear_fade), no KD (experiments/train.py with this config: kd is not read),
  # student layers copied from the teacher (--config.kd.init_from_teacher_layers=0,1,2,3,4,7,6)

Students: pr_moe.py's run at the same scale with its model made 12.5% shallower by
moe_jax.distill.student_config (layers dropped from the lower-expert group, as 24 -> 21 in the
paper): tiny: 7 layers, 4 x 2, 8 x 1; 350m: 21 layers, 32 x 8, 64 x 2; 1.3b: 21 layers, 64 x 8,
128 x 2 (the presets tiny-mos, 350m-mos, 1.3b-mos); micro: 3 layers, 8 x 1; small: 10 layers,
4 x 3, 8 x 2. kd.stop_step follows total_steps (70% of it) unless set. KD: beta = 1, T = 1 as in
the paper's scripts.

tiny: 300 steps of 16 x 128 byte tokens on the Python stdlib corpus, each run 3-6 minutes on 2
shared CPU cores (while KD is on a step also runs the teacher's forward pass: ~40% more compute).
Measured validation loss (nats/token) after 300 steps, teacher 2.642 (seed 0); student seeds 0 / 1:
no KD 2.647 / 2.623, KD throughout 2.614 / 2.592, staged KD (stop 210) 2.604 / 2.573, linear fade
2.613 (seed 0). Seed-to-seed spread is ~0.025, so expect staged < constant < no KD by ~0.01-0.05,
the 7-layer student about level with the 8-layer teacher.
"""
from experiments.configs import pr_moe
from moe_jax import distill, run_config


def student_layers(teacher_layers: int) -> int:
    """12.5% shallower than the teacher, at least one layer less: 24 -> 21 (the paper), 8 -> 7."""
    return teacher_layers - max(1, round(teacher_layers / 8))


def get_config(arg: str = "tiny"):
    config = pr_moe.get_config(arg)  # the teacher's run, learning rates included
    teacher = run_config.model_config(config)
    run_config.set_model(config, distill.student_config(teacher, student_layers(teacher.num_layers)))
    config.kd = dict(
        beta=1.0,
        temperature=1.0,
        schedule="staged",  # "constant" | "staged" | "linear_fade" (moe_jax/distill.py)
        # The paper stops KD at 400K of ~570K steps; a reference, so --config.total_steps moves it too.
        stop_step=config.get_ref("total_steps") * 7 // 10,
        init_from_teacher_layers="",  # "": random init (the paper); else one teacher layer per student layer
    )
    return config
