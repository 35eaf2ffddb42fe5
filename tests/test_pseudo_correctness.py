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
    """``ssl.pcorrect_iou``: a detection overlapping its gt box at IoU 0.62 is right for a fit
    at 0.5 and wrong at 0.75; exact boxes are right at both."""
    from detloop.orchestrator.loops.steps import fit_pseudo_correctness

    gt = pa.table(
        {"image_id": [f"i{k}" for k in range(4)], "class_id": [0] * 4,
         "x1": [0.0] * 4, "y1": [0.0] * 4, "x2": [10.0] * 4, "y2": [10.0] * 4}
    )  # fmt: skip
    # 100 / (10 · 10 / 0.62) = 0.62: the box 10 × 16.13 holding the gt box
    rows = [{"image_id": f"i{k}", "y2": 10.0 if k < 2 else 10 / 0.62, "score": 0.9 - 0.1 * k}
            for k in range(4)]  # fmt: skip
    validation = (predictions_from_rows(rows), gt)
    assert fit_pseudo_correctness(validation, calib=False).n_right == 4
    assert fit_pseudo_correctness(validation, calib=False, iou=0.75).n_right == 2
    # coco: exact boxes match at all 10 thresholds, the IoU-0.62 boxes at 0.5, 0.55, 0.6 only
    assert fit_pseudo_correctness(validation, False, iou="coco").n_right == pytest.approx(2.6)


def test_rank_true_coco_is_the_fraction_of_coco_thresholds_matched() -> None:
    """Hand boxes against one gt box [0, 0, 10, 10]: IoU 1 → 1.0; IoU 0.72 → 0.5 (0.50–0.70);
    IoU 0.62 → 0.3 — unless a higher-ranked detection took the gt box at a threshold; a
    detection of another class → 0."""
    from detloop.selectors.pseudo_ranking import COCO_IOUS, rank_true_coco

    assert COCO_IOUS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    gt = pa.table({"image_id": ["a", "b"], "class_id": [0, 0], "x1": [0.0, 0.0],
                   "y1": [0.0, 0.0], "x2": [10.0, 10.0], "y2": [10.0, 10.0]})  # fmt: skip
    rows = [
        {"image_id": "a", "x2": 10.0, "y2": 10.0 / 0.72},  # IoU 0.72
        {"image_id": "a", "x2": 10.0, "y2": 10.0},  # IoU 1, ranked second
        {"image_id": "b", "x2": 10.0, "y2": 10.0 / 0.62},  # IoU 0.62
        {"image_id": "b", "x2": 10.0, "y2": 10.0, "class_id": 1},  # another class
    ]
    preds = predictions_from_rows(rows)
    values = np.array([0.9, 0.8, 0.7, 0.95])
    # image a: at 0.5–0.7 the IoU-0.72 box (ranked first) takes the gt box, the exact box is
    # then a duplicate; at 0.75–0.95 only the exact box matches
    assert rank_true_coco(preds, values, gt) == pytest.approx([0.5, 0.5, 0.3, 0.0])


def test_soft_targets_fit_equals_scikit_learn_with_weighted_duplicates() -> None:
    """A soft target y is the logloss of right weighed by y and of wrong by 1 − y: scikit-learn
    on each detection twice (label 1 weight y, label 0 weight 1 − y) gives the same model."""
    preds, right = _detections(300, seed=3)
    y = np.clip(right * 0.7 + np.random.default_rng(3).uniform(0, 0.3, right.size), 0, 1)
    cols = DetColumns(preds)
    model = fit_correctness(cols, y, c=2.0)
    x = correctness_features(cols)
    z = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    ref = LogisticRegression(C=2.0, tol=1e-12, max_iter=10_000).fit(
        np.vstack([z, z]), np.r_[np.ones(y.size), np.zeros(y.size)], sample_weight=np.r_[y, 1 - y]
    )
    assert model.coef == pytest.approx(ref.coef_[0], abs=1e-5)
    assert model.intercept == pytest.approx(ref.intercept_[0], abs=1e-5)
    assert model.n_right == pytest.approx(y.sum())
    assert fit_correctness(cols, np.full(y.size, 0.25)).predict(cols) == pytest.approx(
        np.full(y.size, 0.25)
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_correctness(cols, y + 1.0)
