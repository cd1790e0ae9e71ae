"""Seeded percentile-bootstrap confidence intervals: means, ratios (token-weighted loss) and differences.

Rows are resampled with replacement `resamples` times from numpy's PCG64 seeded with `seed`, so
an interval is reproducible for a seed and a data set. Differences are paired (the same rows
resampled on both sides) when both evaluations scored the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass

LEVEL = 0.95
RESAMPLES = 1000
# Fewer rows than this and an interval is too wide to separate small differences: say so.
UNDERPOWERED_ROWS = 100
_BLOCK = 200  # resamples drawn per block, so memory stays at BLOCK x n indices


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def _rng(seed: int):
    import numpy as np
    return np.random.Generator(np.random.PCG64(seed))


def _statistics(n: int, stat, seed: int, resamples: int):
    """stat(indices[block, n]) -> values[block], over `resamples` index draws."""
    import numpy as np
    rng = _rng(seed)
    out = []
    left = resamples
    while left > 0:
        k = min(_BLOCK, left)
        idx = rng.integers(0, n, size=(k, n))
        out.append(stat(idx))
        left -= k
    return np.concatenate(out)


def _percentiles(values, level: float) -> Interval:
    import numpy as np
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return Interval(float(lo), float(hi))


def mean_interval(values, seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> Interval | None:
    """Percentile bootstrap interval of the mean of `values`; None for fewer than 2 values."""
    import numpy as np
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    return _percentiles(_statistics(v.size, lambda idx: v[idx].mean(axis=1), seed, resamples), level)


def ratio_interval(num, den, seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> Interval | None:
    """Interval of sum(num)/sum(den) with rows resampled (the token-weighted mean loss)."""
    import numpy as np
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.size < 2:
        return None
    return _percentiles(_statistics(a.size, lambda idx: a[idx].sum(axis=1) / b[idx].sum(axis=1), seed, resamples),
                        level)


def paired_mean_diff_interval(a, b, seed: int, resamples: int = RESAMPLES, level: float = LEVEL) -> Interval | None:
    """Interval of mean(b) - mean(a) over the same rows, resampled together."""
    import numpy as np
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return mean_interval(d, seed, resamples, level)


def paired_ratio_diff_interval(num_a, den_a, num_b, den_b, seed: int, resamples: int = RESAMPLES,
                               level: float = LEVEL) -> Interval | None:
    """Interval of sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a), rows resampled together."""
    import numpy as np
    na, da = np.asarray(num_a, dtype=np.float64), np.asarray(den_a, dtype=np.float64)
    nb, db = np.asarray(num_b, dtype=np.float64), np.asarray(den_b, dtype=np.float64)
    if na.size < 2:
        return None

    def stat(idx):
        return nb[idx].sum(axis=1) / db[idx].sum(axis=1) - na[idx].sum(axis=1) / da[idx].sum(axis=1)
    return _percentiles(_statistics(na.size, stat, seed, resamples), level)


def unpaired_diff_interval(stat_a, stat_b, seed: int, resamples: int = RESAMPLES,
                           level: float = LEVEL) -> Interval | None:
    """Interval of stat(B) - stat(A) for two independent samples, each resampled on its own.

    stat_a, stat_b: (n, fn) where fn(indices[block, n]) gives the statistic per resample.
    """
    (n_a, fa), (n_b, fb) = stat_a, stat_b
    if n_a < 2 or n_b < 2:
        return None
    # Different seeds for the two sides: the samples are independent.
    va = _statistics(n_a, fa, seed, resamples)
    vb = _statistics(n_b, fb, seed + 1, resamples)
    return _percentiles(vb - va, level)


def combined_interval(delta: float, a: Interval | None, b: Interval | None) -> Interval | None:
    """A difference's interval from the two sides' own intervals (no rows at hand): half-widths
    added in quadrature, as for independent estimates."""
    if a is None or b is None:
        return None
    hw = (a.halfwidth ** 2 + b.halfwidth ** 2) ** 0.5
    return Interval(delta - hw, delta + hw)
