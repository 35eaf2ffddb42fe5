"""Hand tables for the auto-labeling rule (ALGORITHMS §8 "Tests that pin it")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from detloop.selectors.autolabel import (
    auto_label_table,
    box_iou,
    decide,
    quality_report,
    score_rule_ids,
    selection_table,
    share_at_precision,
    uncertainty_rankings,
)
from detloop.selectors.threshold import ThresholdResult


def thresholds(delta: float | None = 1.0, w: tuple[float, float] = (1.0, 10.0)) -> ThresholdResult:
    return ThresholdResult(
        uncertainties=["entropy", "albox_rel"], weights=list(w), thresholds=[delta] * 6,
        threshold_mean=delta, thr_fpr_tpr=0.95, thr_cd=True,
        thr_iou_thrs=[0.5, 0.55, 0.6, 0.65, 0.7, 0.75], fd_scope="matched", calibrated=True,
        calib_method_class="iso_percls", calib_method_box="iso_perclscoo", optimizer="optuna-tpe",
        seed=0, n_trials=1, objective=0.0,
    )  # fmt: skip


def preds(rows: list[tuple[str, int, float, float, float]]) -> pd.DataFrame:
    """(image, det_id, score, entropy_cal, al_cal) rows; boxes 10x10 at the origin + det_id*20."""
    df = pd.DataFrame(rows, columns=["image_id", "det_id", "score", "entropy_cal", "al"])
    off = df["det_id"] * 20.0
    df["class_id"] = 1
    df["x1"], df["y1"], df["x2"], df["y2"] = off, off, off + 10, off + 10
    for c in ("x1", "y1", "x2", "y2"):
        df[f"al_{c}_cal"] = df["al"]
    return df.drop(columns="al")


def test_a_one_uncertain_detection_sends_image_to_examine() -> None:
    # first detection certain, the second has u = 0.5 + 10 * (3/10) = 3.5 > δ̄ = 1
    p = preds([("img", 0, 0.9, 0.1, 0.1), ("img", 1, 0.8, 0.5, 3.0)])
    d = decide(p, ["img"], thresholds(), min_score=0.4)
    assert d.images.set_index("image_id").loc["img", "verdict"] == "examine"
    assert d.detections["u"].tolist() == pytest.approx([0.2, 3.5])


def test_b_u_equal_to_delta_examines_and_score_equal_min_score_is_ignored() -> None:
    p = preds([("eq", 0, 0.9, 1.0, 0.0), ("ign", 0, 0.4, 9.0, 9.0), ("ign", 1, 0.9, 0.0, 0.0)])
    d = decide(p, ["eq", "ign"], thresholds(), min_score=0.4)
    v = d.images.set_index("image_id")["verdict"]
    assert v["eq"] == "examine"
    assert v["ign"] == "auto_labeled"
    assert d.images.set_index("image_id").loc["ign", "n_det"] == 1


def test_c_no_detection_above_min_score_is_auto_labeled_with_zero_labels() -> None:
    p = preds([("empty", 0, 0.1, 5.0, 5.0)])
    d = decide(p, ["empty", "none"], thresholds(), min_score=0.4)
    assert set(d.ids("auto_labeled")) == {"empty", "none"}
    labels = auto_label_table(d, iteration=2, start_box_id=100)
    assert labels.num_rows == 0
    d2 = decide(p, ["empty"], thresholds(), min_score=0.4, empty_image="examine")
    assert d2.ids("examine") == ["empty"]


def test_d_quality_report_counts_a_stray_detection_as_fp() -> None:
    p = preds([("a", 0, 0.9, 0.0, 0.0), ("a", 1, 0.9, 0.0, 0.0), ("b", 0, 0.9, 0.0, 0.0)])
    d = decide(p, ["a", "b"], thresholds(), min_score=0.4)
    gt = pd.DataFrame({"image_id": ["a", "b"], "class_id": [1, 1], "x1": [0.0, 0.0],
                       "y1": [0.0, 0.0], "x2": [10.0, 10.0], "y2": [10.0, 10.0]})  # fmt: skip
    q = quality_report(d, gt)
    assert (q["tp"], q["fp"], q["fn"]) == (2, 1, 0)  # det 1 of image a is a background FP
    assert q["label_precision"] == pytest.approx(2 / 3)
    assert q["pct_error_free"] == pytest.approx(50.0)
    assert q["pct_auto_labeled"] == pytest.approx(100.0)
    assert q["image_precision"] == pytest.approx(0.5)  # image a has a wrong box
    assert q["score_rule_image_precision"] == pytest.approx(0.5)  # same share: same images


def test_e_score_rule_at_equal_share_beside_the_uncertainty_rule() -> None:
    """Image c is certain but its score is the lowest: the score rule at the same share (two
    images) auto-labels the empty image and b instead; b's box is wrong, c's right."""
    p = preds([("b", 0, 0.95, 5.0, 5.0), ("c", 0, 0.6, 0.1, 0.1)])
    d = decide(p, ["b", "c", "empty"], thresholds(), min_score=0.4)
    assert d.ids("auto_labeled") == ["c", "empty"]
    assert score_rule_ids(d.detections, ["b", "c", "empty"], 2) == ["empty", "b"]
    gt = pd.DataFrame({"image_id": ["b", "c"], "class_id": [1, 1], "x1": [50.0, 0.0],
                       "y1": [50.0, 0.0], "x2": [60.0, 10.0], "y2": [60.0, 10.0]})  # fmt: skip
    q = quality_report(d, gt)
    assert q["image_precision"] == 1.0 and q["score_rule_image_precision"] == 0.5


def test_infinite_delta_labels_everything_and_tables_validate() -> None:
    p = preds([("a", 0, 0.9, 3.0, 2.0), ("a", 1, 0.7, 0.0, 0.0), ("b", 0, 0.9, 9.0, 9.0)])
    d = decide(p, ["a", "b"], thresholds(delta=None), min_score=0.4)
    assert d.ids("auto_labeled") == ["a", "b"]
    labels = auto_label_table(d, iteration=1, start_box_id=5)
    assert labels["box_id"].to_pylist() == [5, 6, 7]
    assert set(labels["source"].to_pylist()) == {"auto"}
    sel = selection_table(d, iteration=1)
    assert sel["verdict"].to_pylist() == ["auto_labeled", "auto_labeled"]
    assert sel["delta"].null_count == 2


def test_selection_table_ranks_by_u() -> None:
    p = preds([("x", 0, 0.9, 0.3, 0.0), ("y", 0, 0.9, 0.1, 0.0), ("z", 0, 0.9, 2.0, 0.0)])
    sel = selection_table(decide(p, ["x", "y", "z"], thresholds(), 0.4), iteration=3)
    assert sel["image_id"].to_pylist() == ["y", "x", "z"]
    assert sel["selected"].to_pylist() == [True, True, False]
    assert sel["u"].to_pylist() == pytest.approx([0.1, 0.3, 2.0])


def test_box_iou_and_rankings() -> None:
    a = np.array([[0, 0, 10, 10.0]])
    b = np.array([[5, 0, 15, 10.0], [20, 20, 30, 30.0]])
    np.testing.assert_allclose(box_iou(a, b), [[50 / 150, 0.0]])
    p = preds([("a", 0, 0.9, 0.1, 1.0), ("b", 0, 0.9, 0.2, 5.0)])
    r = uncertainty_rankings(p, calibrated=True, frac=0.5)
    assert r["albox_rel"]["top"] == ["b"] and r["entropy"]["bottom"] == ["a"]


def test_share_at_precision_against_brute_force() -> None:
    """Every threshold between distinct u values, tried one by one."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        u = rng.integers(0, 6, n).astype(float)  # ties on purpose
        u[rng.random(n) < 0.2] = np.nan
        ok = rng.random(n) < 0.8
        key = np.nan_to_num(u, nan=-np.inf)
        best = 0.0
        for t in np.unique(key):
            take = key <= t
            if ok[take].mean() >= 0.9:
                best = max(best, take.mean())
        assert share_at_precision(u, ok, 0.9) == pytest.approx(best)
    assert share_at_precision([], [], 0.95) == 0.0
