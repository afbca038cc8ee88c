"""The ablation binary end to end at micro scale, and the quickstart notebook."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import ablations
from moe_jax import run_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("scale", ablations.SCALES)
def test_variant_table_builds_every_run(scale):
    """Every row of ablations.VARIANTS builds a valid config at every scale, with the same shape
    for every variant (only the MoE part differs) and its row's overrides and KD schedule."""
    configs = {variant: ablations.variant_config(variant, scale, 0, "", 0) for variant in ablations.VARIANTS}
    models = {variant: run_config.model_config(config) for variant, config in configs.items()}
    for variant, config in configs.items():
        run_config.validate(config)
        assert models[variant].hidden_size == models["dense"].hidden_size
        assert config.total_steps == configs["dense"].total_steps
        if ablations.VARIANTS[variant].kd not in (None, "none"):
            assert config.kd.schedule == ablations.VARIANTS[variant].kd
    assert models["moe_2x"].moe.experts == 2 * models["moe"].moe.experts
    assert models["teacher"] == models["pr_moe"]
    teacher_layers = models["teacher"].num_layers
    assert models["student_staged_kd"].num_layers == teacher_layers - max(1, round(teacher_layers / 8))
    assert set(ablations.SUITES["all"]) == set(ablations.VARIANTS)


def test_every_ablation_suite_runs_at_micro_scale(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cmd = [sys.executable, str(ROOT / "experiments" / "ablations.py"), "--scale=micro", f"--workdir={tmp_path}"]
    subprocess.run([*cmd, "--suite=all"], check=True, env=env, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["variants"]) == set(ablations.VARIANTS)
    assert set(results["variants"]) == {"dense", "moe", "first_half", "second_half", "top2", "residual", "moe_2x",
                                        "pyramid", "pr_moe", "teacher", "student_no_kd", "student_full_kd",
                                        "student_staged_kd"}
    for row in results["variants"].values():
        assert row["steps"] == 6 and row["val_loss"] > 0 and row["curves"][0]["val_loss"]
    for suite in ("placement", "top2_vs_residual", "pyramid", "mos"):
        assert (tmp_path / f"{suite}.png").stat().st_size > 1000
    assert "equal steps and tokens" in (tmp_path / "results.md").read_text()


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    notebook = json.loads((ROOT / "experiments" / "notebooks" / "quickstart.ipynb").read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    assert namespace["losses"][-1] < namespace["losses"][0]
    assert namespace["routing"].capacity >= 4


@pytest.mark.slow
def test_tiny_ablation_placement_suite(tmp_path):
    """The real experiment (about 8 minutes on 2 cores): MoE beats dense at equal steps."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    subprocess.run([sys.executable, str(ROOT / "experiments" / "ablations.py"), "--scale=tiny", "--suite=placement",
                    f"--workdir={tmp_path}"], check=True, env=env, capture_output=True)
    variants = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert variants["moe"]["val_loss"] < variants["dense"]["val_loss"]
