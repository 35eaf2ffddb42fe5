"""``pcorrect``: a logistic regression on validation detections (selectors.pseudo_correctness)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.linear_model import LogisticRegression

from detloop.data.synthetic import predictions_from_rows
from detloop.selectors.columns import DetColumns
from detloop.selectors.pseudo import select_pseudo_labels
from detloop.selectors.pseudo_correctness import (
    FEATURES,
    CorrectnessModel,
    correctness_features,
    fit_correctness,
)


def _detections(n: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    """Detections whose rightness depends on the score and on the aleatoric std."""
    rng = np.random.default_rng(seed)
    score = rng.uniform(0.1, 0.99, n)
    al = rng.lognormal(0.0, 0.7, n)
    rows = [
        {"image_id": f"i{k}", "score": float(score[k]), "entropy": float(rng.uniform(0, 2)),
         "mc_class": float(rng.uniform(0, 1)), "x2": float(rng.uniform(5, 40)),
         **{f"al_{c}": float(al[k]) for c in ("x1", "y1", "x2", "y2")}}
        for k in range(n)
    ]  # fmt: skip
    logit = 4 * (score - 0.5) - 1.5 * np.log(al)
    right = rng.random(n) < 1 / (1 + np.exp(-logit))
    return predictions_from_rows(rows), right


def test_fit_equals_scikit_learns_logistic_regression() -> None:
    preds, right = _detections(400, seed=0)
    cols = DetColumns(preds)
    model = fit_correctness(cols, right, c=0.5)
    x = correctness_features(cols)
    z = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    ref = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(z, right)
    assert model.coef == pytest.approx(ref.coef_[0], abs=1e-5)
    assert model.intercept == pytest.approx(ref.intercept_[0], abs=1e-5)
    assert model.predict(cols) == pytest.approx(ref.predict_proba(z)[:, 1], abs=1e-6)
    # the aleatoric std carries information beyond the score: its coefficient is negative
    assert model.coef[FEATURES.index("log_rel_al")] < 0 < model.coef[FEATURES.index("logit_score")]
    assert CorrectnessModel.from_dict(model.as_dict()) == model


def test_one_kind_of_detection_gives_the_constant_rate() -> None:
    preds, _ = _detections(10, seed=1)
    cols = DetColumns(preds)
    all_right = fit_correctness(cols, np.ones(10, dtype=bool))
    assert all_right.coef == (0.0,) * len(FEATURES)
    assert all_right.predict(cols) == pytest.approx(np.full(10, 1 - 1e-6))
    assert fit_correctness(cols, np.zeros(10, dtype=bool)).predict(cols) == pytest.approx(
        np.full(10, 1e-6)
    )


def test_pcorrect_selection_keeps_p_above_tau_and_weighs_p() -> None:
    preds, right = _detections(200, seed=2)
    model = fit_correctness(DetColumns(preds), right)
    p = model.predict(DetColumns(preds))
    kept = select_pseudo_labels(preds, "pseudoscore_pcorrect", 0.6, correctness=model)
    assert kept.num_rows == int((p > np.float32(0.6)).sum()) > 0
    assert kept["weight"].to_numpy() == pytest.approx(p[p > np.float32(0.6)], abs=1e-6)
    with pytest.raises(ValueError, match="correctness model"):
        select_pseudo_labels(preds, "pcorrect", 0.6)


def test_pcorrect_iou_sets_what_counts_as_right() -> None:
    """``ssl.pcorrect_iou``: a detection overlapping its gt box at IoU 0.6 is right for a fit
    at 0.5 and wrong at 0.75; exact boxes are right at both."""
    from detloop.orchestrator.loops.steps import fit_pseudo_correctness

    gt = pa.table(
        {"image_id": [f"i{k}" for k in range(4)], "class_id": [0] * 4,
         "x1": [0.0] * 4, "y1": [0.0] * 4, "x2": [10.0] * 4, "y2": [10.0] * 4}
    )  # fmt: skip
    # 100 / (10 · 50 / 3) = 0.6: the box 10 × 16.67 holding the gt box
    rows = [{"image_id": f"i{k}", "y2": 10.0 if k < 2 else 50 / 3, "score": 0.9 - 0.1 * k}
            for k in range(4)]  # fmt: skip
    validation = (predictions_from_rows(rows), gt)
    assert fit_pseudo_correctness(validation, calib=False).n_right == 4
    assert fit_pseudo_correctness(validation, calib=False, iou=0.75).n_right == 2
