"""Statistics of the label-efficiency benchmark: is strategy A better than B over seeds, and
how many labels does a strategy need to reach a share of a reference mAP.

Pure numpy/scipy over plain arrays, so the benchmark scripts and the reports share one
definition:

- :func:`paired_comparison`: runs of A and B paired by seed (same seed, same warm-up): the mean
  of the differences A − B, a seeded percentile-bootstrap confidence interval of that mean, and
  the two-sided Wilcoxon signed-rank p-value (scipy's, zero differences dropped). With n seeds
  the exact test cannot go below 2 / 2^n (0.25 for 3 seeds): few seeds give an interval, rarely
  significance.
- :func:`labels_to_reach`: on a (labels, mAP) curve, the labels at which the curve first reaches
  X % of a reference mAP, by linear interpolation between the two points around the crossing;
  None when it never does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats

Floats = NDArray[np.float64]


@dataclass(frozen=True)
class PairedComparison:
    """A − B over paired runs.

    Attributes:
        n: number of pairs.
        mean_diff: mean of the paired differences A − B.
        ci_low, ci_high: percentile-bootstrap interval of ``mean_diff`` at ``confidence``.
        confidence: e.g. 0.95.
        p_value: two-sided Wilcoxon signed-rank p-value (1.0 when every difference is 0).
    """

    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float


def _as_finite(values: Sequence[float] | Floats, name: str) -> Floats:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: every value must be finite")
    return arr


def bootstrap_mean_ci(
    values: Sequence[float] | Floats,
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (``n_boot`` resamples with
    replacement from ``np.random.default_rng(seed)``: the same seed gives the same interval)."""
    arr = _as_finite(values, "values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(n_boot, len(arr)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def wilcoxon_p(diffs: Sequence[float] | Floats) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (``scipy.stats.wilcoxon``
    with its defaults: zeros dropped, exact for small samples); 1.0 when all are zero."""
    arr = _as_finite(diffs, "diffs")
    if not np.any(arr != 0):
        return 1.0
    return float(stats.wilcoxon(arr).pvalue)


def paired_comparison(
    a: Sequence[float] | Floats,
    b: Sequence[float] | Floats,
    *,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Compare A and B measured on the same seeds (``a[i]`` and ``b[i]`` share seed i).

    Raises:
        ValueError: different lengths, empty or non-finite values.
    """
    arr_a, arr_b = _as_finite(a, "a"), _as_finite(b, "b")
    if len(arr_a) != len(arr_b):
        raise ValueError(f"a and b must pair up: {len(arr_a)} vs {len(arr_b)} values")
    diffs = arr_a - arr_b
    low, high = bootstrap_mean_ci(diffs, n_boot=n_boot, confidence=confidence, seed=seed)
    return PairedComparison(
        n=len(diffs),
        mean_diff=float(diffs.mean()),
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        p_value=wilcoxon_p(diffs),
    )


def labels_to_reach(
    labels: Sequence[float] | Floats,
    maps: Sequence[float] | Floats,
    percent: float,
    reference_map: float,
) -> float | None:
    """Labels needed to reach ``percent`` % of ``reference_map`` on the curve (labels, maps).

    The first point at or above the target is found; the answer interpolates linearly between
    it and the point before (the first point itself when the curve starts above the target).
    Returns None when no point reaches the target.

    Raises:
        ValueError: mismatched, empty or non-finite inputs, labels not strictly increasing,
            or a non-positive ``percent`` or ``reference_map``.
    """
    x, y = _as_finite(labels, "labels"), _as_finite(maps, "maps")
    if len(x) != len(y):
        raise ValueError(f"labels and maps differ in length: {len(x)} vs {len(y)}")
    if np.any(np.diff(x) <= 0):
        raise ValueError("labels must be strictly increasing")
    if not (percent > 0 and reference_map > 0 and math.isfinite(percent * reference_map)):
        msg = f"percent and reference_map must be positive, got {percent}, {reference_map}"
        raise ValueError(msg)
    target = percent / 100.0 * reference_map
    reached = np.flatnonzero(y >= target)
    if len(reached) == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return float(x[0])
    frac = (target - y[i - 1]) / (y[i] - y[i - 1])
    return float(x[i - 1] + frac * (x[i] - x[i - 1]))
