"""Mixture-of-Students: the KD loss against numpy, the schedules, a frozen teacher, the student's
shape and initialisation, exact resume, and the binary's errors."""

import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import load_config_file
from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config as config_lib
from moe_jax import distill
from moe_jax import model as model_lib
from moe_jax import run_config
from moe_jax import train_lib
from conftest import binary_env
from tests.helpers import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A 4-layer PR-MoE teacher ("2x1,4x1") and its 3-layer student ("4"), small enough for milliseconds a step.
TEACHER = config_lib.ModelConfig(vocab_size=64, num_layers=4, hidden_size=32, num_heads=2, ffn_size=64, max_seq_len=16,
                                 moe=config_lib.MoEConfig(experts="2x1,4x1", residual=True))
STUDENT = distill.student_config(TEACHER, 3)


def load_config(name, arg="tiny"):
    return load_config_file(name, arg)


# ----------------------------------------------------------------------------------------------
# Loss and schedule
# ----------------------------------------------------------------------------------------------

def _numpy_kd(student, teacher, temperature, mask):
    def log_softmax(z):
        z = z / temperature
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(teacher.astype(np.float64)), log_softmax(student.astype(np.float64))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return temperature ** 2 * (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    teacher = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    mask = (rng.random((2, 5)) > 0.4).astype(np.float32)
    mask[0, 0] = 1.0
    got = distill.kd_loss(jnp.asarray(student), jnp.asarray(teacher), temperature=temperature, mask=jnp.asarray(mask))
    np.testing.assert_allclose(got, _numpy_kd(student, teacher, temperature, mask), rtol=1e-5)
    unmasked = distill.kd_loss(jnp.asarray(student), jnp.asarray(teacher), temperature=temperature)
    np.testing.assert_allclose(unmasked, _numpy_kd(student, teacher, temperature, np.ones((2, 5))), rtol=1e-5)
    same = distill.kd_loss(jnp.asarray(teacher), jnp.asarray(teacher), temperature=temperature)
    assert float(same) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [1, 1, 1, 1, 1, 1, 1]),
    ("staged", [1, 1, 1, 1, 0, 0, 0]),
    ("linear_fade", [1, 0.75, 0.5, 0.25, 0, 0, 0]),
])
def test_kd_weight_schedules(schedule, expected):
    kd = distill.KDConfig(schedule=schedule, stop_step=0 if schedule == "constant" else 4)
    weights = jax.jit(lambda s: distill.kd_weight(s, kd))
    np.testing.assert_allclose([float(weights(jnp.int32(step))) for step in range(7)], expected)


