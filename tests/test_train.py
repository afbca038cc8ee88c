"""The training binary and loop: every config trains, resume is exact (also after SIGKILL), errors are clear."""

import importlib.util
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import load_config_file
from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config as config_lib
from moe_jax import run_config, trainer
from conftest import binary_env
from tests.helpers import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / "experiments" / "configs").glob("*.py") if not p.stem.startswith("_"))


def load_config(name, arg="tiny"):
    return load_config_file(name, arg)


def small(config, steps=2):
    """Shrinks a tiny config so a step costs milliseconds."""
    config.total_steps = steps
    config.log_every_steps = 1
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    config.eval_batches = 1
    config.data.batch_size = 8  # divisible by the 8 test devices (data parallel)
    config.data.seq_len = 32
    config.data.max_bytes = 1 << 19
    config.model.num_layers = 4
    config.model.hidden_size = 32
    config.model.num_heads = 2
    config.model.ffn_size = 64
    config.model.max_seq_len = 32
    experts = str(config.moe.experts)
    if "," in experts:  # pyramid lists name every MoE layer: 2 of them now
        config.moe.experts = "2x1,4x1"
    return config


def test_every_config_has_docstring_and_all_scales():
    assert set(CONFIGS) >= {"dense", "moe", "top2", "residual", "pyramid", "pr_moe", "first_half", "second_half"}
    for name in CONFIGS:
        spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert "experiments/train.py --config=experiments/configs/" in module.__doc__, name
        for scale in run_config.SCALES:
            run_config.validate(module.get_config(scale))


# The configs' models are the presets (at the run's max_seq_len and compute dtype): nothing restated.
CONFIG_PRESETS = {
    "dense:tiny": "tiny", "moe:tiny": "tiny+moe", "top2:tiny": "tiny+top2", "residual:tiny": "tiny+residual",
    "pyramid:tiny": "tiny+pyramid", "pr_moe:tiny": "tiny+pr-moe", "mos:tiny": "tiny-mos",
    "first_half:tiny": "tiny+first-half", "second_half:tiny": "tiny+second-half", "dense:350m": "350m",
    "moe:350m": "350m+moe-128", "pr_moe:350m": "350m+pr-moe-32/64", "mos:350m": "350m-mos",
    "moe:1.3b": "1.3b+moe-128", "pr_moe:1.3b": "1.3b+pr-moe-64/128", "mos:1.3b": "1.3b-mos",
}


@pytest.mark.parametrize("config_arg", sorted(CONFIG_PRESETS))
def test_configs_build_the_presets(config_arg):
    name, arg = config_arg.split(":")
    scale = run_config.SCALES[arg]
    expected = config_lib.preset(CONFIG_PRESETS[config_arg]).replace(max_seq_len=scale.seq_len,
                                                                   compute_dtype=scale.compute_dtype)
    assert run_config.model_config(load_config(name, arg)) == expected


def test_progress_line():
    line = trainer.progress_line(120, 300, 200, 2.64312, 15204.4, 0.5)
    assert line == "step 120/300  loss 2.6431  15,204 tokens/s  ETA 0:00:40"  # 80 steps left at 0.5 s
    assert trainer.progress_line(1, 10, 10, 3.0, float("nan"), float("nan")).endswith("ETA -")


# dense, pr_moe and mos run by default; the other configs' single steps are in the slow suite.
STEP_CONFIGS = [name if name in ("dense", "pr_moe", "mos") else pytest.param(name, marks=pytest.mark.slow)
                for name in CONFIGS]


@pytest.mark.parametrize("name", STEP_CONFIGS)
def test_one_training_step_of_every_config(name, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    config = small(load_config(name), steps=1)
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    assert any(record.getMessage().startswith("step 1/1  loss ") for record in caplog.records)
    assert np.isfinite(summary["val_loss"])
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "val_loss", "val_bpb"):
        assert key in records[0], key
    if name != "dense":
        assert any(k.startswith("moe/layer") and k.endswith("load_imbalance") for k in records[0])
    assert (tmp_path / "config.json").exists() and (tmp_path / "results.json").exists()
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.slow  # resume is also held equal to a straight run after a real SIGKILL, in the default suite
def test_resume_in_process_equals_straight_run(tmp_path):
    straight = small(load_config("pr_moe"), steps=8)
    straight.checkpoint_every_steps = 2
    trainer.train_and_evaluate(straight, str(tmp_path / "straight"))
    split = small(load_config("pr_moe"), steps=8)
    split.checkpoint_every_steps = 2
    split.stop_after_steps = 4
    trainer.train_and_evaluate(split, str(tmp_path / "split"))
    split.stop_after_steps = 0
    trainer.train_and_evaluate(split, str(tmp_path / "split"))
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert a[-1]["val_loss"] == b[-1]["val_loss"]


