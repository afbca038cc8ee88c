"""The ablation suites' specification: every variant (VARIANTS: a config file and its overrides),
the suites that group them (SUITES) and the paper's claims they test (CLAIMS). experiments/ablations.py
runs them; experiments/ablation_report.py writes the tables and plots. A new ablation is a row of
VARIANTS, its suite and its claim here."""

import dataclasses
from typing import Any, Mapping, Optional

from experiments.configs import load_config_file


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ablation run: get_config(--scale) of experiments/configs/<config>.py, then `overrides`
    (dotted config fields). A student (kd set) trains with kd.schedule=kd against the TEACHER
    variant's run, or on its own with kd="none"."""

    config: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kd: Optional[str] = None
    shares_runs_of: Optional[str] = None  # the MoS teacher is the PR-MoE run
    step_fraction: float = 1.0  # of the scale's steps (an upcycled run and its dense start share them)
    init_from: Optional[str] = None  # a variant whose finished run of the same seed seeds this one (upcycling)
    grow: Optional[tuple[float, float]] = None  # (depth, width) factors on the scale's model: a ladder rung
    max_seeds: Optional[int] = None  # at most this many seeds whatever --seeds says (the ladder's 3)


VARIANTS = {
    "dense": Variant("dense"),
    "moe": Variant("moe"),
    "first_half": Variant("first_half"),
    # no token dropped in the first layers (the no-capacity grouped-matmul path, nothing computed for
    # empty capacity slots): isolates what dropping costs First-Half MoE
    "first_half_no_drop": Variant("first_half", overrides={"moe.drop_tokens": False, "moe.dispatch": "dropless"}),
    "second_half": Variant("second_half"),
    "top2": Variant("top2"),
    "residual": Variant("residual"),
    "moe_2x": Variant("moe", overrides={"moe.experts": "16"}),  # twice moe.py's 8 experts
    "pyramid": Variant("pyramid"),
    "pr_moe": Variant("pr_moe"),
    "teacher": Variant("pr_moe", shares_runs_of="pr_moe"),
    "student_no_kd": Variant("mos", kd="none"),
    "student_full_kd": Variant("mos", kd="constant"),
    "student_staged_kd": Variant("mos", kd="staged"),
    # routing: aux-loss-free balancing (no aux loss; the bias rate of DeepSeek-V3 is 1e-3 over 14T
    # tokens, 1e-2 lets a 300-step run move its biases), expert-choice at one expert per token on
    # average (capacity factor 1), and upcycling: half the steps dense, half PR-MoE from it
    "top1_loss_free": Variant("moe", overrides={"moe.aux_loss_coef": 0.0, "moe.bias_update_rate": 0.01}),
    "expert_choice": Variant("moe", overrides={"moe.router": "expert_choice", "moe.use_rts": False}),
    "dense_half": Variant("dense", step_fraction=0.5),
    "pr_moe_upcycled": Variant("pr_moe", step_fraction=0.5, init_from="dense_half"),
    # the dense ladder of the compute multiplier: about 2x, 4x and 8x the dense model's training FLOPs
    # per token, grown as 350M -> 1.3B -> 6.7B grow (width first, then width and depth), same tokens
    "dense_x2": Variant("dense", grow=(1.0, 1.4375), max_seeds=3),
    "dense_x4": Variant("dense", grow=(1.0, 2.0), max_seeds=3),
    "dense_x8": Variant("dense", grow=(1.5, 2.25), max_seeds=3),
    # top-1 MoE toward the paper's 128 experts (moe_2x is E=16)
    "moe_e32": Variant("moe", overrides={"moe.experts": "32"}, max_seeds=3),
    "moe_e64": Variant("moe", overrides={"moe.experts": "64"}, max_seeds=3),
    # today's designs beside the paper's, at the top-1 MoE's active compute (the `modern` suite):
    # DeepSeekMoE's shared + fine-grained experts, then DeepSeek-V3's sigmoid router with loss-free
    # balancing and no token dropped
    "shared_fine": Variant("shared_fine", max_seeds=5),
    "sigmoid_bias": Variant("shared_fine", overrides={
        "moe.router": "sigmoid", "moe.bias_update_rate": 0.01, "moe.aux_loss_coef": 0.0,
        "moe.drop_tokens": False, "moe.dispatch": "dropless"}, max_seeds=5),
}
LADDER = ["dense", "dense_x2", "dense_x4", "dense_x8"]
TEACHER = "teacher"
SUITES = {
    "placement": ["dense", "moe", "first_half", "second_half", "first_half_no_drop"],
    "top2_vs_residual": ["moe", "top2", "residual"],
    "pyramid": ["moe", "moe_2x", "pyramid", "pr_moe"],
    "mos": ["teacher", "student_no_kd", "student_full_kd", "student_staged_kd"],
    "routing": ["moe", "top1_loss_free", "top2", "expert_choice", "dense_half", "pr_moe_upcycled", "pr_moe"],
    "ladder": LADDER,
    "experts": ["moe", "moe_2x", "moe_e32", "moe_e64"],
    "modern": ["moe", "residual", "shared_fine", "sigmoid_bias"],
}
SUITES["all"] = list(dict.fromkeys(v for suite in SUITES.values() for v in suite))
SCALES = ["micro", "tiny", "small"]  # config arguments (moe_jax.run_config.SCALES)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A finding of the paper about final validation loss: variant `a` beats `b` (margin 0), or
    `a` is worse than `b` by at most `margin` nats (a parity claim: "nearly matches"). The paired
    difference loss_a - loss_b is judged against `margin` (paired_stats.verdict)."""

    suite: str
    a: str
    b: str
    text: str
    margin: float = 0.0


# The paper's loss claims (Rajbhandari et al. 2022): MoE beats its dense base and matches a dense model
# of about 5x its training compute (section 3); Second-Half MoE beats First-Half MoE, Residual-MoE
# matches Top2-MoE in quality, PR-MoE-32/64 nearly matches MoE-128 (a loss gap of about 0.01) with
# about 3x fewer parameters (section 4.1); the Mixture-of-Students student, 12.5% shallower, keeps
# 99.1-99.5% of its teacher's quality with staged KD, and both no KD and KD throughout do worse
# (section 4.2). Parity margins: the gap of about 0.01 for PR-MoE, used for Residual vs Top2 too;
# the MoS student's 99% of its teacher's quality, about 1% of a tiny model's loss (0.025 nats).
# Residual's "> 10% faster" is a step-time claim: see experiments/bench_step_time.py.
CLAIMS = [
    Claim("placement", "moe", "dense", "MoE beats its dense base"),
    Claim("placement", "second_half", "first_half", "Second-Half MoE beats First-Half MoE"),
    Claim("placement", "first_half_no_drop", "first_half", "diagnosis, not a paper claim: First-Half MoE does "
          "better without dropping"),
    Claim("top2_vs_residual", "residual", "top2", "Residual-MoE matches Top2-MoE (within 0.01 nats)", 0.01),
    Claim("pyramid", "pr_moe", "moe", "PR-MoE nearly matches MoE (within 0.01 nats)", 0.01),
    Claim("mos", "student_staged_kd", "student_no_kd", "staged KD beats no KD"),
    Claim("mos", "student_staged_kd", "student_full_kd", "staged KD beats KD throughout"),
    Claim("mos", "student_staged_kd", "teacher", "the staged-KD student keeps the teacher's quality "
          "(within 0.025 nats)", 0.025),
    # beyond the paper: what the newer routers' papers report
    Claim("routing", "top1_loss_free", "moe", "aux-loss-free balancing matches the aux loss (within 0.01 nats; "
          "DeepSeek-V3 reports it better)", 0.01),
    Claim("routing", "expert_choice", "moe", "expert-choice routing beats top-1 (Zhou et al., 2022)"),
    Claim("routing", "top2", "moe", "top-2 beats top-1"),
    Claim("routing", "pr_moe_upcycled", "pr_moe", "PR-MoE upcycled from a dense run beats PR-MoE from scratch at "
          "equal total steps (Komatsuzaki et al., 2022)"),
]


def variant_config(variant: str, scale: str, seed: int, data_path: str, steps: int):
    """The run config of a variant: the scale's steps (or `steps`), logged 30 times, evaluated and
    checkpointed 10 times, so every variant's curve has the same points."""
    spec = VARIANTS[variant]
    config = load_config_file(spec.config, scale)
    for name, value in spec.overrides.items():
        *groups, field = name.split(".")
        group = config
        for part in groups:
            group = group[part]
        group[field] = value
    if spec.kd not in (None, "none"):
        config.kd.schedule = spec.kd
    if spec.grow is not None:
        depth, width = spec.grow
        heads = config.model.num_heads
        hidden = config.model.hidden_size
        config.model.num_layers = max(1, round(config.model.num_layers * depth))
        config.model.hidden_size = max(2 * heads, round(hidden * width / (2 * heads)) * 2 * heads)
        config.model.ffn_size = round(config.model.ffn_size * config.model.hidden_size / hidden)
    if steps:
        config.total_steps = steps
    if spec.step_fraction != 1.0:
        config.total_steps = max(1, round(config.total_steps * spec.step_fraction))
    config.log_every_steps = max(1, config.total_steps // 30)
    config.eval_every_steps = max(1, config.total_steps // 10)
    config.checkpoint_every_steps = config.eval_every_steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, config.total_steps // 10))
    config.seed = seed
    config.data.path = data_path
    return config


def suite_variants(suite: str, only: list) -> list:
    """The suite's variants, or those of `only` (which must belong to it), in the suite's order."""
    unknown = [v for v in only if v not in SUITES[suite]]
    if unknown:
        raise ValueError(f"--variants={','.join(only)}: {unknown} not in suite {suite!r}; use some of "
                         f"{SUITES[suite]}")
    return [v for v in SUITES[suite] if not only or v in only]
