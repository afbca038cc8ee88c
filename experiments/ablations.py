r"""The paper's ablations from one command: trains every variant of a suite with identical data,
steps and seeds, then writes results.json, results.md and validation-loss plots into --workdir.

  python experiments/ablations.py --suite=all --scale=tiny --workdir=workdirs/ablations --seeds=3

Suites (the paper's findings they test, REFERENCE.md; CLAIMS states each one):
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
Every variant is a row of VARIANTS (config file, overrides, KD schedule); --scale is the argument
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

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any, Mapping, Optional

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax import host_memory, xla_flags  # noqa: E402

host_memory.reuse_freed_memory()  # before jax starts its threads
xla_flags.add_gpu_overlap_flags()  # collectives overlapped with compute on GPU; before jax starts

from experiments import compute_multiplier, paired_stats  # noqa: E402
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
    "shared_fine": Variant("shared_fine", max_seeds=3),
    "sigmoid_bias": Variant("shared_fine", overrides={
        "moe.router": "sigmoid", "moe.bias_update_rate": 0.01, "moe.aux_loss_coef": 0.0,
        "moe.drop_tokens": False, "moe.dispatch": "dropless"}, max_seeds=3),
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


# The paper's loss claims (REFERENCE.md). Parity margins: the paper's "gap about 0.01" for PR-MoE,
# used for Residual vs Top2 too; the MoS student keeps 99% of its teacher's quality, about 1% of a
# tiny model's loss (0.025 nats). Residual's "> 10% faster" is a step-time claim: see
# experiments/bench_step_time.py.
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


def read_curve(workdir: str) -> dict:
    steps, loss, val_steps, val_loss, step_times, moe = [], [], [], [], [], None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
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
    with open(path) as f:
        summary = json.load(f)
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


def _mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(runs: dict) -> dict:
    """runs: variant -> {seed: run summary} -> one row per variant: means over seeds and the
    per-seed values (val_loss_by_seed) that the paired statistics use."""
    table = {}
    for variant, by_seed in runs.items():
        if not by_seed:
            continue
        seeds = [by_seed[seed] for seed in sorted(by_seed)]
        first = seeds[0]
        loss_mean, loss_std = _mean_std([s["val_loss"] for s in seeds])
        bits = "val_bpb" if "val_bpb" in first else "val_bits_per_token"
        bpb_mean, bpb_std = _mean_std([s[bits] for s in seeds])
        table[variant] = {
            "params_total": first["params_total"], "params_active": first["params_active"],
            "steps": first["steps"], "val_loss": loss_mean, "val_loss_std": loss_std, "val_bpb": bpb_mean,
            "val_bpb_std": bpb_std, "step_time_s": _mean_std([s["step_time_s"] for s in seeds])[0],
            "tokens_per_sec": _mean_std([s["tokens_per_sec"] for s in seeds])[0],
            "seeds": len(seeds), "val_loss_by_seed": {str(seed): by_seed[seed]["val_loss"] for seed in sorted(by_seed)},
            "curves": [s["curve"] for s in seeds], "step_offset": first.get("step_offset", 0),
        }
        if all("train_flops_per_token" in s for s in seeds):
            table[variant]["train_flops_per_token"] = first["train_flops_per_token"]
            table[variant]["tokens_seen"] = first.get("tokens_seen")
        if all("wall_s" in s for s in seeds):
            table[variant]["wall_s"] = _mean_std([s["wall_s"] for s in seeds])[0]
        if all("test_loss" in s for s in seeds):  # the claims are judged on test where every seed has it
            test_mean, test_std = _mean_std([s["test_loss"] for s in seeds])
            table[variant].update(test_loss=test_mean, test_loss_std=test_std,
                                  test_loss_by_seed={str(seed): by_seed[seed]["test_loss"] for seed in sorted(by_seed)})
        routing = [s["curve"].get("routing") for s in seeds]
        if all(routing):
            table[variant]["routing"] = {name: _mean_std([r[name] for r in routing])[0] for name in routing[0]}
    return table


def judge_claims(table: dict, suites: list) -> list:
    """Each claim of `suites` whose two variants are in the table: the paired difference of the
    final test loss (validation loss where a variant has no test evaluation, named in "split") over
    their common seeds, its 95% interval and the verdict."""
    out = []
    for claim in CLAIMS:
        if claim.suite not in suites or claim.a not in table or claim.b not in table:
            continue
        split = "test" if "test_loss_by_seed" in table[claim.a] and "test_loss_by_seed" in table[claim.b] else "val"
        a, b = table[claim.a][f"{split}_loss_by_seed"], table[claim.b][f"{split}_loss_by_seed"]
        common = sorted(set(a) & set(b), key=int)
        if not common:
            continue
        diff = paired_stats.paired_difference([a[s] for s in common], [b[s] for s in common])
        out.append({**dataclasses.asdict(claim), **diff.as_dict(), "seeds": [int(s) for s in common],
                    "split": split, "verdict": paired_stats.verdict(diff, claim.margin)})
    return out


def _interval(claim: dict) -> str:
    if claim["low"] is None:
        return "- (one seed)"
    return f"[{claim['low']:+.4f}, {claim['high']:+.4f}]"


def markdown(table: dict, claims: list, suite: str, scale: str, tokens_per_step: int) -> str:
    steps = {row["steps"] + row.get("step_offset", 0) for row in table.values()}
    lines = [f"Suite `{suite}`, scale `{scale}`: every variant trained for {'/'.join(map(str, sorted(steps)))} "
             f"steps of {tokens_per_step} tokens (equal steps and tokens; a run started from another counts that "
             "run's steps too), same data order and seeds. Routing columns: the last logging step's load "
             "imbalance (max / mean tokens per expert, mean over MoE layers), dead experts (no token in the "
             "last logging window, summed over layers), tokens with no expert (mean over layers).\n",
             "| variant | params total | active | train FLOPs/token | tokens seen | steps | test loss (whole split) | "
             "val loss | val bits/byte | load imbalance | dead experts | unrouted | step ms | tokens/s | wall min | "
             "seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, r in table.items():
        pm = f" ± {r['val_loss_std']:.4f}" if r["seeds"] > 1 else ""
        offset = r.get("step_offset", 0)
        run_steps = f"{offset} + {r['steps']}" if offset else f"{r['steps']}"
        routing = r.get("routing")
        routing_cells = (f"{routing['load_imbalance']:.2f} | {routing['dead_experts']:.1f} | "
                         f"{routing['unrouted_fraction']:.3f}") if routing else "- | - | -"
        test = (f"{r['test_loss']:.4f}" + (f" ± {r['test_loss_std']:.4f}" if r["seeds"] > 1 else "")
                if "test_loss" in r else "-")
        flops = f"{r['train_flops_per_token']:.3g}" if "train_flops_per_token" in r else "-"
        seen = f"{r['tokens_seen']:,}" if r.get("tokens_seen") else "-"
        wall = f"{r['wall_s'] / 60:.1f}" if "wall_s" in r else "-"
        lines.append(f"| {variant} | {r['params_total']:,} | {r['params_active']:,} | {flops} | {seen} | {run_steps} | "
                     f"{test} | {r['val_loss']:.4f}{pm} | {r['val_bpb']:.4f} | {routing_cells} | "
                     f"{1e3 * r['step_time_s']:.0f} | {r['tokens_per_sec']:.0f} | {wall} | {r['seeds']} |")
    if claims:
        lines += ["", "The claims (the paper's, and for the routing suite the newer routers' papers): mean paired "
                  "difference of the final test loss (a - b, nats; the split column says where a run has only "
                  "validation) over the "
                  "seeds both variants have, 95% Student-t interval; \"holds\" when the interval lies below the "
                  "threshold (0, or the parity margin), \"contradicted\" when it lies above, else \"not resolved\".",
                  "", "| claim | a - b | split | mean | 95% interval | threshold | seeds | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in claims:
            lines.append(f"| {c['text']} | {c['a']} - {c['b']} | {c.get('split', 'val')} | {c['mean']:+.4f} | "
                         f"{_interval(c)} | {c['margin']:+.3f} | {c['n']} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, claims: list, suites: dict, workdir: str) -> list:
    """One figure per suite. Left: each variant's mean validation curve over seeds with a min-max
    band. Right: the final validation loss of every (variant, seed), one line per seed, so the
    paired differences the claims judge are visible (the curves' scale hides them). The suite's
    claim verdicts beneath, wrapped to the figure's width."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for suite, variants in suites.items():
        present = [v for v in variants if v in table]
        if not present:
            continue
        notes = [textwrap.fill(f"{c['text']}: {c['mean']:+.4f} {_interval(c)}, {c['verdict']}", 150,
                               subsequent_indent="    ") for c in claims if c["suite"] == suite]
        note_lines = sum(note.count("\n") + 1 for note in notes)
        height = 4.6 + 0.13 * note_lines
        fig, (ax, seeds_ax) = plt.subplots(1, 2, figsize=(11, height), gridspec_kw={"width_ratios": [3, 2]})
        seeds = 0
        for variant in present:
            curves = table[variant]["curves"]
            seeds = max(seeds, len(curves))
            offset = table[variant].get("step_offset", 0)  # an upcycled run continues its dense run's steps
            steps = [step + offset for step in curves[0]["val_step"]]
            n = min(len(c["val_loss"]) for c in curves)
            columns = [[c["val_loss"][i] for c in curves] for i in range(n)]
            mean = [sum(col) / len(col) for col in columns]
            line, = ax.plot(steps[:n], mean, marker="o", markersize=3, label=variant)
            if len(curves) > 1:
                ax.fill_between(steps[:n], [min(col) for col in columns], [max(col) for col in columns],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{suite}: mean over {seeds} seed(s), band min-max")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        all_seeds = sorted({int(seed) for v in present for seed in table[v]["val_loss_by_seed"]})
        for seed in all_seeds:
            xs = [i for i, v in enumerate(present) if str(seed) in table[v]["val_loss_by_seed"]]
            ys = [table[present[i]]["val_loss_by_seed"][str(seed)] for i in xs]
            seeds_ax.plot(xs, ys, marker="o", markersize=4, alpha=0.8, label=f"seed {seed}")
        seeds_ax.set_xticks(range(len(present)), present, rotation=35, ha="right", fontsize=8)
        seeds_ax.set_ylabel("final validation loss")
        seeds_ax.set_title("final loss per seed (paired by seed)")
        seeds_ax.grid(alpha=0.3)
        seeds_ax.legend(fontsize=8)
        if notes:
            fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", family="monospace")
        fig.tight_layout(rect=(0, (0.13 * note_lines + 0.1) / height if notes else 0, 1, 1))
        path = os.path.join(workdir, f"{suite}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=None)
def provenance() -> dict:
    """Where the results come from: commit (with '+changes' when the tree differs), date, command,
    machine. Taken once, when the process first asks (main asks before it trains anything): the
    code that runs is the code imported then, whatever the checkout holds when a run finishes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "+changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    import importlib.metadata

    import jax

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"commit": commit, "date": _now(),
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv else "", *sys.argv[1:]]),
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
            "python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "versions": versions}


def write_results(runs: dict, f, variants: list) -> str:
    """results.json, results.md and the plots from the finished runs; returns the markdown."""
    table = summarise(runs)
    suites = {name: vs for name, vs in SUITES.items() if name != "all"} if f.suite == "all" else {f.suite: variants}
    claims = judge_claims(table, list(suites))
    config = variant_config(variants[0], f.scale, 0, f.data_path, f.steps)
    text = markdown(table, claims, f.suite, f.scale, config.data.batch_size * config.data.seq_len)
    plot(table, claims, suites, f.workdir)
    multipliers = multiplier_table(table)
    if multipliers:
        text += multiplier_markdown(table, multipliers)
        plot_loss_vs_compute(table, multipliers, f.workdir)
    # the commits that trained the runs in the tables ("unrecorded" for runs older than this field)
    run_commits = sorted({s.get("commit") or "unrecorded" for by_seed in runs.values() for s in by_seed.values()})
    results = {"suite": f.suite, "scale": f.scale, "seeds": f.seeds,
               "provenance": {**provenance(), "run_commits": run_commits, "written": _now()},
               "claims": claims, "variants": table,
               "multipliers": {v: dataclasses.asdict(m) for v, m in multipliers.items()}}
    for name, content in (("results.json", json.dumps(results, indent=1)), ("results.md", text)):
        tmp = os.path.join(f.workdir, name + ".tmp")
        with open(tmp, "w") as out:
            out.write(content)
        os.replace(tmp, os.path.join(f.workdir, name))
    return text


def multiplier_table(table: dict) -> dict:
    """Each variant's compute multiplier (experiments/compute_multiplier.py) when the whole dense
    ladder has test losses and FLOPs; {} otherwise."""
    rungs = {v: table[v] for v in LADDER if v in table}
    if len(rungs) < 2 or not all("test_loss_by_seed" in r and "train_flops_per_token" in r for r in rungs.values()):
        return {}
    # the ladder's token budget: a run of fewer steps (dense_half, the upcycling source) is no point
    # on it; an upcycled run counts its source's steps and is one
    others = {v: r["test_loss_by_seed"] for v, r in table.items()
              if v not in rungs and "test_loss_by_seed" in r and "train_flops_per_token" in r
              and (VARIANTS[v].step_fraction == 1.0 or VARIANTS[v].init_from)}
    flops = {v: r["train_flops_per_token"] for v, r in table.items() if "train_flops_per_token" in r}
    try:
        return compute_multiplier.variant_multipliers({v: r["test_loss_by_seed"] for v, r in rungs.items()},
                                                      others, flops)
    except ValueError as error:  # a ladder whose loss does not fall with compute: say so, do not guess
        logging.warning("no compute multipliers: %s", error)
        return {}


def multiplier_markdown(table: dict, multipliers: dict) -> str:
    base = table["dense"]["train_flops_per_token"]
    lines = ["", "Compute multiplier (the paper's headline, ~5x at 128 experts): the dense training compute "
             "that reaches each variant's test loss, interpolated on log compute along the dense ladder "
             f"({', '.join(f'{v} {table[v]["train_flops_per_token"] / base:.2f}x' for v in LADDER if v in table)} "
             "the dense model's FLOPs per token), over the variant's own compiled training FLOPs per token; "
             "per seed, mean and 95% interval. Beyond the ladder: a bound, never an extrapolation. Every "
             "comparison through it is iso-compute.", "",
             "| variant | train FLOPs/token | vs dense | test loss | multiplier | per seed |",
             "|---|---|---|---|---|---|"]
    ladder = {v: table[v]["test_loss_by_seed"] for v in LADDER if "test_loss_by_seed" in table.get(v, {})}
    cut = compute_multiplier.rungs_cut(ladder, {v: table[v]["train_flops_per_token"] for v in ladder})
    if cut:
        lines[3:3] = ["Rungs that did not improve on the rung below them, so that seed's ladder ends below "
                      "them (its bounds are at the last falling rung): "
                      + "; ".join(f"seed {s}: {', '.join(r)}" for s, r in cut.items()) + ".", ""]
    for variant, m in multipliers.items():
        r = table[variant]
        lines.append(f"| {variant} | {r['train_flops_per_token']:.3g} | {r['train_flops_per_token'] / base:.2f}x | "
                     f"{r['test_loss']:.4f} | {m.text()} | {', '.join(m.per_seed)} |")
    return "\n".join(lines) + "\n"


def plot_loss_vs_compute(table: dict, multipliers: dict, workdir: str) -> str:
    """compute.png: test loss against training FLOPs per token, the dense ladder as a curve (seed
    means, min-max bars) and every other variant as a point with its seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))

    def point(r):
        losses = list(r["test_loss_by_seed"].values())
        mean = sum(losses) / len(losses)
        return r["train_flops_per_token"], mean, [[mean - min(losses)], [max(losses) - mean]]

    rungs = [point(table[v]) for v in LADDER if v in table]
    ax.plot([x for x, _, _ in rungs], [y for _, y, _ in rungs], "k-", label="dense ladder")
    for x, y, err in rungs:
        ax.errorbar([x], [y], yerr=err, fmt="ko", capsize=3)
    for variant, m in multipliers.items():
        x, y, err = point(table[variant])
        ax.errorbar([x], [y], yerr=err, fmt="o", capsize=3, label=f"{variant} ({m.text()})")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs per token (compiled step)")
    ax.set_ylabel("test loss (nats/byte, whole test split)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, "compute.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def suite_variants(suite: str, only: list) -> list:
    """The suite's variants, or those of `only` (which must belong to it), in the suite's order."""
    unknown = [v for v in only if v not in SUITES[suite]]
    if unknown:
        raise ValueError(f"--variants={','.join(only)}: {unknown} not in suite {suite!r}; use some of "
                         f"{SUITES[suite]}")
    return [v for v in SUITES[suite] if not only or v in only]


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
