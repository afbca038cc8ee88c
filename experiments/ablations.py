r"""The paper's ablations from one command: trains every variant of a suite with identical data,
steps and seeds, then writes results.json, results.md and validation-loss plots into --workdir.

  python experiments/ablations.py --suite=all --scale=tiny --workdir=workdirs/ablations --seeds=3

Suites (the paper's findings they test, REFERENCE.md):
  placement         dense, MoE (every other layer), First-Half MoE, Second-Half MoE
                    (MoE < dense; Second-Half better than First-Half)
  top2_vs_residual  Top2-MoE, Residual-MoE, top-1 MoE (Residual about Top2 in loss, faster per step)
  pyramid           MoE, MoE with twice the experts, Pyramid-MoE, PR-MoE (PR-MoE close to MoE with
                    fewer parameters)
  mos               PR-MoE teacher; 12.5%-shallower PR-MoE students with no KD, full KD and staged KD
  all               every variant once
Every variant is a row of VARIANTS (config file, overrides, KD schedule); --scale is the argument
of every config file (moe_jax.run_config.SCALES): micro (a few steps of a toy model: a smoke
test), tiny (300 steps, minutes per variant on 2 CPU cores), small (12 layers x 256, 2000 steps:
hours on CPU). Every run resumes from its own folder (DIR/<variant>/seed<k>), so an interrupted
suite continues.
"""

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.configs import load_config_file  # noqa: E402
from moe_jax import cli, trainer  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    """One ablation run: get_config(--scale) of experiments/configs/<config>.py, then `overrides`
    (dotted config fields). A student (kd set) trains with kd.schedule=kd against the TEACHER
    variant's run, or on its own with kd="none"."""

    config: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kd: Optional[str] = None
    shares_runs_of: Optional[str] = None  # the MoS teacher is the PR-MoE run


VARIANTS = {
    "dense": Variant("dense"),
    "moe": Variant("moe"),
    "first_half": Variant("first_half"),
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
}
TEACHER = "teacher"
SUITES = {
    "placement": ["dense", "moe", "first_half", "second_half"],
    "top2_vs_residual": ["moe", "top2", "residual"],
    "pyramid": ["moe", "moe_2x", "pyramid", "pr_moe"],
    "mos": ["teacher", "student_no_kd", "student_full_kd", "student_staged_kd"],
}
SUITES["all"] = list(dict.fromkeys(v for suite in SUITES.values() for v in suite))
SCALES = ["micro", "tiny", "small"]  # config arguments (moe_jax.run_config.SCALES)

