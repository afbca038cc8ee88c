"""Paired differences over seeds against a hand computation, and the t quantile against tables."""

import math

import pytest

from experiments import paired_stats


@pytest.mark.parametrize("df,quantile", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                         (30, 2.0423)])
def test_t_quantile_matches_the_printed_table(df, quantile):
    assert paired_stats.t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)


def test_t_quantile_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 8, 17, 60):
        for p in (0.9, 0.95, 0.975, 0.995):
            assert paired_stats.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_paired_difference_by_hand():
    # differences a - b: -0.01, -0.02, -0.03 -> mean -0.02; deviations 0.01, 0, -0.01 -> sample
    # variance (1e-4 + 0 + 1e-4) / 2 = 1e-4, std 0.01; standard error 0.01 / sqrt(3) = 0.0057735;
    # t(0.975, 2) = 4.302653 -> half width 0.0248414 -> interval [-0.0448414, 0.0048414]
    diff = paired_stats.paired_difference([2.60, 2.61, 2.62], [2.61, 2.63, 2.65])
    assert diff.n == 3
    assert diff.mean == pytest.approx(-0.02, abs=1e-12)
    assert diff.std == pytest.approx(0.01, abs=1e-12)
    assert diff.low == pytest.approx(-0.0448414, abs=1e-7)
    assert diff.high == pytest.approx(0.0048414, abs=1e-7)
    assert paired_stats.verdict(diff) == paired_stats.NOT_RESOLVED  # the interval contains 0
    # the same spread 0.01 lower: [-0.0548414, -0.0051586], wholly below 0
    lower = paired_stats.paired_difference([2.59, 2.60, 2.61], [2.61, 2.63, 2.65])
    assert lower.high == pytest.approx(-0.0051586, abs=1e-7)
    assert paired_stats.verdict(lower) == paired_stats.HOLDS
    # b - a: the interval [0.0051586, 0.0548414] lies wholly on the other side
    assert paired_stats.verdict(paired_stats.paired_difference([2.61, 2.63, 2.65], [2.59, 2.60, 2.61])) == \
        paired_stats.CONTRADICTED


def test_margin_is_the_threshold_of_a_parity_claim():
    # differences 0.004, 0.005, 0.006: worse by about 0.005, within a margin of 0.01 nats
    diff = paired_stats.paired_difference([1.004, 1.005, 1.006], [1.0, 1.0, 1.0])
    half = 4.302653 * 0.001 / math.sqrt(3)
    assert (diff.low, diff.high) == pytest.approx((0.005 - half, 0.005 + half), abs=1e-7)
    assert paired_stats.verdict(diff) == paired_stats.CONTRADICTED
    assert paired_stats.verdict(diff, threshold=0.01) == paired_stats.HOLDS


def test_one_seed_gives_no_interval():
    diff = paired_stats.paired_difference([2.5], [2.6])
    assert diff.mean == pytest.approx(-0.1) and diff.low is None and diff.high is None
    assert paired_stats.verdict(diff) == paired_stats.NOT_RESOLVED
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_stats.paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="df=0"):
        paired_stats.t_quantile(0.975, 0)


def test_seeds_to_resolve_is_where_the_interval_first_excludes_the_threshold():
    diff = paired_stats.paired_difference([0.0, 0.1, 0.02, 0.05], [0.0, 0.0, 0.0, 0.0])  # mean 0.0425
    assert paired_stats.verdict(diff) == paired_stats.NOT_RESOLVED
    n = paired_stats.seeds_to_resolve(diff)
    half = [paired_stats.t_quantile(0.975, m - 1) * diff.std / m ** 0.5 for m in (n - 1, n)]
    assert half[0] >= diff.mean > half[1]  # n - 1 seeds would not exclude 0, n would
    assert paired_stats.seeds_to_resolve(diff, threshold=diff.mean) is None  # a mean on the margin never resolves
    assert paired_stats.seeds_to_resolve(diff, threshold=0.04, limit=20) is None  # beyond the limit
