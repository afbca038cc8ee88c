r"""The paper's ablations from one command: trains every variant of a suite with identical data,
steps and seeds, then writes results.json, results.md and validation-loss plots into --workdir.

  python experiments/ablations.py --suite=all --scale=tiny --workdir=workdirs/ablations --seeds=3

Suites (the paper's findings they test; CLAIMS in experiments/ablation_specs.py states each one):
  placement         dense, MoE (every other layer), First-Half MoE, Second-Half MoE
                    (MoE < dense; Second-Half better than First-Half), and First-Half MoE without
                    dropping (a diagnosis: is dropping in the first layers what hurts?)
  top2_vs_residual  Top2-MoE, Residual-MoE, top-1 MoE (Residual about Top2 in loss, faster per step)
  pyramid           MoE, MoE with twice the experts, Pyramid-MoE, PR-MoE (PR-MoE close to MoE with
                    fewer parameters)
  mos               PR-MoE teacher; 12.5%-shallower PR-MoE students with no KD, full KD and staged KD
  routing           routers beyond DeepSpeed's: top-1 with the aux loss, top-1 with aux-loss-free
                    balancing, top-2, expert-choice; and PR-MoE upcycled from a dense run of half
                    the steps against PR-MoE from scratch at equal total steps (dense steps counted)
  all               every variant once
Every variant is a row of VARIANTS (experiments/ablation_specs.py: config file, overrides, KD
schedule); the tables and plots are experiments/ablation_report.py; --scale is the argument
of every config file (moe_jax.run_config.SCALES): micro (a few steps of a toy model: a smoke
test), tiny (300 steps, minutes per variant on 2 CPU cores), small (12 layers x 256, 2000 steps:
hours on CPU).

Statistics. Variants that share a seed share the data order and initialisation keys, so each claim
is judged on the per-seed difference of final validation loss, with a 95% Student-t interval over
the seeds both variants have (experiments/paired_stats.py): "holds", "not resolved" or
"contradicted". The plots show the mean curve over seeds with a band from the lowest to the highest
seed.

Resuming and accumulating. Runs go seed by seed (every variant of seed 0, then seed 1, ...), so an
interrupted suite leaves complete pairs. Each finished (variant, seed) is written to
DIR/<variant>/seed<k>/ablation_run.json and the tables and plots are rewritten at once; rerunning the
same command skips finished runs, resumes a cut-off run from its last checkpoint, and recomputes
the tables. A larger --seeds later adds seeds to the same folder.
"""

import datetime
import functools
import json
import math
import os
import sys
import time
from typing import Optional

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax import host_memory, xla_flags  # noqa: E402

host_memory.reuse_freed_memory()  # before jax starts its threads
xla_flags.add_gpu_overlap_flags()  # collectives overlapped with compute on GPU; before jax starts

from experiments.ablation_report import provenance, write_results  # noqa: E402
from experiments.ablation_specs import SCALES, SUITES, TEACHER, VARIANTS, suite_variants, variant_config  # noqa: E402
from moe_jax import cli, trainer  # noqa: E402

flags.DEFINE_enum("suite", "all", list(SUITES), "Which ablation suite.")
flags.DEFINE_enum("scale", "tiny", SCALES, "Model and run size: the argument of every config file.")
flags.DEFINE_string("workdir", None, "Output folder.")
flags.DEFINE_string("data_path", "", "Corpus (default: the Python standard library's source).")
flags.DEFINE_integer("seeds", 3, "Seeds per variant (0 .. seeds-1); paired statistics need at least 2.")
flags.DEFINE_integer("steps", 0, "Override the scale's step count (0: the scale's).")
flags.DEFINE_string("runs_from", "", "A folder of finished run files (<variant>/seed<k>/ablation_run.json, e.g. "
                    "committed under results/) to take into --workdir before running: those runs are not trained "
                    "again. A run already in --workdir is kept.")
