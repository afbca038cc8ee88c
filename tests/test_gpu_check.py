"""The GPU check's rehearsal: scripts/gpu_check.sh --dry-run on the CPU runs every part to its end
and writes both reports, so a typo fails here and not in the GPU minutes."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import binary_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("env", "pytest", "edges", "train", "kernels", "layer", "decode")


def run_check(out_dir, *args, site=None):
    env = {**binary_env(), "PYTHON": sys.executable, "OUT": ""}
    if site:
        env["GPU_CHECK_SITE"] = str(site)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out_dir), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_dry_run_runs_every_part_and_writes_both_reports(tmp_path):
    proc = run_check(tmp_path / "out", "--dry-run", site=tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the project was installed into the target folder, kernels inside the package
    assert (tmp_path / "site" / "moe_jax" / "kernels" / "gating" / "kernel.py").exists()
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    assert list(report["parts"]) == list(PARTS)
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == {**dict.fromkeys(PARTS, "ok"), "pytest": "skipped"}, statuses
    parts = report["parts"]
    # every GPU test was collected and skipped (none failed, none ran without a GPU)
    assert parts["pytest"]["counts"]["failed"] == 0 and parts["pytest"]["counts"]["skipped"] >= 19
    edges = parts["edges"]
    assert edges["counts"]["wrong"] == 0 and edges["counts"]["rows"] >= 40  # every pair in interpret mode
    train = parts["train"]["records"][0]
    assert train["variant"] == "gather" and train["finite"] and train["tokens_per_s"] > 0
    assert train["last_loss"] < train["first_loss"]  # 3 steps on one repeated batch learn something
    kernels = {(r["op"], r["impl"]) for r in parts["kernels"]["records"]}
    assert ("grouped matmul", "capacity buffer batched matmul") in kernels
    assert ("gating", "xla reference (moe_jax.gating)") in kernels
    layer = {r["impl"]: r for r in parts["layer"]["records"]}
    assert set(layer) == {"dense FFN", "einsum", "gather", "dropless + Pallas gmm", "dropless"}
    assert "the dense FFN" in layer["gather"]["vs_dense"]
    decode = {(r["path"], r["batch"]) for r in parts["decode"]["records"]}
    assert {("serve", 1), ("serve", 2), ("dense", 1), ("einsum", 2)} <= decode
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    for title in ("pytest -m gpu", "Kernels at ragged shapes against NumPy", "Training steps",
                  "Kernels at the paper's shapes", "MoE layer per dispatch path", "Decode latency"):
        assert f"## {title}" in markdown
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0


def test_a_part_past_the_budget_is_reported_not_run_and_fails_the_check(tmp_path):
    env = {**binary_env(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "gpu_check.py"), f"--out={tmp_path}",
                           "--dry_run", "--parts=env", "--budget_s=1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["parts"]["env"]["status"] == "not run"
    assert "not run: the 1 s budget was spent" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("bad", ["--parts=env,nope", "--frobnicate"])
def test_bad_flags_are_refused(tmp_path, bad):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "gpu_check.py"), f"--out={tmp_path}",
                           bad], cwd=ROOT, env=binary_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("nope" in proc.stderr) or ("frobnicate" in proc.stderr)
