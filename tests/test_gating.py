"""Routers against DeepSpeed's own outputs and against a plain per-token loop."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.gating import top_k_gating
from moe_jax.routing import compute_capacity

GOLDEN = pathlib.Path(__file__).parent / "data" / "deepspeed_gating.npz"


def _golden_cases():
    data = np.load(GOLDEN)
    for meta in json.loads(str(data["meta_json"])):
        prefix = f"case{meta['case']:03d}_"
        arrays = {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}
        yield pytest.param(meta, arrays, id=f"case{meta['case']:03d}-k{meta['k']}-S{meta['S']}-E{meta['E']}")


@pytest.mark.parametrize("meta,golden", list(_golden_cases()))
def test_matches_deepspeed_golden(meta, golden):
    extra = {}
    if meta["rts"]:
        extra["rts_scores"] = jnp.asarray(golden["rts_uniform"])
    if meta["second_expert_gumbel"]:
        extra["gumbel"] = jnp.asarray(golden["gumbel"])
    routing = top_k_gating(
        jnp.asarray(golden["logits"]), k=meta["k"], capacity_factor=meta["capacity_factor"],
        min_capacity=meta["min_capacity"], drop_tokens=meta["drop_tokens"], use_rts=meta["rts"],
        second_expert_sampling=meta["second_expert_gumbel"], drop_policy=meta["drop_policy"] or "probs",
        **extra)
    if meta["drop_tokens"]:
        assert routing.capacity == int(golden["capacity"])
    np.testing.assert_array_equal(routing.expert_counts, golden["exp_counts"])
    np.testing.assert_allclose(routing.aux_loss, golden["l_aux"], rtol=1e-5)
    # Compare in DeepSpeed's dense layout: the choice order of k>2 copies is not part of its output.
    size = max(routing.capacity, int(golden["route_locations"].max()) + 1)
    combine, dispatch = routing.to_dense(size)
    expected = np.zeros((meta["S"], meta["E"], size), np.float32)
    for choice in range(meta["k"]):
        for s in range(meta["S"]):
            e = golden["route_indices"][choice, s]
            if e >= 0:
                expected[s, e, golden["route_locations"][choice, s]] += golden["route_gates"][choice, s]
    np.testing.assert_allclose(combine, expected, atol=1e-6)
    np.testing.assert_array_equal(dispatch, expected != 0)
    if meta["k"] <= 2:  # first/second choice order is DeepSpeed's too
        np.testing.assert_array_equal(np.where(routing.kept, routing.expert_index, -1).T, golden["route_indices"])
        np.testing.assert_array_equal(routing.slot.T, golden["route_locations"])


def test_capacity_uses_float32_like_deepspeed():
    assert compute_capacity(35, 3, 1.2, 0) == 15  # exact arithmetic would give 14
    assert compute_capacity(64, 8, 1.0, 4) == 8
    assert compute_capacity(64, 8, 1.0, 4, k=2) == 16
    assert compute_capacity(4, 8, 1.0, 4) == 4  # min capacity


# ------------------------------------------------------------------------------------------------
# A plain per-token loop: DeepSpeed's rules written the slow, obvious way.
# ------------------------------------------------------------------------------------------------

def _softmax(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def loop_gating(logits, k, capacity, drop, rts_scores=None, gumbel=None, policy="probs"):
    """Returns per token a list of (expert, slot, weight) for kept copies, counts, aux."""
    S, E = logits.shape
    gates = _softmax(logits.astype(np.float64))
    if not drop:
        capacity = S
    if k == 1:
        choice = [[int(np.argmax(gates[s]))] for s in range(S)]
    elif k == 2:
        choice = []
        for s in range(S):
            first = int(np.argmax(gates[s]))
            noisy = logits[s] + (gumbel[s] if gumbel is not None else 0)
            second = max((e for e in range(E) if e != first), key=lambda e: (noisy[e], -e))
            choice.append([first, second])
    else:
        choice = [sorted(range(E), key=lambda e: (-logits[s, e], e))[:k] for s in range(S)]
    counts = np.zeros(E, int)
    for s in range(S):
        for e in choice[s]:
            counts[e] += 1
    keep = [[True] * k for _ in range(S)]
    if drop:
        if k == 1 and rts_scores is not None:
            for e in range(E):
                tokens = [s for s in range(S) if choice[s][0] == e]
                tokens.sort(key=lambda s: -rts_scores[s, e])
                for s in tokens[capacity:]:
                    keep[s][0] = False
        elif k == 2:
            first_total = np.zeros(E, int)
            for s in range(S):
                first_total[choice[s][0]] += 1
            seen1, seen2 = np.zeros(E, int), np.zeros(E, int)
            for s in range(S):
                e1, e2 = choice[s]
                keep[s][0] = seen1[e1] < capacity
                keep[s][1] = first_total[e2] + seen2[e2] < capacity
                seen1[e1] += 1
                seen2[e2] += 1
        elif k > 2 and policy == "probs":
            for e in range(E):
                copies = [(s, i) for s in range(S) for i in range(k) if choice[s][i] == e]
                copies.sort(key=lambda c: -gates[c[0], e])
                for s, i in copies[capacity:]:
                    keep[s][i] = False
        else:  # first come
            seen = np.zeros(E, int)
            for s in range(S):
                for i, e in enumerate(choice[s]):
                    keep[s][i] = seen[e] < capacity
                    seen[e] += 1
    # slots
    slots = [[0] * k for _ in range(S)]
    if k == 2:
        first_kept_total = np.zeros(E, int)
        for s in range(S):
            first_kept_total[choice[s][0]] += 1  # DeepSpeed offsets by all first choices
        n1, n2 = np.zeros(E, int), np.zeros(E, int)
        for s in range(S):
            e1, e2 = choice[s]
            slots[s][0] = n1[e1]
            n1[e1] += 1
            slots[s][1] = first_kept_total[e2] + n2[e2]
            n2[e2] += 1
    else:
        n = np.zeros(E, int)
        for s in range(S):
            for i, e in enumerate(choice[s]):
                if keep[s][i]:
                    slots[s][i] = n[e]
                    n[e] += 1
    routes = []
    for s in range(S):
        probs = [gates[s, e] if keep[s][i] else 0.0 for i, e in enumerate(choice[s])]
        if k > 1:
            total = max(sum(probs), np.finfo(np.float32).eps)
            probs = [p / total for p in probs]
        routes.append([(choice[s][i], slots[s][i], probs[i]) for i in range(k) if keep[s][i]])
    first_mask = np.zeros((S, E))
    for s in range(S):
        if k <= 2:
            first_mask[s, choice[s][0]] = 1
        else:
            first_mask[s, choice[s]] = 1
    aux = float(np.sum(gates.mean(0) * first_mask.mean(0)) * E)
    if k > 2:
        aux = float(np.mean(gates.mean(0) * first_mask.mean(0)) * E * E / k)
    return routes, counts, aux


CASES = [
    # S, E, k, capacity_factor, min_capacity
    (1, 4, 1, 1.0, 0), (7, 4, 1, 0.5, 1), (33, 8, 1, 1.0, 4), (128, 16, 1, 0.25, 0), (20, 64, 1, 1.0, 1),
    (40, 4, 1, 20.0, 0),  # C > S
    (7, 4, 2, 0.5, 1), (33, 8, 2, 1.0, 4), (128, 16, 2, 0.3, 0), (12, 32, 2, 1.0, 0), (50, 3, 2, 4.0, 0),
    (33, 8, 3, 1.0, 4), (100, 16, 4, 0.5, 0), (9, 5, 5, 1.0, 1), (64, 8, 3, 0.25, 0),
]


def _policies(k, drop):
    """k > 2 drops by probability or by position; the policy only matters when copies drop (three
    of the four k > 2 cases drop copies that the two policies choose differently)."""
    return ("probs", "position") if k > 2 and drop else ("probs",)


ROUTER_CASES = [(*case, drop, rts, policy) for case in CASES for drop in (True, False)
                for rts in ((False, True) if case[2] == 1 else (False,))  # RTS is a top-1 option
                for policy in _policies(case[2], drop)]


@pytest.mark.parametrize("S,E,k,cf,min_cap,drop,rts,policy", ROUTER_CASES)
def test_router_equals_loop_reference(S, E, k, cf, min_cap, drop, rts, policy):
    rng = np.random.default_rng(S * 1000 + E * 10 + k)
    logits = rng.normal(size=(S, E)).astype(np.float32) * 2
    rts_scores = rng.uniform(size=(S, E)).astype(np.float32) if rts else None
    gumbel = rng.gumbel(size=(S, E)).astype(np.float32) if k == 2 else None
    routing = top_k_gating(jnp.asarray(logits), k=k, capacity_factor=cf, min_capacity=min_cap,
                           drop_tokens=drop, use_rts=rts, second_expert_sampling=gumbel is not None,
                           drop_policy=policy,
                           rts_scores=None if rts_scores is None else jnp.asarray(rts_scores),
                           gumbel=None if gumbel is None else jnp.asarray(gumbel))
    capacity = compute_capacity(S, E, cf, min_cap, k)
    routes, counts, aux = loop_gating(logits, k, capacity, drop, rts_scores, gumbel, policy=policy)
    np.testing.assert_array_equal(routing.expert_counts, counts)
    np.testing.assert_allclose(routing.aux_loss, aux, rtol=2e-5)
    index, slot, weight, kept = (np.asarray(a) for a in (routing.expert_index, routing.slot,
                                                         routing.weight, routing.kept))
    for s in range(S):
        got = sorted((int(index[s, i]), int(slot[s, i]), float(weight[s, i])) for i in range(k) if kept[s, i])
        want = sorted(routes[s])
        assert [(e, c) for e, c, _ in got] == [(e, c) for e, c, _ in want], f"token {s}"
        np.testing.assert_allclose([w for *_, w in got], [w for *_, w in want], rtol=1e-5, atol=1e-7)
    assert np.all(weight[~kept] == 0) and np.all(slot[~kept] == 0)
    assert np.all(slot[kept] < routing.capacity)
    expected_dropped = 1 - sum(len(r) for r in routes) / (S * k)
    np.testing.assert_allclose(routing.dropped_fraction, expected_dropped, atol=1e-6)
    if not drop:
        assert kept.all()


def test_rts_keeps_exactly_capacity_tokens_of_each_over_full_expert():
    S, E, capacity_factor = 256, 4, 0.5
    logits = jax.random.normal(jax.random.key(0), (S, E))
    logits = logits.at[:, 0].add(1.5)  # expert 0 over-full
    routing = top_k_gating(logits, k=1, capacity_factor=capacity_factor, min_capacity=0, use_rts=True,
                           rng=jax.random.key(1))
    counts = np.asarray(routing.expert_counts)
    kept = np.asarray(routing.kept_counts())
    assert counts[0] > routing.capacity
    np.testing.assert_array_equal(kept, np.minimum(counts, routing.capacity))
    # RTS is not first-come: some late tokens of expert 0 survive while early ones drop.
    chosen = np.asarray(routing.expert_index[:, 0]) == 0
    kept_tokens = np.flatnonzero(chosen & np.asarray(routing.kept[:, 0]))
    assert kept_tokens.max() > np.flatnonzero(chosen)[routing.capacity - 1]
    # packed in token order
    np.testing.assert_array_equal(np.asarray(routing.slot[kept_tokens, 0]), np.arange(len(kept_tokens)))


def test_top2_renormalises_after_dropping():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4)), jnp.float32)
    routing = top_k_gating(logits, k=2, capacity_factor=0.25, min_capacity=0)
    weight, kept = np.asarray(routing.weight), np.asarray(routing.kept)
    both = kept.all(1)
    np.testing.assert_allclose(weight[both].sum(1), 1.0, rtol=1e-6)
    one = kept.sum(1) == 1
    assert one.any()
    np.testing.assert_allclose(weight[one].sum(1), 1.0, rtol=1e-6)
    assert np.all(weight[~kept.any(1)] == 0)


def test_top1_weight_is_raw_softmax_probability():
    logits = jax.random.normal(jax.random.key(3), (50, 8))
    routing = top_k_gating(logits, k=1, capacity_factor=8.0, min_capacity=0)
    probs = jax.nn.softmax(logits)
    np.testing.assert_allclose(routing.weight[:, 0], probs.max(-1), rtol=1e-6)


def test_z_loss_and_randomness():
    logits = jax.random.normal(jax.random.key(4), (32, 8)) * 3
    routing = top_k_gating(logits, k=2, capacity_factor=1.0, second_expert_sampling=True, rng=jax.random.key(0))
    np.testing.assert_allclose(routing.z_loss, np.mean(np.asarray(jax.nn.logsumexp(logits, -1)) ** 2), rtol=1e-5)
    again = top_k_gating(logits, k=2, capacity_factor=1.0, second_expert_sampling=True, rng=jax.random.key(0))
    other = top_k_gating(logits, k=2, capacity_factor=1.0, second_expert_sampling=True, rng=jax.random.key(9))
    np.testing.assert_array_equal(routing.expert_index, again.expert_index)
    assert not np.array_equal(routing.expert_index[:, 1], other.expert_index[:, 1])


def test_jit_and_bad_k():
    logits = jax.random.normal(jax.random.key(5), (16, 4))
    routed = jax.jit(lambda lg: top_k_gating(lg, k=2, capacity_factor=1.0))(logits)
    eager = top_k_gating(logits, k=2, capacity_factor=1.0)
    np.testing.assert_array_equal(routed.slot, eager.slot)
    with pytest.raises(ValueError, match="k=5"):
        top_k_gating(logits, k=5, capacity_factor=1.0)
    assert math.isclose(float(routed.dropped_fraction), float(eager.dropped_fraction))
