"""Fault injection on a training run: SIGKILL at random moments (also while a checkpoint is being
written) and damaged checkpoint files; the run ends where an uninterrupted one ends, and never
trains on a partial or damaged checkpoint."""

import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import binary_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 30


def _cmd(workdir, stop_after=0):
    return [sys.executable, str(ROOT / "experiments" / "train.py"),
            f"--config={ROOT / 'experiments' / 'configs' / 'moe.py'}:micro", f"--workdir={workdir}",
            f"--config.total_steps={STEPS}", f"--config.stop_after_steps={stop_after}", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=2", "--config.eval_every_steps=10", "--config.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def env():
    return binary_env()  # every process compiles the same programs: once, through the shared cache


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    subprocess.run(_cmd(workdir), check=True, env=env, capture_output=True)
    return _records(workdir)


def _records(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(records, straight):
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == [r["loss"] for r in straight]  # bit for bit
    assert [r.get("val_loss") for r in records] == [r.get("val_loss") for r in straight]


def _saving(checkpoints):
    return [p for p in checkpoints.glob("*.orbax-checkpoint-tmp*")] if checkpoints.exists() else []


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_save(env, straight, tmp_path):
    workdir, rng = tmp_path / "run", random.Random(0)
    checkpoints, logs, mid_save = workdir / "checkpoints", [], 0
    for attempt in range(6):
        log = tmp_path / f"attempt{attempt}.log"
        logs.append(log)
        with open(log, "w") as out:
            proc = subprocess.Popen(_cmd(workdir), env=env, stdout=out, stderr=subprocess.STDOUT)
        done = len(_records(workdir)) if (workdir / "metrics.jsonl").exists() else 0
        target = done + rng.randint(1, 4)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if attempt % 2 == 0 and _saving(checkpoints):  # a checkpoint is being written
                break
            if attempt % 2 == 1 and (workdir / "metrics.jsonl").exists() and len(_records(workdir)) >= target:
                time.sleep(rng.uniform(0, 0.2))
                break
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        mid_save += bool(_saving(checkpoints))
        if proc.returncode != -signal.SIGKILL:
            break  # the run finished first
    assert mid_save >= 1, "no kill landed while a checkpoint was being written"
    subprocess.run(_cmd(workdir), check=True, env=env, stdout=open(tmp_path / "final.log", "w"),
                   stderr=subprocess.STDOUT)
    _assert_same_run(_records(workdir), straight)
    for log in [*logs, tmp_path / "final.log"]:
        assert "corrupt" not in log.read_text(), log  # no restart met a partial checkpoint
    assert not (checkpoints / "corrupt").exists()


@pytest.mark.slow
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(env, straight, tmp_path):
    workdir = tmp_path / "run"
    subprocess.run(_cmd(workdir, stop_after=12), check=True, env=env, capture_output=True)
    newest = workdir / "checkpoints" / "12"
    chunk = max((p for p in (newest / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: Orbax alone would read it back as a wrong value
    chunk.write_bytes(bytes(data))
    result = subprocess.run(_cmd(workdir), check=True, env=env, capture_output=True, text=True)
    assert "checkpoint step 12" in result.stderr and "resuming from step 10" in result.stderr
    _assert_same_run(_records(workdir), straight)