flags.DEFINE_enum("suite", "all", list(SUITES), "Which ablation suite.")
flags.DEFINE_enum("scale", "tiny", SCALES, "Model and run size: the argument of every config file.")
flags.DEFINE_string("workdir", None, "Output folder.")
flags.DEFINE_string("data_path", "", "Corpus (default: the Python standard library's source).")
flags.DEFINE_integer("seeds", 1, "Seeds per variant (mean and standard deviation when > 1).")
flags.DEFINE_integer("steps", 0, "Override the scale's step count (0: the scale's).")


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
    if steps:
        config.total_steps = steps
    config.log_every_steps = max(1, config.total_steps // 30)
    config.eval_every_steps = max(1, config.total_steps // 10)
    config.checkpoint_every_steps = config.eval_every_steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, config.total_steps // 10))
    config.seed = seed
    config.data.path = data_path
    return config


def read_curve(workdir: str) -> dict:
    steps, loss, val_steps, val_loss, step_times = [], [], [], [], []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            steps.append(record["step"])
            loss.append(record.get("ce_loss", record["loss"]))
            if record.get("val_loss") is not None:
                val_steps.append(record["step"])
                val_loss.append(record["val_loss"])
            if isinstance(record.get("step_time_s"), float) and math.isfinite(record["step_time_s"]):
                step_times.append(record["step_time_s"])
    return {"step": steps, "train_ce": loss, "val_step": val_steps, "val_loss": val_loss, "step_time_s": step_times}


def run_dir(workdir: str, variant: str, seed: int) -> str:
    return os.path.join(workdir, VARIANTS[variant].shares_runs_of or variant, f"seed{seed}")


def run_variant(variant: str, seed: int, f) -> dict:
    workdir = run_dir(f.workdir, variant, seed)
    config = variant_config(variant, f.scale, seed, f.data_path, f.steps)
    start = time.perf_counter()
    if VARIANTS[variant].kd not in (None, "none"):
        from moe_jax import distill

        teacher_dir = run_dir(f.workdir, TEACHER, seed)
        if not os.path.exists(os.path.join(teacher_dir, "results.json")):
            run_variant(TEACHER, seed, f)
        summary = distill.distill_and_evaluate(config, workdir, teacher_workdir=teacher_dir)
    else:
        summary = trainer.train_and_evaluate(config, workdir)
    summary["wall_s"] = time.perf_counter() - start
    summary["curve"] = read_curve(workdir)
    # the median logged step time: also right for a run resumed after it finished (no new steps)
    times = sorted(summary["curve"]["step_time_s"])
    if times:
        summary["step_time_s"] = times[len(times) // 2]
        summary["tokens_per_sec"] = config.data.batch_size * config.data.seq_len / summary["step_time_s"]
    return summary


def _mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(runs: dict) -> dict:
    table = {}
    for variant, seeds in runs.items():
        first = seeds[0]
        loss_mean, loss_std = _mean_std([s["val_loss"] for s in seeds])
        bpb_mean, bpb_std = _mean_std([s["val_bpb"] for s in seeds])
        table[variant] = {
            "params_total": first["params_total"], "params_active": first["params_active"],
            "steps": first["steps"], "val_loss": loss_mean, "val_loss_std": loss_std, "val_bpb": bpb_mean,
            "val_bpb_std": bpb_std, "step_time_s": _mean_std([s["step_time_s"] for s in seeds])[0],
            "tokens_per_sec": _mean_std([s["tokens_per_sec"] for s in seeds])[0],
            "seeds": len(seeds), "curves": [s["curve"] for s in seeds],
        }
    return table


def markdown(table: dict, suite: str, scale: str, tokens_per_step: int) -> str:
    steps = {row["steps"] for row in table.values()}
    lines = [f"Suite `{suite}`, scale `{scale}`: every variant trained for {'/'.join(map(str, sorted(steps)))} "
             f"steps of {tokens_per_step} tokens (equal steps and tokens), same data order and seeds.\n",
             "| variant | params total | active | val loss | val bits/byte | step ms | tokens/s | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, r in table.items():
        pm = f" ± {r['val_loss_std']:.4f}" if r["seeds"] > 1 else ""
        lines.append(f"| {variant} | {r['params_total']:,} | {r['params_active']:,} | {r['val_loss']:.4f}{pm} | "
                     f"{r['val_bpb']:.4f} | {1e3 * r['step_time_s']:.0f} | {r['tokens_per_sec']:.0f} | {r['seeds']} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, suites: dict, workdir: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for suite, variants in suites.items():
        present = [v for v in variants if v in table]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in present:
            curves = table[variant]["curves"]
            steps = curves[0]["val_step"]
            n = min(len(c["val_loss"]) for c in curves)
            mean = [sum(c["val_loss"][i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(steps[:n], mean, marker="o", markersize=3, label=variant)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{suite}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(workdir, f"{suite}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required: the folder for the runs, results.json, results.md and plots")
    if f.seeds < 1:
        cli.fail(f"--seeds={f.seeds} must be >= 1")
    logging.set_verbosity(logging.WARNING)
    os.makedirs(f.workdir, exist_ok=True)
    variants = SUITES[f.suite]
    runs = {}
    for variant in variants:
        for seed in range(f.seeds):
            print(f"== {variant} seed {seed}", flush=True)
            try:
                runs.setdefault(variant, []).append(run_variant(variant, seed, f))
            except (ValueError, trainer.TrainingError) as error:
                cli.fail(f"{variant} seed {seed}: {error}")
    table = summarise(runs)
    config = variant_config(variants[0], f.scale, 0, f.data_path, f.steps)
    text = markdown(table, f.suite, f.scale, config.data.batch_size * config.data.seq_len)
    suites = {name: vs for name, vs in SUITES.items() if name != "all"} if f.suite == "all" else {f.suite: variants}
    plots = plot(table, suites, f.workdir)
    with open(os.path.join(f.workdir, "results.json"), "w") as out:
        json.dump({"suite": f.suite, "scale": f.scale, "seeds": f.seeds, "variants": table}, out, indent=1)
    with open(os.path.join(f.workdir, "results.md"), "w") as out:
        out.write(text)
    print(text)
    print("plots: " + ", ".join(plots))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
