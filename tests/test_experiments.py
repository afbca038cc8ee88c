"""The ablation binary end to end at micro scale, and the quickstart notebook."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from experiments import ablations, ablation_specs
from moe_jax import checkpoint as checkpoint_lib
from moe_jax import run_config
from conftest import binary_env

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("scale", ablation_specs.SCALES)
def test_variant_table_builds_every_run(scale):
    """Every row of ablation_specs.VARIANTS builds a valid config at every scale, with the same shape
    for every variant (only the MoE part differs) and its row's overrides and KD schedule."""
    configs = {variant: ablation_specs.variant_config(variant, scale, 0, "", 0) for variant in ablation_specs.VARIANTS}
    models = {variant: run_config.model_config(config) for variant, config in configs.items()}
    for variant, config in configs.items():
        run_config.validate(config)
        if ablation_specs.VARIANTS[variant].grow is None:  # the dense ladder's rungs are grown on purpose
            assert models[variant].hidden_size == models["dense"].hidden_size
        fraction = ablation_specs.VARIANTS[variant].step_fraction
        assert config.total_steps == max(1, round(configs["dense"].total_steps * fraction))
        if ablation_specs.VARIANTS[variant].kd not in (None, "none"):
            assert config.kd.schedule == ablation_specs.VARIANTS[variant].kd
    assert models["moe_2x"].moe.experts == 2 * models["moe"].moe.experts
    assert models["teacher"] == models["pr_moe"]
    teacher_layers = models["teacher"].num_layers
    assert models["student_staged_kd"].num_layers == teacher_layers - max(1, round(teacher_layers / 8))
    assert set(ablation_specs.SUITES["all"]) == set(ablation_specs.VARIANTS)
    # the upcycled run and its dense start together take the steps of a run from scratch
    assert configs["dense_half"].total_steps + configs["pr_moe_upcycled"].total_steps == configs["pr_moe"].total_steps
    assert models["pr_moe_upcycled"] == models["pr_moe"]
    assert models["top1_loss_free"].moe.bias_update_rate > 0 and models["top1_loss_free"].moe.aux_loss_coef == 0
    assert models["expert_choice"].moe.router == "expert_choice"
    # the ladder: wider, then wider and deeper, FFN kept at the dense model's ratio; the expert counts
    rungs = [models[v] for v in ablation_specs.LADDER]
    assert [m.hidden_size for m in rungs] == sorted({m.hidden_size for m in rungs})
    assert rungs[-1].num_layers > rungs[0].num_layers and all(m.moe is None for m in rungs)
    assert all(m.ffn_size * rungs[0].hidden_size == rungs[0].ffn_size * m.hidden_size for m in rungs)
    assert [models[v].moe.experts for v in ("moe", "moe_2x", "moe_e32", "moe_e64")] == [8, 16, 32, 64]
    # the modern suite at the top-1 MoE's active compute
    for name in ("shared_fine", "sigmoid_bias"):
        m = models[name].moe
        assert (m.k + m.shared_experts) * models[name].expert_ffn_size == models["moe"].expert_ffn_size
    assert models["sigmoid_bias"].moe.router == "sigmoid" and models["sigmoid_bias"].moe.bias_update_rate > 0


@pytest.mark.slow  # the default suite runs a micro suite end to end in the kill-and-resume test
def test_every_ablation_suite_runs_at_micro_scale(tmp_path):
    env = binary_env()
    cmd = [sys.executable, str(ROOT / "experiments" / "ablations.py"), "--scale=micro", f"--workdir={tmp_path}"]
    subprocess.run([*cmd, "--suite=all", "--seeds=1"], check=True, env=env, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["variants"]) == set(ablation_specs.VARIANTS)
    assert set(results["variants"]) == {"dense", "moe", "first_half", "second_half", "top2", "residual", "moe_2x",
                                        "pyramid", "pr_moe", "teacher", "student_no_kd", "student_full_kd",
                                        "student_staged_kd", "top1_loss_free", "expert_choice", "dense_half",
                                        "pr_moe_upcycled", "first_half_no_drop", "dense_x2", "dense_x4",
                                        "dense_x8", "moe_e32", "moe_e64", "shared_fine", "sigmoid_bias"}
    for name, row in results["variants"].items():
        assert row["steps"] + row["step_offset"] == (3 if name == "dense_half" else 6)
        assert row["val_loss"] > 0 and row["curves"][0]["val_loss"]
    for suite in ("placement", "top2_vs_residual", "pyramid", "mos", "routing"):
        assert (tmp_path / f"{suite}.png").stat().st_size > 1000
    assert "equal steps and tokens" in (tmp_path / "results.md").read_text()


