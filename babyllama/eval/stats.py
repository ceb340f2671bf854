"""The few statistics the project reports with: intervals of accuracies and of means over seeds, and the bound on
a rate never (or rarely) seen. Plain Python: no scipy needed."""
from __future__ import annotations

import math
import statistics
from typing import Sequence

# Student's t, 97.5% quantile, by degrees of freedom: the 95% interval of a mean over a few runs
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def binomial_sd(p: float, n: int) -> float:
    """Standard error of an accuracy p over n items."""
    return math.sqrt(max(p * (1 - p), 0.25 / n) / n)


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (Wilson score) interval of an accuracy p measured on n items."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson_upper(k: int, n: int, level: float = 0.95) -> float:
    """One-sided upper confidence bound of a rate seen k times in n trials (exact, binomial)."""
    def tail(p: float) -> float:  # P(X <= k) for X ~ Binomial(n, p)
        return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) > 1 - level else (lo, mid)
    return hi


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean of a few runs' values (NaN bounds for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half
