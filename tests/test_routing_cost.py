"""Routing-realistic exchange cost (moe_jax.routing_cost): a balanced trace costs what the balanced
router does, a hand-counted trace gives its counts, and the drops and overflow it predicts for a
mesh are the ones the sharded MoE layer reports when it replays the same trace there."""

import os

import jax
import numpy as np
import pytest

from moe_jax import moe as moe_lib
from moe_jax import parallel, routing_cost
from moe_jax.config import MoEConfig
from tests.helpers import moe_layer_params


def test_a_balanced_trace_costs_what_the_balanced_router_does():
    devices, experts, batch, length = 4, 8, 8, 16
    # every shard (2 sequences, 32 tokens) sends 4 tokens to each expert
    code = np.tile(np.arange(experts), batch * length // experts).reshape(batch, length, 1)
    cost = routing_cost.trace_cost(code, experts, devices, capacity_factor=1.0, min_capacity=0)
    assert cost["real"] == cost["balanced"]
    assert cost["real"].dropped_fraction == cost["real"].overflow_fraction == 0.0
    assert cost["real"].received_imbalance == 1.0 and cost["real"].buffer_useful_fraction == 1.0


def test_every_token_to_one_expert_is_counted_by_hand():
    code = np.zeros((4, 8, 1), np.int32)  # 32 tokens, all to expert 0; 2 shards of 16
    cost = routing_cost.trace_cost(code, 4, 2, capacity_factor=1.0, min_capacity=4, row_exchange_factor=2.0)
    real = cost["real"]
    assert (real.capacity, real.group, real.bound) == (4, 2, 16)
    assert real.dropped_fraction == 0.75  # 12 of each shard's 16 copies past C = 4
    assert real.buffer_useful_fraction == 8 / (2 * 4 * 4)
    assert real.overflow_fraction == 0.0  # 16 rows to device 0 fit the bound of 16
    assert (real.received_max, real.received_mean) == (32, 16.0) and real.expert_load_max_over_mean == 4.0
    tight = routing_cost.trace_cost(code, 4, 2, row_exchange_factor=1.0)["real"]
    assert tight.bound == 8 and tight.overflow_fraction == 0.5


def test_a_bad_shape_is_refused():
    with pytest.raises(ValueError, match="does not split into 3 shards"):
        routing_cost.trace_cost(np.zeros((4, 8, 1), np.int32), 4, 3)


@pytest.mark.parametrize("dispatch,k", [("gather", 1), ("gather", 2), ("dropless", 1)])
def test_predictions_equal_the_sharded_layer_replaying_the_trace(dispatch, k):
    """On (1, 8, 1) the layer replays a skewed trace: its dropped fraction (capacity) or overflow
    fraction (rows exchange) is the one routing_cost predicts for 8 devices."""
    experts, batch, length, model_dim = 8, 16, 12, 16
    rng = np.random.default_rng(3)
    skew = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.06, 0.05, 0.04])
    code = np.stack([rng.choice(experts, size=(batch, length), p=skew)] +
                    [rng.choice(experts, size=(batch, length)) for _ in range(k - 1)], axis=-1).astype(np.int32)
    if k == 2:  # a token's two experts differ
        code[..., 1] = np.where(code[..., 1] == code[..., 0], (code[..., 0] + 1) % experts, code[..., 1])
    moe = MoEConfig(experts=experts, k=k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                    use_rts=False, dispatch=dispatch, drop_tokens=dispatch != "dropless", row_exchange_factor=1.5)
    params = moe_layer_params(experts, model_dim, 24, seed=1)
    x = jax.random.normal(jax.random.key(2), (batch, length, model_dim))
    par = parallel.ParallelConfig(parallel.make_mesh(1, 8, 1))
    _, stats = jax.jit(lambda p, x, c: moe_lib.moe_forward(p, x, moe=moe, train=False, parallel=par, replay=c))(
        params, x, code)
    real = routing_cost.trace_cost(code, experts, 8, capacity_factor=1.0, min_capacity=0,
                                   row_exchange_factor=1.5)["real"]
    if dispatch == "dropless":
        assert real.overflow_fraction > 0
        np.testing.assert_allclose(float(stats["overflow_fraction"]), real.overflow_fraction, rtol=1e-6)
    else:
        assert real.dropped_fraction > 0
        np.testing.assert_allclose(float(stats["dropped_fraction"]), real.dropped_fraction, rtol=1e-6)


def test_the_binary_reads_a_runs_probes_and_writes_its_table(tmp_path):
    """experiments/routing_cost.py on a run folder: the run's config and its last probe, one row per
    (layer, device count), a markdown table and JSON."""
    import json
    import subprocess
    import sys

    from moe_jax import metrics, routing_trace, run_config
    from conftest import binary_env

    config = run_config.default_config("micro", {"tiny": "tiny+moe"})
    (tmp_path / metrics.CONFIG_FILE).write_text(json.dumps({"config": config.to_dict()}))
    experts = int(config.moe.experts)
    code = np.random.default_rng(0).integers(0, experts, size=(8, 16, 1)).astype(np.int32)
    for step in (3, 6):
        routing_trace.write_probe(str(tmp_path), step, np.zeros((8, 16), np.int32), {"block_1": code},
                                  {"block_1": experts})
    binary = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "routing_cost.py")
    result = subprocess.run([sys.executable, binary, f"--workdir={tmp_path}", "--devices=2,4"],
                            capture_output=True, text=True, env=binary_env())
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads((tmp_path / "routing_cost.json").read_text())
    assert [(r["step"], r["layer"], r["devices"]) for r in table] == [(6, "block_1", 2), (6, "block_1", 4)]
    want = routing_cost.trace_cost(code, experts, 4, capacity_factor=config.moe.eval_capacity_factor,
                                   min_capacity=config.moe.min_capacity,
                                   row_exchange_factor=config.moe.row_exchange_factor)["real"]
    assert table[1]["real_dropped_fraction"] == want.dropped_fraction
    assert "| 6 | block_1 |" in (tmp_path / "routing_cost.md").read_text()


def test_internode_rows_per_copy_and_once_per_node():
    """2 nodes of 2 devices, 4 experts (0, 1 on node 0; 2, 3 on node 1), top-2, batch of 4 (one
    sequence per device) of one token: sequences 0, 1 are on node 0, sequences 2, 3 on node 1."""
    code = np.array([[[2, 3]], [[0, 2]], [[2, 3]], [[0, 1]]], np.int32)
    rows = routing_cost.internode_rows(code, 4, 4, 2)
    # crossing copies: seq 0 both (2, 3), seq 1 one (2), seq 2 none, seq 3 both (0, 1) -> 5;
    # once per remote node: seq 0 once, seq 1 once, seq 3 once -> 3
    assert (rows.per_copy, rows.per_node, rows.max_nodes_per_token) == (5, 3, 2)
    assert rows.saved_fraction == 1 - 3 / 5
    top1 = routing_cost.internode_rows(code[..., :1], 4, 4, 2)
    assert top1.per_copy == top1.per_node == 2  # with one copy per token there is nothing to merge
