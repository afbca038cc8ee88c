"""experiments/bench_comm.py: computed columns are labelled apart from measured ones, and the
message model runs the all_to_alls over the expert ranks (p / L of p devices with L tensor ranks)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_bench():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_comm.py"), "--experts=8", "--capacity=8",
           "--model_dim=16", "--repeats=1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def table(text, header_start):
    """The rows, as {column: cell}, of the markdown table whose header row starts with header_start."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


def test_columns_say_computed_or_measured_and_flat_runs_over_the_expert_ranks():
    out = run_bench()
    measured = table(out, "| mesh (data, expert, tensor)")
    assert len(measured) == 9
    assert {"messages per device (computed)", "MiB sent per device (computed)",
            "ms per round trip (measured)"} <= set(measured[0])
    analytic = {row["GPUs p"]: row for row in table(out, "| GPUs p")}
    # p = 16 with L = 4 tensor ranks: the flat exchange is an all_to_all among 16 / 4 = 4 expert
    # ranks (3 peers, there and back), each sending the whole buffer B: 2 * 3/4 B.
    assert analytic["16"]["flat, L = 4"] == "6 (1.50 B)"
    assert analytic["16"]["flat, L = 1"] == "30 (1.88 B)"  # all 16 devices are expert ranks
    # The coordinated exchange sends a quarter share to the same 3 peers, then all-gathers over 4.
    assert analytic["16"]["coordinated, L = 4"] == "9 (1.12 B)"
    # The measured settings follow the same model: (1, 4, 2) flat exchanges among 4 expert ranks.
    flat_tp2 = [row for row in measured if row["mesh (data, expert, tensor)"] == "(1, 4, 2)"
                and row["exchange"] == "flat"]
    assert [row["messages per device (computed)"] for row in flat_tp2] == ["6"]