@pytest.mark.parametrize("changes,message", [
    (dict(schedule="stepped"), "kd.schedule='stepped'"),
    (dict(schedule="staged", stop_step=0), "kd.stop_step=0"),
    (dict(temperature=0.0), "kd.temperature=0.0"),
    (dict(beta=-1.0), "kd.beta=-1.0"),
])
def test_bad_kd_settings_name_the_field(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distill.KDConfig(**changes)


def test_kd_group_of_a_config():
    config = load_config("mos")
    assert distill.kd_config(config) == distill.KDConfig(beta=1.0, temperature=1.0, schedule="staged", stop_step=210)
    config.total_steps = 1000  # the stop follows the run's length unless set
    assert distill.kd_config(config).stop_step == 700
    with pytest.raises(ValueError, match="lacks kd.beta, kd.temperature"):
        distill.kd_config(run_config.default_config("tiny"))


def test_hook_is_the_teachers_kd_term():
    teacher = TEACHER.replace(num_layers=1, moe=None)  # the hook's arithmetic; MoE teachers run below
    rng = np.random.default_rng(1)
    teacher_params = model_lib.init_params(jax.random.key(1), teacher)
    batch = {"inputs": jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32),
             "mask": jnp.asarray(rng.random((2, 8)) > 0.3, jnp.float32)}
    logits = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)
    kd = distill.KDConfig(beta=0.5, temperature=2.0, schedule="linear_fade", stop_step=4)
    term, metrics = jax.jit(distill.make_kd_hook(teacher, kd))(logits, batch, jnp.int32(1), teacher_params)
    teacher_logits, _ = jax.jit(functools.partial(model_lib.apply, cfg=teacher))(teacher_params, batch["inputs"])
    full = 0.5 * distill.kd_loss(logits, teacher_logits, temperature=2.0, mask=batch["mask"])
    np.testing.assert_allclose(metrics["kd_loss"], full, rtol=1e-6)
    assert float(metrics["kd_on"]) == 0.75
    np.testing.assert_allclose(term, 0.75 * full, rtol=1e-6)


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_teacher_runs_sharded_like_the_student(mesh):
    """On a mesh the KD term equals the single-device one, and the teacher's MoE layers run the
    expert-parallel exchange (all-to-alls in the compiled hook) on parameters split by the rules."""
    from moe_jax import parallel

    # no dropping: capacity is per shard, so only a no-drop teacher equals its single-device self
    teacher = TEACHER.replace(moe=config_lib.MoEConfig(experts="8x1,16x1", residual=True, drop_tokens=False))
    teacher_params = model_lib.init_params(jax.random.key(2), teacher)
    rng = np.random.default_rng(2)
    batch = {"inputs": jnp.asarray(rng.integers(0, 64, (8, 8)), jnp.int32)}
    logits = jnp.asarray(rng.normal(size=(8, 8, 64)), jnp.float32)
    kd = distill.KDConfig(beta=1.0, temperature=2.0, schedule="constant")
    _, want = jax.jit(distill.make_kd_hook(teacher, kd))(logits, batch, jnp.int32(1), teacher_params)
    par = parallel.ParallelConfig(parallel.make_mesh(*mesh))
    placed = jax.device_put(teacher_params, parallel.shardings(parallel.param_specs(teacher_params, par), par.mesh))
    hook = jax.jit(distill.make_kd_hook(teacher, kd, par))
    args = (logits, parallel.device_put_batch(batch, par), jnp.int32(1), placed)
    _, got = hook(*args)
    np.testing.assert_allclose(got["kd_loss"], want["kd_loss"], rtol=1e-5)
    assert "all-to-all" in hook.lower(*args).compile().as_text()
    experts = placed["block_1"]["moe"]["experts"]["w1"]
    assert experts.addressable_shards[0].data.shape[0] == 8 // par.expert_size


def test_train_steps_across_the_kd_stop():
    """Staged KD through jitted train steps (donating the state, as the trainer does): one trace,
    KD exactly on steps < stop_step."""
    teacher = student = distill.student_config(TEACHER, 2)  # layer experts (0, 4): one MoE layer each
    teacher_params = model_lib.init_params(jax.random.key(1), teacher)
    kd = distill.KDConfig(schedule="staged", stop_step=2)
    chex.clear_trace_counter()
    hook = chex.assert_max_traces(distill.make_kd_hook(teacher, kd), n=1)  # the KD switch is traced, not static
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(warmup_steps=0, total_steps=4))
    step_fn = jax.jit(functools.partial(train_lib.train_step, model_cfg=student, optimizer=optimizer,
                                        loss_hook=hook), donate_argnums=(0,))
    state = train_lib.init_state(jax.random.key(0), student, optimizer)
    rng = np.random.default_rng(2)
    records = []
    for _ in range(4):
        tokens = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
        state, metrics = step_fn(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, jax.random.key(3),
                                 teacher_params)
        records.append(jax.device_get(metrics))
    assert [float(r["kd_on"]) for r in records] == [1, 1, 0, 0]
    for r in records:
        lm = r["ce_loss"] + student.moe.aux_loss_coef * r["aux_loss"]
        np.testing.assert_allclose(r["loss"], lm + r["kd_on"] * r["kd_loss"], rtol=1e-6)
    assert all(r["kd_loss"] > 0 for r in records[:2]) and all(r["kd_loss"] == 0 for r in records[2:])


# ----------------------------------------------------------------------------------------------
# The student
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher,student,layers", [
    ("tiny+pr-moe", "tiny-mos", 7), ("350m+pr-moe-32/64", "350m-mos", 21), ("1.3b+pr-moe-64/128", "1.3b-mos", 21)])