def _train_cmd(workdir, steps, stop_after):
    return [sys.executable, str(ROOT / "experiments" / "train.py"),
            f"--config={ROOT / 'experiments' / 'configs' / 'moe.py'}:tiny", f"--workdir={workdir}",
            f"--config.total_steps={steps}", f"--config.stop_after_steps={stop_after}",
            "--config.log_every_steps=1", "--config.checkpoint_every_steps=3", "--config.eval_every_steps=1000",
            "--config.eval_batches=1", "--config.data.batch_size=4", "--config.data.seq_len=32",
            "--config.data.max_bytes=524288", "--config.model.num_layers=2", "--config.model.hidden_size=32",
            "--config.model.num_heads=2", "--config.model.ffn_size=64", "--config.model.max_seq_len=32",
            "--config.moe.experts=4"]


@pytest.mark.slow  # the default run kills a training with SIGKILL in test_experiments' killed-midway suite
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    steps, stop = 100, 40
    env = binary_env()
    subprocess.run(_train_cmd(tmp_path / "straight", steps, stop), check=True, env=env, capture_output=True)
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(workdir, steps, stop), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = workdir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    subprocess.run(_train_cmd(workdir, steps, stop), check=True, env=env, capture_output=True)
    a, b = read_metrics(tmp_path / "straight"), read_metrics(workdir)
    assert [r["step"] for r in b] == list(range(1, stop + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def _run_train(*extra):
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"),
           f"--config={ROOT / 'experiments' / 'configs' / 'moe.py'}:tiny", "--workdir=/tmp/moe_jax_bad_run", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("extra,message", [
    (["--config.data.path=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["--config.moe.capacity_factor=0"], "moe.capacity_factor"),
    (["--config.moe.experts=4x3"], "moe.experts"),
])
def test_bad_inputs_give_one_clear_line(extra, message):
    result = _run_train(*extra)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_unknown_override_is_rejected():
    result = _run_train("--config.moe.capacity_factr=2")
    assert result.returncode != 0
    assert "capacity_factr" in result.stderr and "Traceback" not in result.stderr


def test_unreadable_token_file(tmp_path):
    bad = tmp_path / "tokens.bin"
    bad.write_bytes(b"\x01\x02\x03")  # odd size: not uint16
    result = _run_train(f"--config.data.path={bad}")
    assert result.returncode == 1 and str(bad) in result.stderr


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    config = small(load_config("moe"), steps=6)
    config.checkpoint_every_steps = 2
    config.optim.learning_rate = 1e30
    config.optim.min_learning_rate = 1e29
    config.optim.warmup_steps = 0
    config.optim.clip_norm = 1e30
    with pytest.raises(trainer.TrainingError, match=r"at step \d+"):
        trainer.train_and_evaluate(config, str(tmp_path))


def test_start_order_workdir_then_init_from(tmp_path):
    """A run with init_from starts from the other run's parameters (the first step has learning
    rate 0, so its step-1 checkpoint holds them unchanged) with a fresh optimizer; its own
    checkpoint then comes first; another architecture is a clear error."""
    source = small(load_config("moe"), steps=2)
    trainer.train_and_evaluate(source, str(tmp_path / "source"))
    source_params, _ = checkpoint_lib.load_params(str(tmp_path / "source"))

    config = small(load_config("moe"), steps=2)
    config.checkpoint_every_steps = 1
    config.stop_after_steps = 1
    config.init_from = str(tmp_path / "source")
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert read_metrics(tmp_path / "run")[0]["lr"] == 0
    params, step = checkpoint_lib.load_params(str(tmp_path / "run"))
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, params, source_params)

    config.stop_after_steps = 0
    config.init_from = str(tmp_path / "nothing")  # not read: the workdir's own checkpoint comes first
    assert trainer.train_and_evaluate(config, str(tmp_path / "run"))["steps"] == 2

    wider = small(load_config("moe"), steps=1)
    wider.model.ffn_size = 128
    wider.init_from = str(tmp_path / "source" / "checkpoints")
    with pytest.raises(ValueError, match=r"config.init_from=.*source/checkpoints.*block_0/mlp/b1 has shape "
                                         r"\(64,\) there but \(128,\) in this model"):
        trainer.train_and_evaluate(wider, str(tmp_path / "wider"))
    empty = small(load_config("moe"), steps=1)
    empty.init_from = str(tmp_path / "wider")
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        trainer.train_and_evaluate(empty, str(tmp_path / "empty"))


@pytest.mark.parametrize("field,value", [("seed", 1), ("data.batch_size", 16), ("data.seq_len", 16)])
def test_resume_checks_the_data_position(field, value, tmp_path):
    config = small(load_config("dense"), steps=2)
    config.checkpoint_every_steps = 1
    config.stop_after_steps = 1
    trainer.train_and_evaluate(config, str(tmp_path))
    *group, name = field.split(".")
    (config.data if group else config)[name] = value
    config.stop_after_steps = 0
    with pytest.raises(ValueError, match=rf"trained with {field}=\d+, this run has {field}={value}.*"
                                         rf"--config.{field}="):
        trainer.train_and_evaluate(config, str(tmp_path))
