"""The ablation suites' report: per-variant tables over seeds, the claims' verdicts (paired
statistics), the compute multipliers against the dense ladder, plots, and results.json / results.md
with their provenance. experiments/ablations.py calls `write_results` after each finished run."""

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys

from absl import logging

from experiments import compute_multiplier, paired_stats
from experiments.ablation_specs import CLAIMS, LADDER, SUITES, VARIANTS, variant_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        judged = paired_stats.verdict(diff, claim.margin)
        needed = paired_stats.seeds_to_resolve(diff, claim.margin) if judged == paired_stats.NOT_RESOLVED else None
        out.append({**dataclasses.asdict(claim), **diff.as_dict(), "seeds": [int(s) for s in common],
                    "split": split, "verdict": judged, "seeds_to_resolve": needed})
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
                  "threshold (0, or the parity margin), \"contradicted\" when it lies above, else \"not resolved\"; "
                  "for an unresolved claim, the seeds at which an interval with the same mean and spread would "
                  "exclude the threshold (a guide, not a promise).",
                  "", "| claim | a - b | split | mean | 95% interval | threshold | seeds | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in claims:
            needed = c.get("seeds_to_resolve")
            judged = c["verdict"] + (f" (~{needed} seeds)" if needed else
                                     " (> 200 seeds)" if c["verdict"] == paired_stats.NOT_RESOLVED else "")
            lines.append(f"| {c['text']} | {c['a']} - {c['b']} | {c.get('split', 'val')} | {c['mean']:+.4f} | "
                         f"{_interval(c)} | {c['margin']:+.3f} | {c['n']} | {judged} |")
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