flags.DEFINE_bool("report_only", False, "Write results.json / results.md / plots from the runs already finished "
                  "in --workdir (and --runs_from), training nothing: the state of a suite still running.")
flags.DEFINE_list("variants", [], "Only these variants of the suite (default: all of them); the claims "
                  "between two of them are still judged.")


def read_curve(workdir: str) -> dict:
    steps, loss, val_steps, val_loss, step_times, moe = [], [], [], [], [], None
    with open(os.path.join(workdir, "metrics.jsonl")) as lines:
        for line in lines:
            record = json.loads(line)
            layers: dict = {}  # "moe/<layer>/<stat>" fields of a logged step
            for key, value in record.items():
                if key.startswith("moe/") and key.count("/") == 2:
                    _, layer, stat = key.split("/")
                    layers.setdefault(layer, {})[stat] = value
            moe = layers or moe
            steps.append(record["step"])
            loss.append(record.get("ce_loss", record["loss"]))
            if record.get("val_loss") is not None:
                val_steps.append(record["step"])
                val_loss.append(record["val_loss"])
            if isinstance(record.get("step_time_s"), float) and math.isfinite(record["step_time_s"]):
                step_times.append(record["step_time_s"])
    return {"step": steps, "train_ce": loss, "val_step": val_steps, "val_loss": val_loss, "step_time_s": step_times,
            "routing": _routing_summary(moe)}


def _routing_summary(moe: Optional[dict]) -> Optional[dict]:
    """The last logged routing statistics of a run's MoE layers: load imbalance (max / mean tokens
    per expert, mean over layers), dead experts (no token over the logging window, summed over
    layers), dropped and unrouted fractions (mean over layers). None for a dense model."""
    if not moe:
        return None
    layers = list(moe.values())
    mean = lambda name: sum(layer[name] for layer in layers) / len(layers)  # noqa: E731
    return {"load_imbalance": mean("load_imbalance"), "dead_experts": sum(layer["dead_experts"] for layer in layers),
            "dropped_fraction": mean("dropped_fraction"), "unrouted_fraction": mean("unrouted_fraction")}


RUN_FILE = "ablation_run.json"  # a finished run's summary and curve, in its run folder


def run_dir(workdir: str, variant: str, seed: int) -> str:
    return os.path.join(workdir, VARIANTS[variant].shares_runs_of or variant, f"seed{seed}")