def test_routing_suite_end_to_end_at_micro_scale(tmp_path):
    """The routing suite (the variants that are new here; the slow all-suites test runs every one):
    expert-choice trains, the upcycled PR-MoE starts from its dense run (half the steps each, counted
    together), the routing columns and the claims are written; a claim whose baseline did not run
    (expert-choice vs top-1) is left out."""
    env = binary_env()
    cmd = [sys.executable, str(ROOT / "experiments" / "ablations.py"), "--scale=micro", "--suite=routing",
           "--variants=expert_choice,dense_half,pr_moe_upcycled,pr_moe", "--seeds=1", "--steps=4",
           f"--workdir={tmp_path}"]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["variants"]
    assert list(rows) == ["expert_choice", "dense_half", "pr_moe_upcycled", "pr_moe"]
    assert rows["dense_half"]["steps"] == 2 and rows["pr_moe_upcycled"]["steps"] == 2
    assert rows["pr_moe_upcycled"]["step_offset"] == 2 and rows["pr_moe"]["steps"] == 4
    upcycled = json.loads((tmp_path / "pr_moe_upcycled" / "seed0" / "config.json").read_text())["config"]
    assert upcycled["init_from"] == str(tmp_path / "dense_half" / "seed0")
    assert "routing" not in rows["dense_half"]
    assert rows["expert_choice"]["routing"]["load_imbalance"] == pytest.approx(1.0)  # experts fill exactly
    assert rows["expert_choice"]["routing"]["dead_experts"] == 0
    for name in ("pr_moe_upcycled", "pr_moe"):
        assert rows[name]["routing"]["load_imbalance"] >= 1.0
    claims = {(c["a"], c["b"]): c for c in results["claims"]}
    assert set(claims) == {("pr_moe_upcycled", "pr_moe")}
    assert (tmp_path / "routing.png").stat().st_size > 1000
    assert (tmp_path / "pr_moe" / "seed0" / "routing").is_dir()  # the probe traces of each run


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
def test_tiny_ablation_suite_trains_and_tests_every_variant_alike(tmp_path):
    """The real experiment at tiny scale, one seed of dense and MoE (about 5 minutes on 2 cores):
    both learn (the training loss falls by over a nat, the test loss ends far below a uniform byte's
    ln 256 = 5.55 nats) and both are judged on the same windows of the whole test split. Which one
    is better is the suite's verdict over seeds (results/), not an assertion on one run."""
    subprocess.run([sys.executable, str(ROOT / "experiments" / "ablations.py"), "--scale=tiny", "--suite=placement",
                    "--variants=dense,moe", "--seeds=1", f"--workdir={tmp_path}"], check=True, env=binary_env(),
                   capture_output=True)
    runs = {v: json.loads((tmp_path / v / "seed0" / ablations.RUN_FILE).read_text()) for v in ("dense", "moe")}
    for run in runs.values():
        curve = run["curve"]["train_ce"]
        assert curve[0] - curve[-1] > 1.0 and run["test_loss"] < 3.0
        assert run["steps"] == 300 and run["corpus_identity"] == runs["dense"]["corpus_identity"]
    assert runs["moe"]["test_tokens"] == runs["dense"]["test_tokens"] > 0
    assert runs["moe"]["test_windows"] == runs["dense"]["test_windows"]
    variants = json.loads((tmp_path / "results.json").read_text())["variants"]
    assert variants["moe"]["params_total"] > variants["dense"]["params_total"]


def _ablation_cmd(workdir, seeds):
    return [sys.executable, str(ROOT / "experiments" / "ablations.py"), "--scale=micro", "--suite=placement",
            "--variants=dense,moe", "--steps=4", f"--seeds={seeds}", f"--workdir={workdir}"]


