"""OSS set similarity (§10): estimator, JSD, both formulas, class weights, correlations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from detloop.selectors.oss import (
    class_jsd,
    class_weights,
    correlations,
    crop_features,
    kl_1nn,
    oss_paper,
    oss_reference,
    reference_beta,
    set_similarity,
)


def test_kl_1nn_two_gaussians() -> None:
    rng = np.random.default_rng(0)
    mu = np.array([1.0, 1.0, 0.0])  # KL(N(0, I) ‖ N(mu, I)) = |mu|²/2 = 1
    p = rng.normal(size=(10_000, 3))
    q = rng.normal(size=(10_000, 3)) + mu
    assert kl_1nn(p, q) == pytest.approx(1.0, rel=0.10)


def _cloud(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    return np.exp(rng.normal(loc=shift, scale=0.5, size=(n, 3)))


def test_jsd_identical_near_zero_disjoint_large() -> None:
    rng = np.random.default_rng(1)
    p = _cloud(rng, 400)
    assert abs(class_jsd(p, p, rng, n_resample=3000) or 1.0) < 0.05
    far = class_jsd(p, _cloud(rng, 400, shift=5.0), rng, n_resample=3000)
    assert far is not None and far > 0.5


def test_jsd_skips_small_or_degenerate_classes() -> None:
    rng = np.random.default_rng(2)
    assert class_jsd(_cloud(rng, 4), _cloud(rng, 100), rng) is None
    bad = _cloud(rng, 10)
    bad[:8, 0] = -1.0  # log of a negative aspect: non-finite rows are dropped → 2 left
    assert class_jsd(bad, _cloud(rng, 100), rng) is None
    flat = np.ones((20, 3))
    assert class_jsd(flat, _cloud(rng, 100), rng) is None


def test_paper_formula_hand_example() -> None:
    s = oss_paper(np.array([0.1, 0.3]), np.array([1.0, 0.5]), np.array([1.0, 1.0]))
    assert s == pytest.approx(1 / 0.95)
    # a skipped class (NaN) does not count in c
    s = oss_paper(np.array([0.1, np.nan]), np.array([1.0, 0.5]), np.array([1.0, 0.0]))
    assert s == pytest.approx(1 / 1.1)


def test_reference_formula_hand_example() -> None:
    assert reference_beta(100, [40, 60, 100, 200]) == 1  # P25 = 55
    assert reference_beta(200, [40, 60, 100, 200]) == 3
    jsd, r, w = np.array([0.1, 0.3, np.nan]), np.array([2.0, 1.0, 1.0]), np.ones(3)
    d = np.array([0.1 + 0.25 * 2 * 3 + 0.5, 0.3 + 0.25 * 1 * 3 + 0.5])
    assert oss_reference(jsd, r, w, beta=3) == pytest.approx(np.sum(1 / d) / 2)


def test_class_balance_switch() -> None:
    # w = 1/f = [1]*5 + [x]; std/mean = 1.278 → rounds to 1.3 (off), x = 11.5 → 1.4 (on)
    off = class_weights(np.array([[1.0] * 5 + [1 / 9]]))
    assert off.tolist() == [1.0] * 6
    on = class_weights(np.array([[1.0] * 5 + [1 / 11.5]]))
    assert on.tolist() == [1.0] * 5 + [0.0]
    shares = np.array([[0.5, 0.3, 0.2], [0.7, 0.1, 0.2]])
    assert class_weights(shares).tolist() == [1.0, 1.0, 1.0]


def test_correlations_match_definitions() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=12), rng.normal(size=12)
    out = correlations(x.tolist(), y.tolist())
    assert out["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    pairs = list(itertools.combinations(range(12), 2))
    concordant = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs)
    assert out["kendall_tau"] == pytest.approx(concordant / len(pairs))
    assert math.isnan(correlations([1.0], [2.0])["pearson_r"])


def test_crop_features_known_answer() -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[10:20, 5:25] = 100  # a uniform 20×10 crop
    feats, ok = crop_features(image, np.array([[5, 10, 25, 20], [0, 0, 2, 30], [0, 0, 3, 3]]))
    assert ok.tolist() == [True, False, True]
    aspect, dct_mean, hist_mean = feats[0]
    assert aspect == pytest.approx(2.0)
    # orthonormal DCT of a constant block: only the DC term, 100·sqrt(h·w) per channel
    assert dct_mean == pytest.approx(100 * math.sqrt(200) / 200)
    assert hist_mean == pytest.approx(200 / 512)


def test_identical_sets_more_similar_than_disjoint() -> None:
    rng = np.random.default_rng(4)
    ref = {"car": _cloud(rng, 200), "tram": _cloud(rng, 60, 1.0)}
    weights = {"car": 1.0, "tram": 1.0}
    same, rows = set_similarity(ref, ref, weights, "paper", rng, n_resample=2000)
    other = {"car": _cloud(rng, 200, 4.0), "tram": _cloud(rng, 60, -3.0)}
    diff, _ = set_similarity(other, ref, weights, "paper", rng, n_resample=2000)
    assert same > diff and same == pytest.approx(1.0, abs=0.06)  # JSD ≈ 0, r = 1
    assert [r.cls for r in rows] == ["car", "tram"]
    assert rows[0].similarity == pytest.approx(1 / (rows[0].jsd + 1.0))
    ref_same, _ = set_similarity(ref, ref, weights, "reference", rng, n_resample=2000)
    ref_diff, _ = set_similarity(other, ref, weights, "reference", rng, n_resample=2000)
    assert ref_same > ref_diff