def finished_run(workdir: str, variant: str, seed: int, total_steps: int) -> Optional[dict]:
    """The summary of a (variant, seed) run that reached total_steps, or None."""
    path = os.path.join(run_dir(workdir, variant, seed), RUN_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        summary = json.load(handle)
    if summary.get("steps") != total_steps:
        return None
    if "test_loss" not in summary:  # finished before the test split existed: evaluate it, train nothing
        summary = _add_test_evaluation(run_dir(workdir, variant, seed), summary, path)
    return summary


@functools.lru_cache(maxsize=None)
def _compiled_flops(variant: str, scale: str, data_path: str, steps: int) -> float:
    """Training FLOPs per token of a variant's step, from the compiled step (moe_jax.cost, one
    device, loops multiplied out). A KD student adds its teacher's forward pass (a third of the
    teacher's training FLOPs)."""
    from moe_jax import cost

    config = variant_config(variant, scale, 0, data_path, steps)
    tokens = config.data.batch_size * config.data.seq_len
    flops = cost.train_step_cost(config).flops / tokens
    if VARIANTS[variant].kd not in (None, "none"):
        flops += _compiled_flops(TEACHER, scale, data_path, steps) / 3
    return flops


def _add_test_evaluation(folder: str, summary: dict, path: str) -> dict:
    """The run's summary with its whole-test-split evaluation (trainer.evaluate_run) added; the run
    file rewritten. A run whose checkpoint is gone keeps its summary (it has no test loss)."""
    try:
        evaluated = trainer.evaluate_run(folder)
    except (FileNotFoundError, ValueError) as error:
        logging.warning("no test evaluation for %s: %s", folder, error)
        return summary
    summary = {**summary, **{k: v for k, v in evaluated.items() if k.startswith("test_")},
               "corpus_identity": evaluated["corpus_identity"]}
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        json.dump(summary, out)
    os.replace(tmp, path)
    return summary


def run_variant(variant: str, seed: int, f) -> Optional[dict]:
    """Trains one (variant, seed), resuming from its folder's checkpoint; skipped when finished.
    Returns its summary, or None when the run stopped before total_steps (config.stop_after_steps)."""
    workdir = run_dir(f.workdir, variant, seed)
    config = variant_config(variant, f.scale, seed, f.data_path, f.steps)
    done = finished_run(f.workdir, variant, seed, config.total_steps)
    if done is not None:
        return done
    start = time.perf_counter()
    step_offset = 0
    source = VARIANTS[variant].init_from
    if source is not None:  # e.g. an upcycled PR-MoE starts from its dense run's parameters
        source_steps = variant_config(source, f.scale, seed, f.data_path, f.steps).total_steps
        if finished_run(f.workdir, source, seed, source_steps) is None and run_variant(source, seed, f) is None:
            return None
        config.init_from = run_dir(f.workdir, source, seed)
        step_offset = source_steps
    if VARIANTS[variant].kd not in (None, "none"):
        from moe_jax import distill

        teacher_dir = run_dir(f.workdir, TEACHER, seed)
        teacher_steps = variant_config(TEACHER, f.scale, seed, f.data_path, f.steps).total_steps
        if finished_run(f.workdir, TEACHER, seed, teacher_steps) is None and run_variant(TEACHER, seed, f) is None:
            return None
        summary = distill.distill_and_evaluate(config, workdir, teacher_workdir=teacher_dir)
    else:
        summary = trainer.train_and_evaluate(config, workdir)
    if summary["steps"] < config.total_steps:
        return None
    summary["wall_s"] = time.perf_counter() - start
    summary["seed"] = seed
    summary["step_offset"] = step_offset  # steps of the run it started from (counted in its curve)
    summary["commit"] = provenance()["commit"]  # a suite accumulates across sessions, maybe across commits
    summary["python"], summary["versions"] = provenance()["python"], provenance()["versions"]
    summary["train_flops_per_token"] = _compiled_flops(variant, f.scale, f.data_path, f.steps)
    summary["tokens_seen"] = config.total_steps * config.data.batch_size * config.data.seq_len
    summary["curve"] = read_curve(workdir)
    # the median logged step time: also right for a run resumed after it finished (no new steps)
    times = sorted(summary["curve"]["step_time_s"])
    if times:
        summary["step_time_s"] = times[len(times) // 2]
        summary["tokens_per_sec"] = config.data.batch_size * config.data.seq_len / summary["step_time_s"]
    tmp = os.path.join(workdir, RUN_FILE + ".tmp")
    with open(tmp, "w") as out:
        json.dump(summary, out)
    os.replace(tmp, os.path.join(workdir, RUN_FILE))  # a run is finished only once its file is whole
    return summary


def import_runs(source: str, workdir: str) -> int:
    """Copies every <variant>/seed<k>/RUN_FILE under `source` into `workdir` where that run has no
    file yet; returns how many. Sessions accumulate a long suite this way: finished runs' files are
    committed, and the next session's suite starts from them. `source` may be another suite's
    workdir (its files other than run folders are passed over)."""
    if not os.path.isdir(source):
        cli.fail(f"--runs_from={source} is not a folder of run files (<variant>/seed<k>/{RUN_FILE})")
    taken = 0
    for variant in sorted(os.listdir(source)):
        if not os.path.isdir(os.path.join(source, variant)):  # a suite's own workdir: its tables and plots
            continue
        for seed_dir in sorted(os.listdir(os.path.join(source, variant))):
            path = os.path.join(source, variant, seed_dir, RUN_FILE)
            target = os.path.join(workdir, variant, seed_dir, RUN_FILE)
            if os.path.isfile(path) and not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(path) as src, open(target + ".tmp", "w") as out:
                    out.write(src.read())
                os.replace(target + ".tmp", target)
                taken += 1
    return taken


def run_suite(f) -> Optional[str]:
    """Every (variant, seed) of the suite, seed by seed; the results are rewritten after each
    finished run. Returns the markdown, or None when a run stopped early (rerun to continue)."""
    variants = suite_variants(f.suite, f.variants)
    runs: dict = {variant: {} for variant in variants}
    text = None
    def seeds_of(variant):
        return min(f.seeds, VARIANTS[variant].max_seeds or f.seeds)

    total, done, trained_s, trained = sum(seeds_of(v) for v in variants), 0, 0.0, 0
    if f.report_only:  # what has finished, nothing trained
        for variant in variants:
            for seed in range(seeds_of(variant)):
                steps = variant_config(variant, f.scale, seed, f.data_path, f.steps).total_steps
                summary = finished_run(f.workdir, variant, seed, steps)
                if summary is not None:
                    runs[variant][seed] = summary
        runs = {variant: by_seed for variant, by_seed in runs.items() if by_seed}
        if not runs:
            cli.fail(f"no finished run of suite {f.suite!r} in {f.workdir}")
        done = sum(len(by_seed) for by_seed in runs.values())
        print(f"{done} of {total} runs finished", flush=True)
        return write_results(runs, f, [v for v in variants if v in runs])
    for seed in range(f.seeds):
        for variant in variants:
            if seed >= seeds_of(variant):
                continue
            print(f"== {variant} seed {seed}", flush=True)
            start = time.perf_counter()
            try:
                summary = run_variant(variant, seed, f)
            except (ValueError, trainer.TrainingError) as error:
                cli.fail(f"{variant} seed {seed}: {error}")
            if summary is None:
                print(f"{variant} seed {seed} stopped before its last step; rerun the same command to continue")
                return None
            runs[variant][seed] = summary
            text = write_results(runs, f, variants)
            done += 1
            seconds = time.perf_counter() - start
            if seconds > 2:  # trained (or evaluated) here, not read back from a finished run
                trained_s, trained = trained_s + seconds, trained + 1
            print(progress_line(variant, seed, summary, seconds, done, total, trained_s / max(trained, 1)), flush=True)
    return text


def progress_line(variant: str, seed: int, summary: dict, seconds: float, done: int, total: int,
                  mean_run_s: float) -> str:
    """'done moe seed 2: test 2.6012  val 2.6235  3.9 min | 12/45 runs, ETA 2:09:00' (the ETA: the
    runs left at the mean time of the runs trained by this process)."""
    test = f"test {summary['test_loss']:.4f}  " if "test_loss" in summary else ""
    eta = datetime.timedelta(seconds=round((total - done) * mean_run_s))
    return (f"done {variant} seed {seed}: {test}val {summary['val_loss']:.4f}  {seconds / 60:.1f} min | "
            f"{done}/{total} runs, ETA {eta}")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required: the folder for the runs, results.json, results.md and plots")
    if f.seeds < 1:
        cli.fail(f"--seeds={f.seeds} must be >= 1")
    logging.set_verbosity(logging.WARNING)
    try:
        suite_variants(f.suite, f.variants)
    except ValueError as error:
        cli.fail(str(error))
    os.makedirs(f.workdir, exist_ok=True)
    if f.runs_from:
        print(f"took {import_runs(f.runs_from, f.workdir)} finished run(s) from {f.runs_from}")
    provenance()  # before anything trains: the commit of the code this process imported
    text = run_suite(f)
    if text is not None:
        print(text)
        print("plots: " + ", ".join(os.path.join(f.workdir, f"{s}.png") for s in SUITES if s != "all"
                                    and (f.suite == "all" or s == f.suite)))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