def test_student_config_is_the_papers(teacher, student, layers):
    assert distill.student_config(config_lib.preset(teacher), layers) == config_lib.preset(student)


def test_mos_configs_build_the_preset_students():
    for scale, preset in (("tiny", "tiny-mos"), ("350m", "350m-mos"), ("1.3b", "1.3b-mos")):
        built = run_config.model_config(load_config("mos", scale))
        assert built.layer_experts() == config_lib.preset(preset).layer_experts(), scale
        assert built.moe.residual


def test_student_config_drops_the_lowest_expert_group_first():
    teacher = config_lib.ModelConfig(num_layers=8, moe=config_lib.MoEConfig(experts="8x1,4x2,16x1"))
    assert distill.student_config(teacher, 6).moe.experts == (8, 4, 16)
    assert distill.student_config(config_lib.preset("tiny+moe"), 5).layer_experts() == (0, 8, 0, 8, 0)
    with pytest.raises(ValueError, match="num_layers=9"):
        distill.student_config(teacher, 9)


def test_init_from_teacher_copies_the_chosen_layers():
    teacher_params = model_lib.init_params(jax.random.key(1), TEACHER)  # layer experts (0, 2, 0, 4)
    assert STUDENT.layer_experts() == (0, 4, 0)
    params = distill.init_from_teacher(teacher_params, STUDENT, distill.parse_layer_list("2,3,0"))
    for student_block, teacher_block in (("block_0", "block_2"), ("block_1", "block_3"), ("block_2", "block_0")):
        jax.tree.map(np.testing.assert_array_equal, params[student_block], teacher_params[teacher_block])
    np.testing.assert_array_equal(params["wte"], teacher_params["wte"])
    assert jax.tree.structure(params) == jax.tree.structure(model_lib.init_params(jax.random.key(0), STUDENT))
    with pytest.raises(ValueError, match="student block_1 cannot take teacher block_1"):
        distill.init_from_teacher(teacher_params, STUDENT, (0, 1, 2))
    with pytest.raises(ValueError, match="lists 2 layers for a student of 3"):
        distill.init_from_teacher(teacher_params, STUDENT, (0, 3))
    tiny_teacher = config_lib.preset("tiny+pr-moe").layer_experts()  # mos.py's docstring suggests "0,1,2,3,4,7,6"
    assert tuple(tiny_teacher[i] for i in (0, 1, 2, 3, 4, 7, 6)) == config_lib.preset("tiny-mos").layer_experts()
    with pytest.raises(ValueError, match="kd.init_from_teacher_layers='0,x'"):
        distill.parse_layer_list("0,x")


# ----------------------------------------------------------------------------------------------
# Runs: a trained teacher, an exactly resumable student, the binary's errors
# ----------------------------------------------------------------------------------------------

# The runs are subprocesses of the binaries: XLA's fast compile mode and a shared compilation cache
# make three student runs cost about one compile (the test file must stay under a minute on 2 cores).
SHRINK = ["--config.log_every_steps=1", "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=10",
          "--config.eval_batches=1", "--config.data.batch_size=4", "--config.data.seq_len=32",
          "--config.data.max_bytes=524288", "--config.model.hidden_size=32", "--config.model.num_heads=2",
          "--config.model.ffn_size=64", "--config.model.max_seq_len=32"]