def test_suite_killed_midway_resumes_and_grows_to_the_uninterrupted_results(tmp_path):
    """SIGKILL while the second run of seed 0 trains; the same command resumes it from its
    checkpoint and skips the finished one; --seeds=2 then adds seed 1. results.json (per-seed losses,
    the paired claim) equals an uninterrupted two-seed suite's; the plot is written."""
    env = binary_env()  # both suites compile the same programs: the shared cache compiles them once
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_ablation_cmd(straight, 2), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_ablation_cmd(killed, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / "moe" / "seed0" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob(f"*/{checkpoint_lib.COMMIT_MARKER}")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the suite finished before it could be killed"
    assert (killed / "dense" / "seed0" / ablations.RUN_FILE).exists()
    assert not (killed / "moe" / "seed0" / ablations.RUN_FILE).exists()
    dense_mtime = (killed / "dense" / "seed0" / ablations.RUN_FILE).stat().st_mtime_ns
    # the state of the interrupted suite, training nothing: the finished run only
    subprocess.run([*_ablation_cmd(killed, 2), "--report_only"], check=True, env=env, capture_output=True)
    assert set(json.loads((killed / "results.json").read_text())["variants"]) == {"dense"}
    assert not (killed / "moe" / "seed0" / ablations.RUN_FILE).exists()

    subprocess.run(_ablation_cmd(killed, 1), check=True, env=env, capture_output=True)  # resume seed 0
    one_seed = json.loads((killed / "results.json").read_text())
    assert set(one_seed["variants"]["moe"]["val_loss_by_seed"]) == {"0"}
    assert one_seed["claims"][0]["verdict"] == "not resolved" and one_seed["claims"][0]["low"] is None
    subprocess.run(_ablation_cmd(killed, 2), check=True, env=env, capture_output=True)  # grow to 2 seeds
    assert (killed / "dense" / "seed0" / ablations.RUN_FILE).stat().st_mtime_ns == dense_mtime  # skipped

    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, killed))
    for variant in ("dense", "moe"):
        assert a["variants"][variant]["val_loss_by_seed"] == b["variants"][variant]["val_loss_by_seed"]
        assert [c["val_loss"] for c in a["variants"][variant]["curves"]] == \
            [c["val_loss"] for c in b["variants"][variant]["curves"]]
    keys = ("text", "n", "mean", "std", "low", "high", "verdict")
    assert [{k: c[k] for k in keys} for c in a["claims"]] == [{k: c[k] for k in keys} for c in b["claims"]]
    assert b["claims"][0]["a"] == "moe" and b["claims"][0]["n"] == 2 and b["claims"][0]["low"] is not None
    assert b["provenance"]["command"].startswith("experiments/ablations.py")
    # every run names the commit that trained it (a suite can accumulate across commits)
    assert b["provenance"]["run_commits"] and "unrecorded" not in b["provenance"]["run_commits"]
    assert (killed / "placement.png").stat().st_size > 1000
    assert "| MoE beats its dense base | moe - dense |" in (killed / "results.md").read_text()


def test_layer_bench_tile_sizes_change_the_tiles_not_the_result():
    """bench_moe_layer's "dropless@tile/d" rows run the dropless layer with other row tiles; the
    layer's output and gradients do not depend on the tile (random inputs, several tiles per expert)."""
    import jax
    import numpy as np

    from experiments import bench_moe_layer as bench
    from moe_jax import experts as experts_lib

    assert experts_lib.default_tile(4096, 8) == 256
    with bench.tile_divisor(4):
        assert experts_lib.default_tile(4096, 8) == 128 and experts_lib.default_tile(1024, 64) == 8
    assert experts_lib.default_tile(4096, 8) == 256  # restored
    x = jax.random.normal(jax.random.key(0), (256, 16))
    params = bench.layer_params(jax.random.key(1), 4, 16, 32)
    results = {}
    for path, tile in (("dropless", 32), ("dropless@tile/1", 64), ("dropless@tile/8", 8)):
        calls = bench.moe_calls(path, x, params)
        num_tiles = (256 + 4 * (tile - 1) + tile - 1) // tile  # experts.tile_layout's static bound
        assert f"f32[{num_tiles},{tile},16]" in calls["fwd"][0].as_text(), path  # the tiles it compiled
        results[path] = [fn(*args) for fn, args in (calls["fwd"], calls["fwd+bwd"])]
    for path in ("dropless@tile/1", "dropless@tile/8"):
        for got, want in zip(jax.tree.leaves(results[path]), jax.tree.leaves(results["dropless"])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_finished_run_files_from_another_folder_are_not_trained_again(tmp_path):
    """--runs_from: committed run files seed a new workdir; the suite reads them instead of training."""
    source = tmp_path / "committed" / "dense" / "seed0"
    source.mkdir(parents=True)
    steps = ablation_specs.variant_config("dense", "micro", 0, "", 0).total_steps
    curve = {"step": [steps], "train_ce": [4.0], "val_step": [steps], "val_loss": [4.5], "step_time_s": [0.1]}
    fake = {"steps": steps, "params_total": 10, "params_active": 10, "val_loss": 4.5, "val_bpb": 6.5,
            "test_loss": 4.25, "test_bpb": 6.1, "step_time_s": 0.1, "tokens_per_sec": 2560.0, "curve": curve}
    (source / ablations.RUN_FILE).write_text(json.dumps(fake))
    workdir = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "ablations.py"), "--scale=micro",
                           "--suite=placement", "--variants=dense", "--seeds=1", f"--workdir={workdir}",
                           f"--runs_from={tmp_path / 'committed'}"], env=binary_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "took 1 finished run(s)" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["variants"]["dense"]["test_loss"] == 4.25  # read, not trained
    assert not (workdir / "dense" / "seed0" / "checkpoints").exists()
    assert ablations.import_runs(str(tmp_path / "committed"), str(workdir)) == 0  # already there: kept
