"""The paper's headline measured: how much dense training compute an MoE variant is worth.

A dense ladder (the same model grown in width and depth, same tokens and schedule) gives test loss
against training FLOPs per token. A variant's compute multiplier, per seed, is the dense compute
that reaches the variant's test loss, interpolated on log compute between the two ladder rungs
around it (the same seed's ladder), over the variant's own training FLOPs per token (from the
compiled step). Beyond the ladder it is never extrapolated: a loss below the top rung's is
"> top / own" ("above"), one above the bottom rung's "< bottom / own" ("below").

A rung that does not improve on the rung below it (at a fixed token budget a much larger model can
train worse: too few steps for its depth, a learning rate tuned for the small one) ends the ladder
for that seed: the rungs used are the falling prefix (`falling_prefix`), and a loss better than its
top is a bound at that top. The ladder is never bent to fit, and the rungs cut are reported.

The paper (Rajbhandari et al., 2022, Table 1): 350M+MoE-128 reaches 1.3B dense quality at the
350M's compute, about 5x (1.3B / 350M FLOPs per token ~ 3.7x); 1.3B+MoE-128 matches 6.7B dense, 5x.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from experiments import paired_stats

PAPER_MULTIPLIER = 5.0  # "MoE ... with 5x less training cost" (the paper's abstract and Table 1)


@dataclasses.dataclass(frozen=True)
class Multiplier:
    """One seed's multiplier: `value` when the loss lies within the ladder; else `bound` with
    `side` "above" (the true value is larger than bound) or "below" (smaller)."""

    value: Optional[float]
    side: str  # "within", "above", "below"
    bound: Optional[float] = None

    def text(self) -> str:
        if self.side == "within":
            return f"{self.value:.2f}x"
        return f"{'>' if self.side == 'above' else '<'} {self.bound:.2f}x"


def falling_prefix(ladder: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The rungs (flops, loss), sorted by FLOPs, up to the first one whose loss does not fall below
    the previous rung's (module docstring). At least the bottom rung."""
    rungs = sorted(ladder)
    kept = rungs[:1]
    for rung in rungs[1:]:
        if rung[1] >= kept[-1][1]:
            break
        kept.append(rung)
    return kept


def dense_compute_at(loss: float, ladder: Sequence[tuple[float, float]]) -> tuple[Optional[float], str]:
    """The dense FLOPs per token whose test loss equals `loss`, interpolated linearly in log FLOPs
    between the ladder rungs (flops, loss) around it. Returns (flops, "within"), or (None, "above")
    when `loss` is below every rung's loss (better than the largest dense model), (None, "below")
    when above every rung's. The rungs are sorted by FLOPs; their losses must fall as FLOPs grow."""
    rungs = sorted(ladder)
    if len(rungs) < 2:
        raise ValueError(f"a ladder needs at least 2 rungs; got {len(rungs)}")
    losses = [loss for _, loss in rungs]
    if any(b >= a for a, b in zip(losses, losses[1:])):
        raise ValueError(f"the ladder's test losses must fall as its compute grows; got {losses} at "
                         f"{[f for f, _ in rungs]} FLOPs per token (more seeds or steps, or fewer rungs)")
    if loss < losses[-1]:
        return None, "above"
    if loss > losses[0]:
        return None, "below"
    for (f0, l0), (f1, l1) in zip(rungs, rungs[1:]):
        if l1 <= loss <= l0:
            t = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0))), "within"
    raise AssertionError("unreachable: the loss lies within the ladder")


def multiplier(loss: float, own_flops: float, ladder: Sequence[tuple[float, float]]) -> Multiplier:
    """One seed: the dense compute reaching `loss`, over `own_flops`, along the ladder's falling
    prefix (module docstring); a ladder whose second rung already fails is refused."""
    rungs = falling_prefix(ladder)
    if len(rungs) < 2:
        raise ValueError(f"the ladder's test losses must fall as its compute grows; its second rung does not: "
                         f"{[loss for _, loss in sorted(ladder)]} at {[f for f, _ in sorted(ladder)]} FLOPs per token "
                         "(more seeds or steps, or fewer rungs)")
    flops, side = dense_compute_at(loss, rungs)
    if side == "within":
        return Multiplier(flops / own_flops, side)
    edge = rungs[-1][0] if side == "above" else rungs[0][0]
    return Multiplier(None, side, edge / own_flops)


@dataclasses.dataclass(frozen=True)
class Summary:
    """A variant's multipliers over its seeds: mean and 95% Student-t interval of the per-seed
    values when every seed lies within the ladder; else how many seeds lie beyond it."""

    n: int
    mean: Optional[float]
    low: Optional[float]
    high: Optional[float]
    per_seed: tuple[str, ...]
    beyond: str  # "" or e.g. "2 of 3 seeds > 7.9x"

    def text(self) -> str:
        if self.mean is None:
            return self.beyond
        interval = f" [{self.low:.2f}, {self.high:.2f}]" if self.low is not None else ""
        return f"{self.mean:.2f}x{interval}"


def summarise(values: Sequence[Multiplier]) -> Summary:
    per_seed = tuple(v.text() for v in values)
    outside = [v for v in values if v.side != "within"]
    if outside:
        sides = sorted({v.side for v in outside})
        bounds = ", ".join(v.text() for v in outside)
        return Summary(len(values), None, None, None, per_seed,
                       f"{len(outside)} of {len(values)} seeds beyond the ladder ({'/'.join(sides)}: {bounds})")
    diff = paired_stats.paired_difference([v.value for v in values], [0.0] * len(values))
    return Summary(len(values), diff.mean, diff.low, diff.high, per_seed, "")


def rungs_cut(ladder_runs: dict, flops: dict) -> dict:
    """seed -> the rung variants beyond that seed's falling prefix (only seeds with a cut)."""
    out = {}
    seeds = sorted(set.intersection(*(set(r) for r in ladder_runs.values())), key=int) if ladder_runs else []
    for seed in seeds:
        kept = {f for f, _ in falling_prefix([(flops[r], runs[seed]) for r, runs in ladder_runs.items()])}
        cut = [r for r in sorted(ladder_runs, key=lambda r: flops[r]) if flops[r] not in kept]
        if cut:
            out[seed] = cut
    return out


def variant_multipliers(ladder_runs: dict, variant_runs: dict, flops: dict) -> dict:
    """ladder_runs: rung variant -> {seed: test loss}; variant_runs: variant -> {seed: test loss};
    flops: variant (rungs too) -> training FLOPs per token. Returns variant -> Summary over the
    seeds it shares with every rung."""
    out = {}
    for variant, by_seed in variant_runs.items():
        seeds = sorted(set(by_seed).intersection(*(set(r) for r in ladder_runs.values())), key=int)
        if not seeds or variant not in flops:
            continue
        values = [multiplier(by_seed[s], flops[variant], [(flops[r], runs[s]) for r, runs in ladder_runs.items()])
                  for s in seeds]
        out[variant] = summarise(values)
    return out
