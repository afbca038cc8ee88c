"""The overlap model of experiments/bench_scaling.py on hand-worked timelines."""

import pytest

from experiments import bench_scaling


def _part(compute, reduce=0.0, gather=0.0, a2a=0.0):
    return {"compute_s": compute, "other_s": reduce + gather, "gather_s": gather, "a2a_s": a2a}


def test_reductions_hide_behind_the_backward_of_earlier_pairs():
    # backward 2 per pair (compute 3), rest 0: pair 3's reduction (1) ends at 2+1=3, behind pair 2's
    # backward (to 4); pair 2's at 5, pair 1's at 7, the rest's at 7: the backward ends at 6, exposed 1
    out = bench_scaling.overlap_step(_part(0.0), [_part(3.0, reduce=1.0)] * 3, 3)
    assert out["reduce_exposed_s"] == pytest.approx(1.0)
    assert out["gather_exposed_s"] == pytest.approx(0.0)
    assert out["step_s"] == pytest.approx(9.0 + 1.0)


def test_a_link_slower_than_the_compute_exposes_the_difference_and_the_rest_is_never_hidden():
    out = bench_scaling.overlap_step(_part(0.0, reduce=0.5), [_part(3.0, reduce=4.0)] * 2, 2)
    # issued at 2 and 4; the link runs 2-6 and 6-10, then the rest's 0.5: 10.5 - backward's 4
    assert out["reduce_exposed_s"] == pytest.approx(6.5)


def test_gathers_must_land_before_each_pair_forward_and_all_to_alls_stay_exposed():
    out = bench_scaling.overlap_step(_part(0.0), [_part(3.0, gather=2.0, a2a=0.25)] * 2, 2)
    # pair 1 waits for its gather (2), runs 2-3; pair 2's gather lands at 4, runs 4-5: 5 - forward's 2
    assert out["gather_exposed_s"] == pytest.approx(3.0)
    assert out["a2a_s"] == pytest.approx(0.5)
    assert out["step_s"] == pytest.approx(6.0 + 0.5 + 3.0)


def test_an_unsplit_step_is_spread_over_the_pairs():
    whole = bench_scaling.overlap_step(_part(9.0, reduce=3.0), [], 3)
    split = bench_scaling.overlap_step(_part(0.0), [_part(3.0, reduce=1.0)] * 3, 3)
    assert whole == pytest.approx(split)
