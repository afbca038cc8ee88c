r"""Routing of a training run over time, from its probe traces (workdir/routing/probe_*.npz, written at
every evaluation; moe_jax.routing_trace).

  python experiments/routing_analysis.py --workdir=workdirs/pr_moe

Writes into workdir/routing/:
  load_<layer>.png  heatmap per MoE layer: share of the probe batch's processed copies per expert
                    (rows) at each recorded step (columns)
  stability.png     per layer, the fraction of probe tokens whose experts changed since the previous
                    recorded step (routing stability: 0 = frozen)
  dropped.png       per layer, the fraction of token copies dropped at each logged training step
                    (from metrics.jsonl)
  analysis.json     the same numbers, and per expert of each layer the input bytes it processes
                    most often at the last step (byte-level corpora)
and prints a summary table.

A token's experts are the experts of its k copies as the router chose them (dropped copies
included); under expert-choice routing (k = E columns, one per expert) they are the experts that
took it.
"""

import collections
import json
import os
import sys

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from moe_jax import cli, routing_trace  # noqa: E402

flags.DEFINE_string("workdir", None, "A training run's --workdir (with routing/probe_*.npz).")
flags.DEFINE_integer("top_bytes", 8, "How many of each expert's most frequent input bytes to report.")


def _is_expert_choice(code: np.ndarray) -> bool:
    expert, _ = routing_trace.decode(code)
    return expert.shape[-1] > 1 and bool(np.all(expert == np.arange(expert.shape[-1])))


def token_experts(code: np.ndarray) -> np.ndarray:
    """[tokens, k] what identifies a token's routing: its chosen experts (sorted), or under
    expert-choice the 0/1 row of experts that took it."""
    code = code.reshape(-1, code.shape[-1])
    if _is_expert_choice(code):
        return (code >= 0).astype(np.int32)
    expert, _ = routing_trace.decode(code)
    return np.sort(expert, axis=-1)


def load_shares(code: np.ndarray, num_experts: int) -> np.ndarray:
    """[E] share of the processed copies that each expert got."""
    expert, kept = routing_trace.decode(code)
    counts = np.bincount(expert[kept].reshape(-1), minlength=num_experts).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def top_bytes(tokens: np.ndarray, code: np.ndarray, num_experts: int, n: int) -> dict:
    """{expert: [(byte as text, count), ...]} of the processed copies, most frequent first."""
    expert, kept = routing_trace.decode(code.reshape(-1, code.shape[-1]))
    flat = tokens.reshape(-1)
    out = {}
    for e in range(num_experts):
        rows = np.flatnonzero(np.any(kept & (expert == e), axis=1))
        common = collections.Counter(flat[rows].tolist()).most_common(n)
        out[str(e)] = [(bytes([t]).decode("latin-1") if t < 256 else f"<{t}>", c) for t, c in common]
    return out


def analyse(probes: list, n_bytes: int) -> dict:
    steps = [p["step"] for p in probes]
    layers = {}
    for name in sorted(probes[0]["layers"], key=lambda b: int(b.split("_")[1])):
        codes = [p["layers"][name] for p in probes]
        num_experts = probes[0]["num_experts"][name]
        identity = [token_experts(c) for c in codes]
        changed = [float(np.mean(np.any(a != b, axis=-1))) for a, b in zip(identity, identity[1:])]
        entry = {"load": [load_shares(c, num_experts).tolist() for c in codes], "changed_fraction": changed,
                 "num_experts": num_experts}
        tokens = probes[-1]["tokens"]
        if tokens.max() < 256:  # a byte-level corpus
            entry["top_bytes"] = top_bytes(tokens, codes[-1], num_experts, n_bytes)
        layers[name] = entry
    return {"steps": steps, "layers": layers}


def dropped_over_steps(workdir: str) -> dict:
    """{"block_<i>": [[step, dropped fraction], ...]} from the run's metrics.jsonl (training steps)."""
    out: dict = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            for key, value in record.items():
                if key.startswith("moe/layer") and key.endswith("/dropped_fraction"):
                    layer = key.split("/")[1].removeprefix("layer")
                    out.setdefault(f"block_{layer}", []).append([record["step"], value])
    return out


def _line_plot(plt, lines: dict, ylabel: str, title: str, path: str) -> str:
    """One line per layer ({name: (steps, values)}) of a fraction over steps, saved to path."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, (x, y) in lines.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot(analysis: dict, directory: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, paths = analysis["steps"], []
    for name, layer in analysis["layers"].items():
        load = np.asarray(layer["load"]).T  # [E, steps]
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(steps) + 2), max(2.5, 0.25 * load.shape[0] + 1.5)))
        image = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=7)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"{name}: share of the probe batch's copies per expert")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = os.path.join(directory, f"load_{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    stability = {name: (steps[1:], layer["changed_fraction"]) for name, layer in analysis["layers"].items()}
    paths.append(_line_plot(plt, stability, "probe tokens whose experts changed",
                            "routing stability between recorded steps", os.path.join(directory, "stability.png")))
    if analysis.get("dropped"):
        dropped = {name: ([p[0] for p in points], [p[1] for p in points])
                   for name, points in analysis["dropped"].items()}
        paths.append(_line_plot(plt, dropped, "dropped fraction of token copies",
                                "capacity drops per MoE layer (training steps)",
                                os.path.join(directory, "dropped.png")))
    return paths


def summary(analysis: dict) -> str:
    lines = ["| layer | experts | max / min load share (last step) | changed since previous step (first -> last) | "
             "dropped (training, mean over steps) |",
             "|---|---|---|---|---|"]
    for name, layer in analysis["layers"].items():
        last = np.asarray(layer["load"][-1])
        changed = layer["changed_fraction"]
        trend = f"{changed[0]:.3f} -> {changed[-1]:.3f}" if changed else "-"
        points = analysis.get("dropped", {}).get(name)
        dropped = f"{np.mean([p[1] for p in points]):.3f}" if points else "-"
        lines.append(f"| {name} | {layer['num_experts']} | {last.max():.3f} / {last.min():.3f} | {trend} | {dropped} |")
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.workdir:
        cli.fail("--workdir is required: a training run's folder")
    probes = routing_trace.read_probes(f.workdir)
    if not probes:
        cli.fail(f"--workdir={f.workdir} has no routing/probe_*.npz: train an MoE model there (probes are recorded "
                 "at every evaluation unless config.routing_probe=False)")
    analysis = analyse(probes, f.top_bytes)
    analysis["dropped"] = dropped_over_steps(f.workdir)
    directory = os.path.join(f.workdir, routing_trace.TRACE_DIR)
    paths = plot(analysis, directory)
    tmp = os.path.join(directory, "analysis.json.tmp")
    with open(tmp, "w") as out:
        json.dump(analysis, out, indent=1)
    os.replace(tmp, os.path.join(directory, "analysis.json"))
    print(f"routing stability and load over {len(analysis['steps'])} recorded steps "
          f"({analysis['steps'][0]}..{analysis['steps'][-1]}):")
    print(summary(analysis))
    print("plots: " + ", ".join(paths))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