def _run(binary, config, workdir, *extra):
    env = binary_env()
    cmd = [sys.executable, str(ROOT / "experiments" / binary), f"--config={ROOT / 'experiments' / 'configs' / config}",
           f"--workdir={workdir}", *SHRINK, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _distill(teacher_workdir, workdir, *extra):
    return _run("distill.py", "mos.py:tiny", workdir, f"--teacher_workdir={teacher_workdir}", "--config.total_steps=6",
                "--config.model.num_layers=3", "--config.moe.experts=4", *extra)


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
    """A 2-step PR-MoE teacher: 4 layers, experts (0, 2, 0, 4)."""
    workdir = tmp_path_factory.mktemp("teacher")
    result = _run("train.py", "pr_moe.py:tiny", workdir, "--config.total_steps=2", "--config.model.num_layers=4",
                  "--config.moe.experts=2x1,4x1")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_student_resumes_exactly_and_starts_from_the_teacher(teacher_workdir, tmp_path):
    """Staged KD (teacher until step 3 of 6), initialised from teacher layers: a run stopped at
    step 2 and rerun logs the same losses as a straight run, and KD switches off on schedule."""
    init = ("--config.kd.stop_step=3", "--config.kd.init_from_teacher_layers=2,3,0")
    # The straight run also checkpoints step 1: its first step has learning rate 0 (warmup from 0),
    # so that checkpoint holds the initial parameters.
    for workdir, extra in (("straight", "--config.checkpoint_every_steps=1"), ("split", "--config.stop_after_steps=2"),
                           ("split", "--config.stop_after_steps=0")):
        result = _distill(teacher_workdir, tmp_path / workdir, *init, extra)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit
    assert [r["kd_on"] for r in a] == [1, 1, 1, 0, 0, 0]
    assert all(r["kd_loss"] > 0 for r in a[:3]) and all(r["kd_loss"] == 0 for r in a[3:])
    assert a[-1]["val_loss"] == b[-1]["val_loss"]

    teacher_cfg = distill.load_teacher_config(str(teacher_workdir))
    assert teacher_cfg.layer_experts() == (0, 2, 0, 4)
    assert distill.teacher_checkpoint_step(str(teacher_workdir)) == 2
    teacher_params = distill.restore_teacher_params(str(teacher_workdir), teacher_cfg, 2)
    assert a[0]["lr"] == 0
    with checkpoint_lib.Checkpointer(tmp_path / "straight" / "checkpoints", read_only=True) as ckpt:
        initial = ckpt.restore_params(1)
    assert not any(name.isdigit() and int(name) == 0 for name in os.listdir(tmp_path / "straight" / "checkpoints"))
    for student_block, teacher_block in (("block_0", "block_2"), ("block_1", "block_3"), ("block_2", "block_0")):
        jax.tree.map(np.testing.assert_array_equal, initial[student_block], teacher_params[teacher_block])
    record = json.loads((tmp_path / "straight" / distill.TEACHER_RECORD).read_text())
    assert record["teacher_step"] == 2


def _one_error_line(result):
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_vocab_mismatch_is_one_clear_line(teacher_workdir, tmp_path):
    error = _one_error_line(_distill(teacher_workdir, tmp_path / "student", "--config.model.vocab_size=512"))
    assert "vocab_size=512" in error and "(256)" in error and "--config.model.vocab_size=256" in error
    assert not (tmp_path / "student").exists()  # failed before training started


def test_missing_teacher_checkpoint_is_one_clear_line(teacher_workdir, tmp_path):
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    shutil.copy(teacher_workdir / "config.json", untrained / "config.json")
    error = _one_error_line(_distill(untrained, tmp_path / "student"))
    assert f"--teacher_workdir={untrained} has no complete checkpoint" in error
    assert "experiments/train.py --config=experiments/configs/pr_moe.py:tiny" in error
    assert not (untrained / "checkpoints").exists()  # looking did not create it
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        distill.distill_and_evaluate(load_config("mos"), str(tmp_path / "student"), str(tmp_path / "nothing"))


def test_generate_runs_with_its_defaults_on_a_trained_run(teacher_workdir):
    """experiments/generate.py with only --workdir and --prompt fills what fits after the prompt in
    the model's max_seq_len (its old default, 128 new tokens, did not fit a 128-token model)."""
    env = binary_env()
    saved = json.loads((teacher_workdir / "config.json").read_text())
    prompt = "def main("
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "generate.py"), f"--workdir={teacher_workdir}",
                             f"--prompt={prompt}"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    room = saved["model"]["max_seq_len"] - len(prompt)
    assert f"] {room} tokens at" in result.stderr
    assert result.stdout.startswith(prompt)
