"""The compute multiplier on synthetic ladders whose answer is known."""

import math

import pytest

from experiments import compute_multiplier as cm

F = 1.0e7  # the smallest rung's FLOPs per token
# loss falls by 0.1 nats per doubling of compute: loss(f) = 3 - 0.1 * log2(f / F)
LADDER = [(F * 2 ** i, 3.0 - 0.1 * i) for i in range(4)]  # 1x, 2x, 4x, 8x


def test_a_loss_between_rungs_reads_off_the_log_compute_line():
    flops, side = cm.dense_compute_at(3.0 - 0.1 * math.log2(3), LADDER)
    assert side == "within" and flops == pytest.approx(3 * F, rel=1e-12)
    # an MoE at the 1x rung's compute reaching the 3x dense loss is worth 3x; at 1.5x compute, 2x
    assert cm.multiplier(3.0 - 0.1 * math.log2(3), F, LADDER).value == pytest.approx(3.0)
    assert cm.multiplier(3.0 - 0.1 * math.log2(3), 1.5 * F, LADDER).value == pytest.approx(2.0)
    assert cm.multiplier(3.0, F, LADDER).value == pytest.approx(1.0)  # the rung itself


def test_beyond_the_ladder_is_a_bound_never_an_extrapolation():
    above = cm.multiplier(2.5, F, LADDER)  # better than the 8x dense model
    assert above.side == "above" and above.value is None and above.bound == pytest.approx(8.0)
    assert above.text() == "> 8.00x"
    below = cm.multiplier(3.2, 2 * F, LADDER)  # worse than the smallest dense model, at twice its compute
    assert below.side == "below" and below.text() == "< 0.50x"


def test_summary_over_seeds_and_the_seeds_beyond():
    within = [cm.multiplier(3.0 - 0.1 * math.log2(m), F, LADDER) for m in (3.0, 3.5, 4.0)]
    s = cm.summarise(within)
    assert s.mean == pytest.approx(3.5) and s.low < 3.5 < s.high and s.n == 3
    mixed = cm.summarise(within[:2] + [cm.multiplier(2.0, F, LADDER)])
    assert mixed.mean is None and mixed.text().startswith("1 of 3 seeds beyond the ladder (above: > 8.00x")


def test_per_seed_ladders_pair_with_the_variant_seeds():
    ladder_runs = {f"dense_x{2 ** i}": {"0": 3.0 - 0.1 * i, "1": 3.05 - 0.1 * i} for i in range(4)}
    flops = {f"dense_x{2 ** i}": F * 2 ** i for i in range(4)} | {"moe": F}
    out = cm.variant_multipliers(ladder_runs, {"moe": {"0": 2.8, "1": 2.85, "2": 1.0}}, flops)
    assert out["moe"].n == 2  # seed 2 has no ladder
    assert out["moe"].mean == pytest.approx(4.0)  # 0.2 nats below each seed's 1x rung: 2 doublings


def test_a_ladder_that_does_not_fall_is_refused():
    with pytest.raises(ValueError, match="must fall as its compute grows"):
        cm.dense_compute_at(2.9, [(F, 3.0), (2 * F, 3.1)])
    with pytest.raises(ValueError, match="second rung does not"):
        cm.multiplier(2.9, F, [(F, 3.0), (2 * F, 3.1), (4 * F, 2.5)])


def test_a_top_rung_that_does_not_improve_ends_the_ladder_there():
    ladder = [(F, 3.0), (2 * F, 2.9), (4 * F, 2.8), (8 * F, 2.85)]  # the 8x rung trains worse than 4x
    assert cm.falling_prefix(ladder) == ladder[:3]
    assert cm.multiplier(2.85, F, ladder).value == pytest.approx(2 ** 1.5)  # between 2x and 4x, not near 8x
    beyond = cm.multiplier(2.7, F, ladder)  # better than the 4x rung: a bound at 4x, never at the cut 8x
    assert (beyond.side, beyond.bound) == ("above", pytest.approx(4.0))
    runs = {f"x{2 ** i}": {"0": lg, "1": 3.0 - 0.1 * i} for i, (_, lg) in enumerate(ladder)}
    assert cm.rungs_cut(runs, {f"x{2 ** i}": F * 2 ** i for i in range(4)}) == {"0": ["x8"]}


def _row(losses, flops):
    return {"test_loss_by_seed": {str(i): lg for i, lg in enumerate(losses)}, "train_flops_per_token": flops,
            "test_loss": sum(losses) / len(losses)}


def test_the_suite_reports_multipliers_from_its_ladder_runs(tmp_path):
    from experiments import ablation_report, ablation_specs

    table = {rung: _row([3.0 - 0.1 * i, 3.05 - 0.1 * i], F * 2 ** i) for i, rung in enumerate(ablation_specs.LADDER)}
    table["moe"] = _row([3.0 - 0.1 * math.log2(5), 3.05 - 0.1 * math.log2(5)], 1.25 * F)  # 5x dense at 1.25x cost
    table["pr_moe"] = _row([2.0, 2.1], F)  # beyond the ladder's top
    table["top2"] = {"val_loss_by_seed": {"0": 2.9}}  # no test evaluation: left out
    out = ablation_report.multiplier_table(table)
    assert set(out) == {"moe", "pr_moe"}
    assert out["moe"].mean == pytest.approx(4.0)  # 5x the dense compute / 1.25x its own
    assert out["pr_moe"].mean is None and "> 8.00x" in out["pr_moe"].text()
    text = ablation_report.multiplier_markdown(table, out)
    assert "| moe | 1.25e+07 | 1.25x |" in text and "dense_x8 8.00x" in text
    png = ablation_report.plot_loss_vs_compute(table, out, str(tmp_path))
    assert (tmp_path / "compute.png").stat().st_size > 1000 and png.endswith("compute.png")
    del table["dense_x8"]["test_loss_by_seed"]  # an unfinished ladder gives no multiplier at all
    assert ablation_report.multiplier_table(table) == {}


def test_ladder_rungs_grow_the_dense_model_and_its_compiled_flops():
    from experiments import ablation_specs, ablations

    flops = [ablations._compiled_flops(rung, "micro", "", 0) for rung in ablation_specs.LADDER]
    assert all(b > 1.3 * a for a, b in zip(flops, flops[1:])), flops
    assert flops[-1] > 4 * flops[0]
