"""Paired comparisons over seeds: mean difference, Student-t confidence interval and a verdict.

Variants trained with the same seed see the same batches in the same order (and the same
initialisation keys), so the seed-to-seed spread cancels in the per-seed difference of two
variants. A claim "a beats b" is judged on d_s = loss_a(seed s) - loss_b(seed s):

  mean d,  half width = t(0.975, n - 1) * std(d) / sqrt(n)   (std with n - 1)

and the verdict is "holds" when the whole interval lies on the paper's side of the threshold,
"contradicted" when it lies wholly on the other side, and "not resolved" when it contains the
threshold (or there are fewer than two seeds, which give no interval). For a claim of the kind
"a beats b" the threshold is 0 and the paper's side is d < 0. For a claim "a nearly matches b"
(a non-inferiority claim: a is worse by at most `margin` nats) the threshold is `margin` and the
paper's side is d < margin.

No SciPy: the t quantile is computed from the closed form of Student's t distribution for an
integer number of degrees of freedom, inverted by bisection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

HOLDS, NOT_RESOLVED, CONTRADICTED = "holds", "not resolved", "contradicted"


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df >= 1 (Abramowitz and Stegun 26.7.3/26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        series, term = 0.0, 1.0
        if df > 1:
            series = 1.0
            for j in range(1, (df - 3) // 2 + 1):  # terms (2*4*...*(2j)) / (3*5*...*(2j+1)) cos^(2j)
                term *= c2 * (2 * j) / (2 * j + 1)
                series += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    series, term = 1.0, 1.0
    for j in range(1, (df - 2) // 2 + 1):  # terms (1*3*...*(2j-1)) / (2*4*...*(2j)) cos^(2j)
        term *= c2 * (2 * j - 1) / (2 * j)
        series += term
    return math.sin(theta) * series


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile (0.5 < probability < 1) of Student's t with integer df >= 1:
    t_quantile(0.975, 2) = 4.3027."""
    if not 0.5 < probability < 1:
        raise ValueError(f"probability={probability} must be in (0.5, 1); the t distribution is symmetric")
    if int(df) != df or df < 1:
        raise ValueError(f"df={df} must be an integer >= 1")
    mass = 2 * probability - 1  # P(|T| < t)
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, int(df)) < mass:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_two_sided_mass(mid, int(df)) < mass:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """The paired difference a - b over n seeds: its mean, sample standard deviation and the
    two-sided confidence interval (None when n < 2)."""

    n: int
    mean: float
    std: float
    low: Optional[float]
    high: Optional[float]
    confidence: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of a[i] - b[i] with its Student-t interval; a and b are per-seed values, same order."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same non-zero length; got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return PairedDifference(n, mean, 0.0, None, None, confidence)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return PairedDifference(n, mean, std, mean - half, mean + half, confidence)


def verdict(diff: PairedDifference, threshold: float = 0.0) -> str:
    """HOLDS when the interval lies below `threshold` (the paper's side: a's loss lower, or at most
    `threshold` higher), CONTRADICTED when it lies above, NOT_RESOLVED otherwise or without an
    interval."""
    if diff.low is None:
        return NOT_RESOLVED
    if diff.high < threshold:
        return HOLDS
    if diff.low > threshold:
        return CONTRADICTED
    return NOT_RESOLVED


def seeds_to_resolve(diff: PairedDifference, threshold: float = 0.0, limit: int = 200) -> Optional[int]:
    """The smallest n at which an interval with this mean and standard deviation would exclude
    `threshold` (t quantile at n - 1 degrees of freedom): a guide to how many seeds an unresolved
    claim needs if its mean and spread stayed as they are, not a promise. None: more than `limit`, or
    the mean sits on the threshold."""
    gap = abs(diff.mean - threshold)
    if diff.n < 2 or gap == 0.0:
        return None
    for n in range(2, limit + 1):
        if t_quantile(0.5 + diff.confidence / 2, n - 1) * diff.std / math.sqrt(n) < gap:
            return n
    return None
