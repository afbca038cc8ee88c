"""Tests for moe_jax.metrics (and the MoE load statistics of moe_jax.gating)."""
import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config as config_lib
from moe_jax import model as model_lib
from moe_jax import load_stats
from moe_jax.load_stats import expert_load_stats
from moe_jax import routing as routing_lib
from moe_jax.metrics import (
    MetricWriter,
    mfu,
    peak_flops_per_device,
    transformer_flops_per_token,
)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_tb_scalars(logdir):
    """{tag: [(step, value)]} from tensorboardX event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_write_jsonl_and_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    losses = rng.uniform(1.0, 5.0, size=3)
    with MetricWriter(tmp_path) as w:
        w.write(1, {"loss": np.float32(losses[0]), "lr": jnp.asarray(3e-4), "tokens": np.int64(4096)})
        w.write(2, {"loss": jnp.asarray(losses[1], jnp.bfloat16), "train": {"aux": float(losses[2])},
                    "phase": "eval", "ok": np.bool_(True)})
        w.write(np.int32(3), {"loss": float("nan"), "gnorm": np.float32(np.inf)})
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(losses[0], rel=1e-6)
    assert rows[0]["lr"] == pytest.approx(3e-4) and isinstance(rows[0]["lr"], float)
    assert rows[0]["tokens"] == 4096 and isinstance(rows[0]["tokens"], int)
    assert rows[1]["train/aux"] == losses[2] and rows[1]["phase"] == "eval" and rows[1]["ok"] is True
    assert rows[1]["loss"] == pytest.approx(losses[1], rel=1e-2)
    assert rows[2]["loss"] is None and rows[2]["gnorm"] is None  # non-finite -> null
    # strict JSON: no NaN/Infinity tokens
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text

    scalars = read_tb_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert scalars["loss"][0][1] == pytest.approx(losses[0], rel=1e-6)
    assert math.isnan(scalars["loss"][2][1])
    assert scalars["train/aux"] == [(2, pytest.approx(losses[2], rel=1e-6))]
    assert "phase" not in scalars and "ok" not in scalars


def test_write_config(tmp_path):
    cfg = {"model": {"num_experts": 8, "hidden": 64}, "lr": np.float32(0.5), "dtype": jnp.bfloat16,
           "path": tmp_path / "x", "layers": (1, 2)}
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_config(cfg)
    loaded = json.loads((tmp_path / "config.json").read_text())
    assert loaded["model"] == {"num_experts": 8, "hidden": 64}
    assert loaded["lr"] == 0.5 and loaded["layers"] == [1, 2]
    assert loaded["path"] == str(tmp_path / "x")
    assert "bfloat16" in loaded["dtype"]
    assert not os.path.exists(tmp_path / "tensorboard")


def test_resume_truncates_future_steps(tmp_path):
    rng = np.random.default_rng(1)
    with MetricWriter(tmp_path) as w:
        for step in range(10, 130, 10):  # logged up to 120, then killed
            w.write(step, {"loss": rng.uniform()})
    # Simulate a torn last line from the crash.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 130, "lo')
    with MetricWriter(tmp_path, resume_step=100) as w:  # checkpoint was at 100
        for step in range(110, 140, 10):
            w.write(step, {"loss": rng.uniform()})
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == list(range(10, 140, 10))
    # Reopening without resume_step appends.
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(140, {"loss": rng.uniform()})
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"] == 140


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricWriter(tmp_path / "w") as w:
        w.write(1, {"loss": 1.5})
        w.write_config({"a": 1})
    assert not os.path.exists(tmp_path / "w")


def test_write_after_close_raises(tmp_path):
    w = MetricWriter(tmp_path, tensorboard=False)
    w.close()
    w.close()
    with pytest.raises(RuntimeError):
        w.write(1, {"loss": 1.0})


def test_expert_load_stats_hand_example():
    counts = np.array([4, 0, 2, 6])  # mean 3, max 6, std sqrt(5)
    stats = expert_load_stats(counts)
    assert stats == {
        "load_imbalance": pytest.approx(2.0),
        "load_cv": pytest.approx(math.sqrt(5) / 3),
        "frac_experts_unused": pytest.approx(0.25),
        "load_min": 0.0, "load_median": 3.0, "load_max": 6.0, "dead_experts": 1,
    }
    kept = np.array([4, 0, 2, 4])
    assert expert_load_stats(counts, kept)["dropped_frac"] == pytest.approx(2 / 12)
    assert expert_load_stats(jnp.asarray(counts), capacity=4)["dropped_frac"] == pytest.approx(2 / 12)
    balanced = expert_load_stats(np.full(8, 5))
    assert balanced["load_imbalance"] == 1.0 and balanced["load_cv"] == 0.0
    assert math.isnan(expert_load_stats(np.zeros(4))["load_imbalance"])
    with pytest.raises(ValueError):
        expert_load_stats(counts, kept_counts=counts + 1)
    with pytest.raises(ValueError):
        expert_load_stats(counts, kept, capacity=4)


def test_flops_per_token_matches_the_compiled_training_pass():
    """6N + 12LHT against XLA's FLOP count of a dense GPT's jitted forward and backward pass. The
    attention term is a fifth of the total here, so leaving it out (or miscounting N) fails."""
    cfg = config_lib.ModelConfig(vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, ffn_size=256,
                                 max_seq_len=128, moe=None)
    params = model_lib.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (4, 129), 0, 256)
    grad_fn = jax.grad(lambda p: model_lib.lm_loss(model_lib.apply(p, tokens[:, :-1], cfg)[0], tokens[:, 1:]))
    cost = jax.jit(grad_fn).lower(params).compile().cost_analysis()
    xla_per_token = (cost[0] if isinstance(cost, list) else cost)["flops"] / tokens[:, 1:].size
    formula = transformer_flops_per_token(model_lib.count_params(cfg).active, 2, 64, 128)
    assert 12 * 2 * 64 * 128 > 0.15 * formula
    assert xla_per_token == pytest.approx(formula, rel=0.05)


def test_mfu():
    assert mfu(2.0, 3.0, 12.0) == 0.5
    assert math.isnan(mfu(1.0, 1.0, float("nan")))


class FakeDevice:
    def __init__(self, kind, platform="gpu"):
        self.device_kind, self.platform = kind, platform


def test_peak_flops_lookup():
    assert peak_flops_per_device(FakeDevice("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops_per_device(FakeDevice("NVIDIA H200")) == 989e12
    assert peak_flops_per_device(FakeDevice("NVIDIA A100-SXM4-80GB")) == 312e12
    assert peak_flops_per_device(FakeDevice("TPU v5 lite", "tpu")) == 197e12
    assert peak_flops_per_device(FakeDevice("cpu", "cpu")) == 100e9
    assert math.isnan(peak_flops_per_device(FakeDevice("Mystery Accelerator 9000")))
    assert peak_flops_per_device() == 100e9  # tests run on CPU devices



def test_load_percentiles_and_dead_experts():
    counts = np.array([0, 3, 9, 0, 4])
    stats = expert_load_stats(counts)
    assert (stats["load_min"], stats["load_median"], stats["load_max"]) == (0.0, 3.0, 9.0)
    assert stats["dead_experts"] == 2


def test_router_entropy_against_a_hand_computation():
    from moe_jax import gating

    logits = jax.random.normal(jax.random.key(3), (12, 5)) * 2.0
    routing = gating.top_k_gating(logits, k=1, capacity_factor=1.0)
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.mean(-(p * np.log(p)).sum(-1))
    np.testing.assert_allclose(routing_lib.routing_stats(routing)["router_entropy"], want, rtol=1e-5)
    uniform = gating.top_k_gating(jnp.zeros((4, 5)) + jax.random.normal(jax.random.key(4), (4, 5)) * 1e-6, k=1,
                                  capacity_factor=1.0)
    np.testing.assert_allclose(routing_lib.routing_stats(uniform)["router_entropy"], np.log(5), rtol=1e-5)


def test_dead_experts_are_counted_over_the_logging_window():
    """An expert idle at the logged step but busy earlier in the window is not dead; the load
    percentiles cover the whole window."""

    def step(counts):
        return {1: {"expert_counts": jnp.asarray(counts), "kept_counts": jnp.asarray(counts),
                    "dropped_fraction": jnp.float32(0), "unrouted_fraction": jnp.float32(0),
                    "router_entropy": jnp.float32(0.5)}}

    window = None
    for counts in ([4, 0, 0, 4], [3, 2, 0, 3], [8, 0, 0, 0]):
        window = load_stats.add_window_counts(window, step(counts))
    stats = load_stats.layer_stats(step([8, 0, 0, 0]), jax.device_get(window))["layer1"]
    assert stats["dead_experts"] == 1  # expert 2 only; expert 1 had tokens at the second step
    assert (stats["window_load_min"], stats["window_load_max"]) == (0.0, 15.0)
    assert stats["expert_counts"] == [8, 0, 0, 0] and stats["router_entropy"] == 0.5
