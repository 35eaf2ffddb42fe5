"""Known answers of the label-efficiency statistics (selectors/label_efficiency.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from detloop.selectors.label_efficiency import (
    bootstrap_mean_ci,
    labels_to_reach,
    paired_comparison,
    wilcoxon_p,
)


def test_wilcoxon_hand_example() -> None:
    """Five positive differences: W+ = 15 is the most extreme of 2^5 equally likely sign
    patterns, on each side, so the exact two-sided p is 2/32."""
    assert wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)
    # one negative difference of rank 1: W- = 1, P(W- <= 1) = 2/32 per side → 4/32
    assert wilcoxon_p([-1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(4 / 32)


@pytest.mark.parametrize("seed", range(6))
def test_wilcoxon_equals_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 30))
    diffs = rng.normal(0.02 * seed, 0.05, size=n)
    diffs[: seed % 3] = 0.0  # zeros are dropped as scipy does
    assert wilcoxon_p(diffs) == stats.wilcoxon(diffs).pvalue


def test_wilcoxon_all_zero_is_no_evidence() -> None:
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0


def test_bootstrap_interval_is_reproducible_and_holds_the_mean() -> None:
    values = [0.1, 0.3, 0.2, 0.5, 0.4]  # mean 0.3
    first = bootstrap_mean_ci(values, seed=7)
    assert first == bootstrap_mean_ci(values, seed=7)
    irregular = [0.11, 0.32, 0.23, 0.54, 0.45, 0.37]
    assert bootstrap_mean_ci(irregular, n_boot=200, seed=7) != bootstrap_mean_ci(
        irregular, n_boot=200, seed=8
    )
    low, high = first
    assert low < 0.3 < high
    # the bootstrap means lie between the smallest and the largest value
    assert 0.1 <= low and high <= 0.5
    narrower = bootstrap_mean_ci(values, seed=7, confidence=0.5)
    assert low < narrower[0] < narrower[1] < high
    assert bootstrap_mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_paired_comparison() -> None:
    a = [0.50, 0.55, 0.60, 0.52, 0.58]
    b = [0.45, 0.50, 0.50, 0.50, 0.50]  # differences 0.05 0.05 0.10 0.02 0.08, mean 0.06
    result = paired_comparison(a, b, seed=3)
    assert result.n == 5
    assert result.mean_diff == pytest.approx(0.06)
    assert result.ci_low < 0.06 < result.ci_high
    assert 0.0 < result.ci_low  # every difference is positive
    assert result.p_value == pytest.approx(2 / 32)
    assert result == paired_comparison(a, b, seed=3)
    swapped = paired_comparison(b, a, seed=3)
    assert swapped.mean_diff == pytest.approx(-0.06)
    assert swapped.p_value == pytest.approx(result.p_value)
    with pytest.raises(ValueError, match="pair up"):
        paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([1.0, float("nan")], [1.0, 2.0])


def test_labels_to_reach_on_a_hand_curve() -> None:
    labels, maps = [100, 200, 400, 800], [0.2, 0.4, 0.5, 0.6]
    # 50 % of 0.6 = 0.3: half-way between (100, 0.2) and (200, 0.4)
    assert labels_to_reach(labels, maps, 50, 0.6) == pytest.approx(150.0)
    # 75 % of 0.6 = 0.45: half-way between (200, 0.4) and (400, 0.5)
    assert labels_to_reach(labels, maps, 75, 0.6) == pytest.approx(300.0)
    assert labels_to_reach(labels, maps, 100, 0.6) == pytest.approx(800.0)  # the last point
    assert labels_to_reach(labels, maps, 20, 0.6) == pytest.approx(100.0)  # already at start
    assert labels_to_reach(labels, maps, 101, 0.6) is None  # never reached


def test_labels_to_reach_takes_the_first_crossing() -> None:
    # the curve reaches 0.45 between 100 and 200, dips below it, and crosses again later
    labels, maps = [100, 200, 300, 400], [0.2, 0.5, 0.4, 0.6]
    assert labels_to_reach(labels, maps, 90, 0.5) == pytest.approx(100 + 100 * 0.25 / 0.3)


def test_labels_to_reach_refuses_bad_curves() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        labels_to_reach([100, 100], [0.1, 0.2], 50, 0.4)
    with pytest.raises(ValueError, match="length"):
        labels_to_reach([100, 200], [0.1], 50, 0.4)
    with pytest.raises(ValueError, match="positive"):
        labels_to_reach([100, 200], [0.1, 0.2], 50, 0.0)
