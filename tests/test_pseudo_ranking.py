"""Pseudo-label rankings against hidden gt (selectors.pseudo_ranking)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import average_precision_score

from detloop.data import schema
from detloop.data.synthetic import predictions_from_rows
from detloop.selectors.pseudo import selection_signal
from detloop.selectors.pseudo_ranking import fit_tau, rank_true, ranking_quality, ranking_report


def _gt(rows: list[tuple[str, int, float, float, float, float]]) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    return pa.table(
        {
            "image_id": pa.array(cols[0], pa.string()),
            "class_id": pa.array(cols[1], pa.int32()),
            **{c: pa.array(v, pa.float64()) for c, v in zip(schema.COORDS, cols[2:], strict=True)},
        }
    )


def test_ranking_quality_equals_sklearn_average_precision_scaled_to_every_gt_box() -> None:
    rng = np.random.default_rng(3)
    values = rng.permutation(200).astype(np.float64)  # distinct: no tie convention involved
    tp = rng.random(200) < 0.4
    n_gt = int(tp.sum()) + 17  # 17 objects no detection found
    q = ranking_quality(values, tp, n_gt, k=50)
    # sklearn's AP counts recall over the true detections; ours over every gt box
    assert q.ap == pytest.approx(average_precision_score(tp, values) * tp.sum() / n_gt)
    top = np.argsort(-values)[:50]
    assert q.precision_at_k == pytest.approx(tp[top].mean())
    assert q.recall_at_k == pytest.approx(tp[top].sum() / n_gt)
    assert np.isnan(ranking_quality(values, tp, 0, 0).ap)


def test_matching_follows_the_ranking_not_the_score() -> None:
    preds = predictions_from_rows(
        [
            {"image_id": "a", "score": 0.9, "y2": 12.0},  # IoU 10/12 with the gt box
            {"image_id": "a", "score": 0.5},  # the same gt box, IoU 1
            {"image_id": "a", "score": 0.8, "class_id": 2},  # right place, wrong class
            {"image_id": "c", "score": 0.7},  # an image without gt
        ]
    )
    gt = _gt([("a", 0, 0, 0, 10, 10)])
    by_score = rank_true(preds, preds["score"].to_numpy().astype(float), gt)
    assert by_score.tolist() == [True, False, False, False]
    by_other = rank_true(preds, np.array([0.1, 0.8, 0.9, 0.5]), gt)
    assert by_other.tolist() == [False, True, False, False]


def test_report_ranks_each_signal_at_the_score_rules_count() -> None:
    # four images, one gt box each at the origin; the two confident detections are wrong
    # (far from the box) and uncertain, the two less confident ones are right and certain
    far = {"x1": 50.0, "y1": 50.0, "x2": 60.0, "y2": 60.0}
    preds = predictions_from_rows(
        [
            {"image_id": "a", "score": 0.9, "mc_class": 1.3, **far},
            {"image_id": "b", "score": 0.8, "mc_class": 1.3, **far},
            {"image_id": "c", "score": 0.7, "mc_class": 0.1},
            {"image_id": "d", "score": 0.6, "mc_class": 0.1},
        ]
    )
    gt = _gt([(i, 0, 0, 0, 10, 10) for i in "abcdz"])  # z: not a candidate image, not counted
    report = ranking_report(preds, gt, tau=0.65)  # score > 0.65 keeps k = 3
    assert report["score"].k == 3
    assert report["score"].precision_at_k == pytest.approx(1 / 3)
    assert report["score"].ap == pytest.approx((1 / 3 + 2 / 4) / 4)
    for name in ("alluncert", "alluncert_and_score"):
        assert report[name].precision_at_k == pytest.approx(2 / 3)
        assert report[name].recall_at_k == pytest.approx(2 / 4)
        assert report[name].ap == pytest.approx((1 + 1) / 4)
    assert "combo" not in report and "score_cal" not in report
    thr = {"uncertainties": ["entropy"], "weights": [1.0], "thresholds": [0.5]}
    with_combo = ranking_report(preds, gt, tau=0.65, thresholds=thr)
    assert with_combo["combo"].k == 3  # entropy equal everywhere: ties kept in row order
    assert with_combo["combo"].precision_at_k == pytest.approx(1 / 3)


def test_fit_tau_keeps_the_most_detections_that_reach_the_target() -> None:
    signal = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    tp = np.array([True, False, True, True, False])  # precision 1, .5, .67, .75, .6
    fit = fit_tau(signal, tp, n_gt=5, target=0.7)
    assert (fit.kept, fit.reached) == (4, True)
    assert fit.precision == pytest.approx(0.75) and fit.recall == pytest.approx(3 / 5)
    assert np.count_nonzero(signal > np.float32(fit.tau)) == 4  # the rule keeps what was fitted
    assert fit_tau(signal, tp, 5, 0.8).kept == 1
    assert fit_tau(signal, tp, 5, 0.55).kept == 5
    # ties are one cut: [0.9, 0.9] is kept or left whole; -inf (rejected by the rule) never
    tied = np.array([0.9, 0.9, 0.5, -np.inf])
    fit = fit_tau(tied, np.array([True, False, True, True]), 4, 0.6)
    assert fit.kept == 3 and np.count_nonzero(tied > np.float32(fit.tau)) == 3
    none = fit_tau(tied, np.array([True, False, True, True]), 4, 0.9)
    assert not none.reached and none.kept == 0 and none.tau == np.inf


def test_alluncert_signal_on_another_sets_scale() -> None:
    # m = (0.2 + mc_class)/3 with unit stds on a 10×10 box; 1/m of the pool: 10 and 2
    pool = predictions_from_rows(
        [{"image_id": "p", "mc_class": 0.1}, {"image_id": "q", "mc_class": 1.3}]
    )
    val = predictions_from_rows(
        [
            {"image_id": "v", "score": 0.9, "mc_class": 0.3},  # 1/m = 6: (6 − 2)/8 = 0.5
            {"image_id": "w", "score": 0.3, "mc_class": 0.0},  # 1/m = 15: clipped to 1
        ]
    )
    assert selection_signal(val, "alluncert", reference=pool) == pytest.approx([0.5, 0.3])
    assert selection_signal(val, "alluncert") == pytest.approx([0.0, 0.3])  # its own scale
    assert selection_signal(val, "score", reference=pool) == pytest.approx([0.9, 0.3])
