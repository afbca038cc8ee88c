"""Routing traces: codes, replay of a layer against a loop reference, on a mesh, and record / replay
of whole training runs (moe_jax.routing_trace)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config, parallel, routing_trace, trainer
from moe_jax import moe as moe_lib
from tests.helpers import ffn_reference, losses, moe_layer_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (router, k, capacity factor, use_rts, drop_policy): top-1 with RTS drops, top-2 and top-3 with
# drops, expert-choice
ROUTERS = [("topk", 1, 0.5, True, "probs"), ("topk", 2, 0.6, False, "probs"), ("topk", 3, 0.5, False, "position"),
           ("expert_choice", 1, 1.0, False, "probs")]


def _moe(router, k, cf, rts, policy, path="gather"):
    return config.MoEConfig(experts="6", router=router, k=k if router == "topk" else 1, capacity_factor=cf,
                            eval_capacity_factor=cf, min_capacity=1, use_rts=rts, drop_policy=policy, dispatch=path)


def _replay_reference(params, x, code, capacity, renormalise):
    """Loop reference of a replayed layer: copy (s, c) goes to expert e = decode(code); copies are
    processed in (column, token) order until the expert holds `capacity`; weight = the gate's
    softmax probability of e (renormalised over the token's processed copies for top-k, k >= 2)."""
    x = np.asarray(x, np.float64)
    logits = np.asarray(np.asarray(x, np.float32) @ np.asarray(params["gate"]["kernel"], np.float32), np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    expert, recorded = routing_trace.decode(np.asarray(code))
    num_tokens, k = code.shape
    fill = np.zeros(probs.shape[1], int)
    processed = np.zeros((num_tokens, k), bool)
    for c in range(k):
        for s in range(num_tokens):
            if recorded[s, c] and fill[expert[s, c]] < capacity:
                processed[s, c] = True
                fill[expert[s, c]] += 1
    y = np.zeros_like(x)
    for s in range(num_tokens):
        weights = np.array([probs[s, expert[s, c]] if processed[s, c] else 0.0 for c in range(k)])
        if renormalise and weights.sum() > 0:
            weights = weights / weights.sum()
        for c in range(k):
            if processed[s, c]:
                y[s] += weights[c] * ffn_reference(params["experts"], expert[s, c], x[s])
    return y, processed


def test_codes_round_trip():
    expert = jnp.array([[0, 3], [2, 1], [5, 0]], jnp.int32)
    kept = jnp.array([[True, False], [True, True], [False, False]])
    routing = moe_lib.routing_lib.Routing(
        expert_index=expert, slot=jnp.zeros_like(expert), weight=jnp.ones((3, 2)), kept=kept,
        aux_loss=jnp.zeros(()), z_loss=jnp.zeros(()), expert_counts=jnp.zeros(6, jnp.int32),
        dropped_fraction=jnp.zeros(()), gate_fraction=jnp.zeros(6), token_fraction=jnp.zeros(6), capacity=2,
        num_experts=6)
    code = routing_trace.encode(routing)
    np.testing.assert_array_equal(code, [[0, -4], [2, 1], [-6, -1]])
    back_expert, back_kept = routing_trace.decode(code)
    np.testing.assert_array_equal(back_expert, expert)
    np.testing.assert_array_equal(back_kept, kept)


@pytest.mark.parametrize("router,k,cf,rts,policy", ROUTERS)
@pytest.mark.parametrize("path", ["gather", "einsum", "dropless"])
def test_replaying_a_layers_own_code_reproduces_it(router, k, cf, rts, policy, path):
    moe = _moe(router, k, cf, rts, policy, path)
    params = moe_layer_params(6, 8, 16, seed=1)
    x = jax.random.normal(jax.random.key(2), (3, 10, 8))
    rng = jax.random.key(3)
    y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, rng=rng, record=True)
    code = stats.pop("routing_code")
    assert code.shape == (3, 10, k if router == "topk" else 6)
    y2, stats2 = moe_lib.moe_forward(params, x, moe=moe, train=True, rng=rng, replay=code, record=True)
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(stats2.pop("routing_code"), code)
    for name in stats:
        np.testing.assert_allclose(stats2[name], stats[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("router,k,cf,rts,policy", ROUTERS)
def test_replaying_another_gates_code_equals_the_loop_reference(router, k, cf, rts, policy):
    """The code of one gate replayed through another gate's layer: the recorded experts process the
    tokens (up to capacity), weighted by the replaying gate's probabilities."""
    moe = _moe(router, k, cf, rts, policy)
    recorder = moe_layer_params(6, 8, 16, seed=4)
    params = moe_layer_params(6, 8, 16, seed=5)  # another gate: its own choice differs
    x = jax.random.normal(jax.random.key(6), (40, 8))
    _, stats = moe_lib.moe_forward(recorder, x, moe=moe, train=True, rng=jax.random.key(7), record=True)
    code = stats["routing_code"]
    own = moe_lib.route(params["gate"], x, moe=moe, train=True, rng=jax.random.key(7))
    assert not np.array_equal(np.asarray(routing_trace.encode(own)), np.asarray(code))  # a real replacement
    y, replay_stats = moe_lib.moe_forward(params, x, moe=moe, train=True, rng=jax.random.key(7), replay=code,
                                          record=True)
    want, processed = _replay_reference(params, x, np.asarray(code), own.capacity, own.renormalized)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    expert, _ = routing_trace.decode(np.asarray(code))
    np.testing.assert_array_equal(replay_stats["kept_counts"], np.bincount(expert[processed], minlength=6))
    np.testing.assert_array_equal(replay_stats["routing_code"], np.where(processed, expert, -1 - expert))
    routed = expert[np.asarray(code) >= 0] if router == "expert_choice" else expert
    np.testing.assert_array_equal(replay_stats["expert_counts"], np.bincount(routed.reshape(-1), minlength=6))
    np.testing.assert_allclose(replay_stats["aux_loss"], own.aux_loss, rtol=1e-6)  # the gate's own balance loss


def test_replayed_copies_past_capacity_are_dropped_and_counted():
    moe = _moe("topk", 1, 1.0, False, "probs")  # capacity ceil(12 / 6) = 2
    params = moe_layer_params(6, 8, 16, seed=8)
    x = jax.random.normal(jax.random.key(9), (12, 8))
    code = jnp.zeros((12, 1), jnp.int32)  # every token to expert 0
    y, stats = moe_lib.moe_forward(params, x, moe=moe, train=True, replay=code, record=True)
    np.testing.assert_array_equal(stats["routing_code"][:, 0], [0, 0] + [-1] * 10)
    assert int(stats["kept_counts"][0]) == 2 and int(stats["kept_counts"].sum()) == 2
    np.testing.assert_allclose(stats["dropped_fraction"], 10 / 12, rtol=1e-6)
    np.testing.assert_array_equal(stats["expert_counts"], [12, 0, 0, 0, 0, 0])  # the trace's routed copies
    np.testing.assert_array_equal(y[2:], 0)


def test_a_code_of_another_shape_is_a_clear_error():
    moe = _moe("topk", 2, 1.0, False, "probs")
    params = moe_layer_params(6, 8, 16, seed=1)
    x = jax.random.normal(jax.random.key(2), (10, 8))
    with pytest.raises(ValueError, match=r"shape \(10, 1\).*routes \(10, 2\)"):
        moe_lib.moe_forward(params, x, moe=moe, train=False, replay=jnp.zeros((10, 1), jnp.int32))


@pytest.mark.parametrize("path", ["gather", "dropless"])
def test_record_and_replay_on_a_mesh(path):
    """On (1, 8, 1) the recorded code is the per-shard routing's; replaying it there reproduces the
    layer, and replaying a code from another gate equals the one-device replay when nothing
    overflows (no-drop capacity)."""
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    moe = _moe("topk", 2, 1.0, False, "probs", path)
    params = moe_layer_params(8, 8, 16, seed=10)
    x = jax.random.normal(jax.random.key(11), (8, 6, 8))
    fn = jax.jit(lambda p, x, code: moe_lib.moe_forward(p, x, moe=moe, train=True, rng=jax.random.key(1),
                                                        parallel=par, replay=code, record=True))
    y, stats = fn(params, x, None)
    y2, stats2 = fn(params, x, stats["routing_code"])
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(stats2["routing_code"], stats["routing_code"])
    nodrop = config.replace_moe(config.ModelConfig(moe=moe), drop_tokens=False, row_exchange_factor=float("inf")).moe
    other = moe_layer_params(8, 8, 16, seed=12)
    code = stats["routing_code"]
    y_mesh, _ = jax.jit(lambda p, x, c: moe_lib.moe_forward(p, x, moe=nodrop, train=False, parallel=par, replay=c))(
        other, x, code)
    y_one, _ = moe_lib.moe_forward(other, x, moe=nodrop, train=False, replay=code)
    np.testing.assert_allclose(y_mesh, y_one, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------

def _micro(steps=4, **top):
    from experiments.configs import load_config_file

    c = load_config_file("top2", "micro")
    c.total_steps, c.log_every_steps, c.eval_batches = steps, 1, 1
    c.eval_every_steps = c.checkpoint_every_steps = 2
    for name, value in top.items():
        c[name] = value
    return c


def _trace(workdir, steps):
    reader = routing_trace.TraceReader(str(workdir))
    return [reader.codes(step) for step in steps]


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A 4-step run recorded with record_routing, cut off after step 2 and resumed, evaluated (and its
    probe recorded) at every step."""
    workdir = tmp_path_factory.mktemp("recording")
    config = _micro(record_routing=True, stop_after_steps=2)
    config.eval_every_steps = 1
    trainer.train_and_evaluate(config, str(workdir))
    config.stop_after_steps = 0
    trainer.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.mark.xdist_group("recording")  # one worker trains the shared recording once
def test_a_replayed_run_follows_the_recording(recording, tmp_path):
    """With the same seed the replayed run repeats the recording's losses; with another seed
    (another gate, other batches) its routing is still the recording's, step by step."""
    recorded = _trace(recording, range(1, 5))
    assert set(recorded[0]) == {"block_1", "block_3"} and recorded[0]["block_1"].shape == (8, 32, 2)

    same = _micro(replay_routing=str(recording))
    same.eval_every_steps = 1
    trainer.train_and_evaluate(same, str(tmp_path / "same"))
    # the same numbers up to float rounding (the replayed weights are computed by other fused ops)
    np.testing.assert_allclose(list(losses(tmp_path / "same").values()), list(losses(recording).values()), rtol=1e-5)

    other = _micro(replay_routing=str(recording), record_routing=True, seed=5)
    trainer.train_and_evaluate(other, str(tmp_path / "other"))
    followed = _trace(tmp_path / "other", range(1, 5))
    for step in range(4):
        for block in ("block_1", "block_3"):  # 8 x 32 x 2 choices each: no coincidence
            want_expert, _ = routing_trace.decode(recorded[step][block])
            got_expert, _ = routing_trace.decode(followed[step][block])
            np.testing.assert_array_equal(got_expert, want_expert)
    # its own gate, on the probe batch (not replayed), chooses otherwise
    own = routing_trace.read_probes(str(tmp_path / "other"))[-1]["layers"]["block_1"]
    assert not np.array_equal(own, routing_trace.read_probes(str(recording))[-1]["layers"]["block_1"])

    with pytest.raises(ValueError, match="config.replay_routing=.*has no step 5 .*covers steps 1..4"):
        trainer.train_and_evaluate(_micro(steps=6, replay_routing=str(recording)), str(tmp_path / "longer"))
    with pytest.raises(FileNotFoundError, match="config.replay_routing=.*record_routing=True"):
        trainer.train_and_evaluate(_micro(replay_routing=str(tmp_path / "same")), str(tmp_path / "a"))


@pytest.mark.xdist_group("recording")
def test_probes_and_the_routing_analysis(recording):
    probes = routing_trace.read_probes(str(recording))
    assert [p["step"] for p in probes] == [1, 2, 3, 4] and probes[0]["layers"]["block_3"].shape == (8, 32, 2)
    assert probes[0]["num_experts"] == {"block_1": 8, "block_3": 8}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "routing_analysis.py"),
                          f"--workdir={recording}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    analysis = json.loads((recording / "routing" / "analysis.json").read_text())
    assert analysis["steps"] == [1, 2, 3, 4]
    layer = analysis["layers"]["block_1"]
    assert len(layer["load"]) == 4 and len(layer["load"][0]) == 8  # 4 probes x 8 experts
    np.testing.assert_allclose([sum(row) for row in layer["load"]], 1.0, rtol=1e-6)
    assert len(layer["changed_fraction"]) == 3 and all(0 <= v <= 1 for v in layer["changed_fraction"])
    assert set(layer["top_bytes"]) == {str(e) for e in range(8)}
    assert sum(count for e in layer["top_bytes"] for _, count in layer["top_bytes"][e]) > 0
    assert [p[0] for p in analysis["dropped"]["block_3"]] == [1, 2, 3, 4]  # every logged step
    for name in ("load_block_1.png", "stability.png", "dropped.png"):
        assert (recording / "routing" / name).stat().st_size > 1000
    assert "routing stability" in out.stdout
