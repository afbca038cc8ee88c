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
Scales: micro (a few steps of a toy model: a smoke test), tiny (the configs' tiny size, 300 steps,
minutes per variant on 2 CPU cores), small (12 layers x 256, 2000 steps: hours on CPU).
Every run resumes from its own folder (DIR/<variant>/seed<k>), so an interrupted suite continues.
"""

import json
import math
import os
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax import cli, trainer  # noqa: E402

SUITES = {
    "placement": ["dense", "moe", "first_half", "second_half"],
    "top2_vs_residual": ["moe", "top2", "residual"],
    "pyramid": ["moe", "moe_2x", "pyramid", "pr_moe"],
    "mos": ["teacher", "student_no_kd", "student_full_kd", "student_staged_kd"],
}
SUITES["all"] = list(dict.fromkeys(v for suite in SUITES.values() for v in suite))
# variant -> config file in experiments/configs
CONFIG_FILES = {"dense": "dense", "moe": "moe", "first_half": "first_half", "second_half": "second_half",
                "top2": "top2", "residual": "residual", "moe_2x": "moe", "pyramid": "pyramid", "pr_moe": "pr_moe",
                "teacher": "pr_moe", "student_no_kd": "mos", "student_full_kd": "mos", "student_staged_kd": "mos"}
KD_SCHEDULES = {"student_no_kd": "none", "student_full_kd": "constant", "student_staged_kd": "staged"}

flags.DEFINE_enum("suite", "all", list(SUITES), "Which ablation suite.")
flags.DEFINE_enum("scale", "tiny", ["micro", "tiny", "small"], "Model and run size.")
flags.DEFINE_string("workdir", None, "Output folder.")
flags.DEFINE_string("data_path", "", "Corpus (default: the Python standard library's source).")
flags.DEFINE_integer("seeds", 1, "Seeds per variant (mean and standard deviation when > 1).")
flags.DEFINE_integer("steps", 0, "Override the scale's step count (0: the scale's).")


def scale_config(config, scale: str, steps: int):
    """Applies the scale: the same shape for every variant (only the MoE part differs)."""
    if scale == "micro":
        config.total_steps = 6
        config.model.update(num_layers=4, hidden_size=32, num_heads=2, ffn_size=64, max_seq_len=32)
        config.data.update(batch_size=8, seq_len=32, max_bytes=1 << 19)
        config.eval_batches = 1
    elif scale == "small":
        config.total_steps = 2000
        config.model.update(num_layers=12, hidden_size=256, num_heads=8, ffn_size=1024, max_seq_len=256)
        config.data.update(batch_size=32, seq_len=256)
        config.eval_batches = 16
    if steps:
        config.total_steps = steps
    config.log_every_steps = max(1, config.total_steps // 30)
    config.eval_every_steps = max(1, config.total_steps // 10)
    config.checkpoint_every_steps = config.eval_every_steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, config.total_steps // 10))
    return config


def _resize_experts(experts: str, num_layers: int, placement: str) -> str:
    """Keeps a pyramid list valid when the scale changes the layer count: the last MoE layers keep
    the large count, the others the small one."""
    counts = [int(c) for part in experts.split(",") for c, n in [part.split("x")] for _ in range(int(n))]
    moe_layers = num_layers // 2 if placement in ("interval", "first_half", "second_half") else len(counts)
    large = max(1, round(moe_layers * counts.count(max(counts)) / len(counts)))
    return f"{min(counts)}x{moe_layers - large},{max(counts)}x{large}" if moe_layers > large else f"{max(counts)}x{large}"


def variant_config(variant: str, scale: str, seed: int, data_path: str, steps: int):
    config = scale_config(trainer.load_config_file(CONFIG_FILES[variant]), scale, steps)
    config.seed = seed
    config.data.path = data_path
    experts = str(config.moe.experts)
    if variant == "moe_2x":
        config.moe.experts = str(2 * int(experts))
    elif "x" in experts and scale != "tiny":
        config.moe.experts = _resize_experts(experts, config.model.num_layers, config.moe.placement)
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
    # the MoS teacher is the PR-MoE variant: one run serves both
    return os.path.join(workdir, "pr_moe" if variant == "teacher" else variant, f"seed{seed}")


def run_variant(variant: str, seed: int, f) -> dict:
    workdir = run_dir(f.workdir, variant, seed)
    config = variant_config(variant, f.scale, seed, f.data_path, f.steps)
    start = time.perf_counter()
    if variant in KD_SCHEDULES:
        config = scale_student(config, f.scale)
    if KD_SCHEDULES.get(variant, "none") != "none":
        from moe_jax import distill

        teacher_dir = run_dir(f.workdir, "teacher", seed)
        if not os.path.exists(os.path.join(teacher_dir, "results.json")):
            run_variant("teacher", seed, f)
        config.kd.schedule = KD_SCHEDULES[variant]
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


def scale_student(config, scale: str):
    """The student is 12.5% shallower than the teacher at every scale (8 -> 7, 4 -> 3 (micro), 12 -> 10 (small))."""
    if scale == "tiny":
        return config
    teacher_layers = config.model.num_layers
    config.model.num_layers = teacher_layers - max(1, round(teacher_layers / 8))
    experts = str(config.moe.experts)
    counts = [int(c) for part in experts.split(",") for c, n in [part.split("x")] for _ in range(int(n))]
    moe_layers = config.model.num_layers // 2
    config.moe.experts = f"{min(counts)}x{moe_layers - 1},{max(counts)}x1" if moe_layers > 1 else f"{max(counts)}x1"
    return config


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
