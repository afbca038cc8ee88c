r"""Routing-realistic cost of the expert exchange (moe_jax.routing_cost): a finished run's recorded
routing (its probe batches, workdir/routing/) replayed through the exchange's bookkeeping on
expert-parallel groups of --devices devices, beside a perfectly balanced router of the same shapes.

  python experiments/routing_cost.py --workdir=RUN [--devices=2,4,8] [--steps=last|all] [--out=DIR]

Seconds (host-side counting, nothing compiled). Per MoE layer and device count: the buffer paths'
dropped copies and useful slot fraction at the run's capacity factor, the rows exchange's overflow
at its row_exchange_factor, the busiest device's received rows over the mean (the ragged exchange's
and the grouped matmul's straggler factor), and the busiest expert's load over the mean. Writes
DIR/routing_cost.md and .json (DIR defaults to RUN).
"""

import dataclasses
import json
import os
import sys

import ml_collections
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import cli, metrics, routing_cost, routing_trace, run_config

flags.DEFINE_string("workdir", None, "A run's folder with routing probes (any MoE run with routing_probe on).")
flags.DEFINE_list("devices", ["2", "4", "8"], "Expert-parallel group sizes to replay the routing on.")
flags.DEFINE_integer("nodes", 2, "Nodes the devices are split into, for the inter-node rows (1: none).")
flags.DEFINE_enum("steps", "last", ["last", "all"], "The last probe, or every evaluation's probe.")
flags.DEFINE_string("out", None, "Folder for routing_cost.md / .json (default: --workdir).")
flags.mark_flag_as_required("workdir")


def rows(workdir: str, devices: list[int], steps: str, nodes: int = 1) -> list[dict]:
    """One row per (probe step, layer, device count): the real and balanced ExchangeLoad fields."""
    with open(os.path.join(workdir, metrics.CONFIG_FILE)) as handle:
        config = run_config.model_config(ml_collections.ConfigDict(json.load(handle)["config"]))
    if config.moe is None:
        raise ValueError(f"the run in {workdir} is dense: it has no routing to replay")
    if config.moe.router == "expert_choice":
        raise ValueError("expert-choice routing gives every expert exactly C tokens of each shard: balanced by "
                         "construction, nothing to replay")
    probes = routing_trace.read_probes(workdir)
    if not probes:
        raise FileNotFoundError(f"{workdir}/{routing_trace.TRACE_DIR} has no probe; train the run with "
                                "config.routing_probe=True (the default)")
    options = dict(capacity_factor=config.moe.eval_capacity_factor, min_capacity=config.moe.min_capacity,
                   row_exchange_factor=config.moe.row_exchange_factor)
    out = []
    for probe in probes if steps == "all" else probes[-1:]:
        for layer, code in probe["layers"].items():
            for n in devices:
                experts = probe["num_experts"][layer]
                cost = routing_cost.trace_cost(code, experts, n, **options)
                internode = {}
                if nodes > 1 and n % nodes == 0 and experts % nodes == 0:
                    crossing = routing_cost.internode_rows(code, experts, n, nodes)
                    internode = {"internode_rows_per_copy": crossing.per_copy,
                                 "internode_rows_per_node": crossing.per_node}
                out.append({"step": probe["step"], "layer": layer, "devices": n, **internode,
                            **{f"{name}_{key}": value for name, load in cost.items()
                               for key, value in dataclasses.asdict(load).items()},
                            "real_received_imbalance": cost["real"].received_imbalance,
                            "balanced_received_imbalance": cost["balanced"].received_imbalance})
    return out


def markdown(table: list[dict], label: str) -> str:
    lines = [f"Routing-realistic exchange cost of {label}: the recorded probe routing (real) against a balanced "
             "router (bal) of the same shapes.", "",
             "| step | layer | E | devices | dropped real / bal | buffer useful real / bal | overflow real / bal "
             "| received max/mean real / bal | expert load max/mean | inter-node rows: every copy / once per node |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(
            f"| {r['step']} | {r['layer']} | {r['real_experts']} | {r['devices']} "
            f"| {r['real_dropped_fraction']:.1%} / {r['balanced_dropped_fraction']:.1%} "
            f"| {r['real_buffer_useful_fraction']:.1%} / {r['balanced_buffer_useful_fraction']:.1%} "
            f"| {r['real_overflow_fraction']:.1%} / {r['balanced_overflow_fraction']:.1%} "
            f"| {r['real_received_imbalance']:.2f} / {r['balanced_received_imbalance']:.2f} "
            f"| {r['real_expert_load_max_over_mean']:.2f} "
            f"| {r.get('internode_rows_per_copy', '-')} / {r.get('internode_rows_per_node', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        devices = [int(d) for d in f.devices]
    except ValueError:
        cli.fail(f"--devices={','.join(f.devices)} must be integers, e.g. 2,4,8")
    try:
        table = rows(f.workdir, devices, f.steps, f.nodes)
    except (FileNotFoundError, ValueError) as error:
        cli.fail(str(error))
    text = markdown(table, f.workdir)
    print(text)
    out = f.out or f.workdir
    os.makedirs(out, exist_ok=True)
    metrics.atomic_write_text(os.path.join(out, "routing_cost.md"), text)
    metrics.atomic_write_text(os.path.join(out, "routing_cost.json"), json.dumps(table, indent=1))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
