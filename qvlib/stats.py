"""Intervals and verdicts for gains measured over many pairs and a few seeds.

A gain means something only against its control, with an interval: ``specific gain`` = a donor's
gain minus the mean gain of its own norm-matched random directions under the same lambda rule,
and its 95% interval comes from a percentile bootstrap of the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .vocab import Verdict

N_BOOT = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


def bootstrap_mean(values: Sequence[float], groups: Sequence[object] | None = None, n_boot: int = N_BOOT,
                   level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean of ``values`` and its percentile-bootstrap interval.

    With ``groups`` (the replicate seed of each value) the resampling has two levels, so the
    interval also holds the spread between seeds: draw as many groups as there are, with
    replacement, then the values of each drawn group with replacement. One group (or none given)
    resamples the values alone. The generator is seeded: the same input gives the same interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_mean: values must be finite")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    labels = np.zeros(x.size, dtype=int) if groups is None else np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)[1]
    if len(labels) != x.size:
        raise ValueError(f"got {x.size} values but {len(labels)} group labels")
    members = [x[labels == g] for g in range(labels.max() + 1)]
    rng = np.random.default_rng(seed)
    n_groups = len(members)
    drawn = rng.integers(0, n_groups, size=(n_boot, n_groups)) if n_groups > 1 else np.zeros((n_boot, 1), dtype=int)
    sums = np.zeros(n_boot)
    counts = np.zeros(n_boot)
    for slot in range(drawn.shape[1]):
        for g, v in enumerate(members):
            rows = np.flatnonzero(drawn[:, slot] == g)
            if rows.size:
                sums[rows] += v[rng.integers(0, v.size, size=(rows.size, v.size))].sum(axis=1)
                counts[rows] += v.size
    low, high = np.quantile(sums / counts, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(x.mean()), float(low), float(high))


def verdict(interval: Interval) -> Verdict:
    """yes: the interval lies above 0; no: below 0; inconclusive: it contains 0."""
    if interval.low > 0:
        return Verdict.YES
    if interval.high < 0:
        return Verdict.NO
    return Verdict.INCONCLUSIVE
