"""The final evaluation on the whole test split: every target once, equal to a per-window loop,
and reproducible from a finished run's folder with no training (experiments/evaluate.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config as config_lib
from moe_jax import data as data_lib
from moe_jax import model as model_lib
from moe_jax import train_lib, trainer
from moe_jax.run_config import default_config
from tests.conftest import binary_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_masked_whole_split_loss_equals_a_per_window_loop():
    """The batched, padded, masked evaluation of a micro MoE equals one forward pass per window
    (the last window partial, unpadded), with the same routing key per batch row group."""
    cfg = config_lib.ModelConfig(vocab_size=64, num_layers=2, hidden_size=16, num_heads=2, ffn_size=32,
                                 max_seq_len=8, moe=config_lib.MoEConfig(experts=4, k=1, drop_tokens=False,
                                                                         use_rts=False))
    params = model_lib.init_params(jax.random.key(0), cfg)
    tokens = np.random.default_rng(0).integers(0, 64, 61).astype(np.uint16)  # 60 targets: 7 full windows + 4
    batches = data_lib.split_batches(tokens, batch_size=3, seq_len=8)
    step = jax.jit(lambda p, b: train_lib.eval_step(p, b, None, model_cfg=cfg))
    outs = [step(params, b) for b in batches]
    loss = sum(float(o["nll_sum"]) for o in outs) / sum(float(o["tokens"]) for o in outs)
    assert sum(float(o["tokens"]) for o in outs) == 60
    nll = 0.0
    for start in range(0, 60, 8):  # no dropping, deterministic routing: windows are independent
        inputs = jnp.asarray(tokens[start:min(start + 8, 60)], jnp.int32)[None]
        targets = jnp.asarray(tokens[start + 1:min(start + 9, 61)], jnp.int32)[None]
        logits, _ = model_lib.apply(params, inputs, cfg, train=False)
        nll += float(-jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)))
    np.testing.assert_allclose(loss, nll / 60, rtol=1e-5)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("micro_run"))
    config = default_config("micro", {"micro": "tiny+moe"})
    summary = trainer.train_and_evaluate(config, workdir)
    return workdir, config, summary


def test_a_finished_run_reports_its_test_loss_and_corpus(micro_run):
    workdir, config, summary = micro_run
    assert summary["steps"] == config.total_steps
    splits = summary["corpus_identity"]["splits"]
    assert summary["test_tokens"] == splits["test"]["tokens"] - 1  # every target of the split, once
    assert summary["test_windows"] == -(-summary["test_tokens"] // config.data.seq_len)
    assert np.isfinite(summary["test_loss"]) and summary["test_eval_s"] > 0
    assert abs(summary["test_bpb"] - summary["test_loss"] / np.log(2)) < 1e-9
    assert len({splits[name]["sha256"] for name in splits}) == 3
    on_disk = json.loads(open(os.path.join(workdir, "results.json")).read())
    assert on_disk["test_loss"] == summary["test_loss"]


def test_evaluate_binary_repeats_the_test_loss_without_training(micro_run):
    workdir, _, summary = micro_run
    checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"), f"--workdir={workdir}"],
                          cwd=ROOT, env=binary_env(devices=jax.device_count()), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"test loss {summary['test_loss']:.4f}" in proc.stdout
    again = json.loads(open(os.path.join(workdir, "results.json")).read())
    assert again["test_loss"] == summary["test_loss"] and again["steps"] == summary["steps"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints  # nothing trained or saved


def test_evaluate_refuses_an_unfinished_run(tmp_path):
    config = default_config("micro", {"micro": "tiny+moe"})
    config.stop_after_steps = 3
    trainer.train_and_evaluate(config, str(tmp_path))
    with pytest.raises(ValueError, match="is at step 3 of 6: finish it first"):
        trainer.evaluate_run(str(tmp_path))


def test_evaluate_on_another_device_count_says_so_and_keeps_the_checkpoints(micro_run):
    """A checkpoint saved on 8 devices read on 1 is not corrupt: a clear error, nothing moved."""
    workdir, _, _ = micro_run
    checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "evaluate.py"), f"--workdir={workdir}"],
                          cwd=ROOT, env=binary_env(devices=1), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "saved on another device topology" in proc.stderr and "device_count=N" in proc.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints


def test_a_run_reruns_bit_for_bit_from_its_recorded_config(micro_run, tmp_path):
    """The resolved config a run wrote (config.json) trains the same model to the same losses, to
    the last bit, in a fresh folder; the corpus is the same, split for split."""
    import ml_collections

    workdir, _, summary = micro_run
    recorded = json.loads(open(os.path.join(workdir, "config.json")).read())
    again = trainer.train_and_evaluate(ml_collections.ConfigDict(recorded["config"]), str(tmp_path))
    assert again["corpus_identity"] == summary["corpus_identity"]
    assert again["val_loss"] == summary["val_loss"] and again["test_loss"] == summary["test_loss"]
