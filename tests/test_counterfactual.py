"""Counterfactual routing on a frozen checkpoint: the unchanged model reproduces the run's own test
loss exactly; knock-outs and merges change what they say; the binary writes its table."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import counterfactual, trainer
from tests.conftest import binary_env
from tests.test_experiments import ROOT


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from experiments.configs import load_config_file

    c = load_config_file("moe", "tiny")
    c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps, c.eval_batches = 4, 2, 4, 4, 1
    c.data.batch_size, c.data.seq_len, c.data.max_bytes = 16, 32, 1 << 18
    c.model.num_layers, c.model.hidden_size, c.model.num_heads, c.model.ffn_size, c.model.max_seq_len = 2, 32, 2, 64, 64
    c.moe.experts = "4"
    workdir = tmp_path_factory.mktemp("run")
    summary = trainer.train_and_evaluate(c, str(workdir))
    return workdir, summary


def test_the_unchanged_model_reproduces_the_run_test_loss_exactly(finished_run):
    workdir, summary = finished_run
    run = counterfactual.load_run(str(workdir))
    assert counterfactual.test_loss(run) == summary["test_loss"]


def test_knockout_zeroes_one_expert_and_merge_averages_two():
    params = {"block_1": {"moe": {"experts": {
        name: jax.random.normal(jax.random.key(i), shape) for i, (name, shape) in enumerate(
            [("w1", (4, 3, 5)), ("b1", (4, 5)), ("w2", (4, 5, 3)), ("b2", (4, 3))])}}}}
    out = counterfactual.knock_out(params, 1, 2)["block_1"]["moe"]["experts"]
    assert float(jnp.abs(out["w2"][2]).max()) == 0 and float(jnp.abs(out["b2"][2]).max()) == 0
    np.testing.assert_array_equal(out["w2"][1], params["block_1"]["moe"]["experts"]["w2"][1])
    similar = dict(params)
    experts = dict(params["block_1"]["moe"]["experts"])
    experts["w1"] = experts["w1"].at[3].set(experts["w1"][0] * 2.0 + 1e-3)  # expert 3 nearly parallel to 0
    experts["w2"] = experts["w2"].at[3].set(experts["w2"][0] * 2.0)
    similar = {"block_1": {"moe": {"experts": experts}}}
    a, b, cosine = counterfactual.most_similar_pair(similar, 1)
    assert (a, b) == (0, 3) and cosine > 0.99
    merged = counterfactual.merge(similar, 1, a, b)["block_1"]["moe"]["experts"]
    np.testing.assert_allclose(merged["w1"][0], merged["w1"][3])
    np.testing.assert_allclose(merged["w1"][0], (experts["w1"][0] + experts["w1"][3]) / 2, rtol=1e-6)


def test_interventions_change_the_loss_and_the_binary_writes_the_table(finished_run, tmp_path):
    workdir, summary = finished_run
    run = counterfactual.load_run(str(workdir), max_batches=3)
    rows = counterfactual.run_interventions(run, log=lambda line: None)
    assert rows[0]["delta"] == 0.0
    knock = [r for r in rows if r["kind"] == "knockout"]
    assert len(knock) == 4 and all(r["delta"] != 0.0 for r in knock)  # every expert serves some token
    assert {r["intervention"] for r in rows if r["kind"] == "routing"} >= {"deterministic routing",
                                                                           "no token dropped", "k=2"}
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "counterfactual.py"), f"--workdir={workdir}",
                          "--max_batches=2", "--kinds=routing,merge", f"--out={tmp_path}"],
                         env=binary_env(8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "counterfactual.md").read_text()
    assert "| deterministic routing |" in table and "merged (cosine" in table
    assert json.loads((tmp_path / "counterfactual.json").read_text())[0]["kind"] == "none"
    bad = subprocess.run([sys.executable, str(ROOT / "experiments" / "counterfactual.py"), f"--workdir={workdir}",
                          "--kinds=knockout,nonsense"], env=binary_env(8), capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "nonsense" in bad.stderr
