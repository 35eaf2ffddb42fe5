"""Pseudo-label selection and weighting (§11.2) and PLS (§11.7)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from detloop.data import schema
from detloop.data.synthetic import predictions_from_rows, synthetic_predictions
from detloop.selectors.pseudo import (
    PseudoSpec,
    TeacherSpec,
    cap_per_image,
    parse_pseudo_strategy,
    parse_teacher_strategy,
    pls_scores,
    pls_select,
    pseudo_labels_table,
    select_pseudo_labels,
)
from detloop.selectors.strategy import StrategyError


def test_parse_selection_strategies() -> None:
    assert parse_pseudo_strategy("score") == PseudoSpec()
    assert parse_pseudo_strategy("pseudoscore_calib_all_uncert") == PseudoSpec(
        score="alluncert", calib=True, pseudoscore=True
    )
    assert parse_pseudo_strategy("selftrain_box_norm_combo") == PseudoSpec(
        score="combo", norm=True, selftrain=True
    )
    assert parse_pseudo_strategy("entropy_cal").score == "entropy_cal"
    with pytest.raises(StrategyError, match=r"'alluncrt'.*'alluncert'"):
        parse_pseudo_strategy("pseudoscore_alluncrt")


def test_score_tau_filter() -> None:
    preds = predictions_from_rows(
        [
            {"image_id": "a", "score": 0.9},
            {"image_id": "a", "score": 0.4},  # exactly τ: dropped (score > τ)
            {"image_id": "b", "score": 0.2},
        ]
    )
    kept = select_pseudo_labels(preds, "score", tau=0.4)
    assert kept["image_id"].to_pylist() == ["a"] and kept["det_id"].to_pylist() == [0]
    assert kept["weight"].to_pylist() == [1.0]
    weighted = select_pseudo_labels(preds, "pseudoscore_score", tau=0.4)
    assert weighted["weight"].to_pylist() == pytest.approx([0.9])


def test_combo_uses_unnormalised_u_below_threshold_mean() -> None:
    rows = [
        {"image_id": "a", "score": 0.9, "entropy": 0.1},  # u = 0.1
        {"image_id": "a", "score": 0.9, "entropy": 0.5},  # u = 0.5 = δ̄: dropped
        {"image_id": "b", "score": 0.3, "entropy": 0.0},  # score below τ
        {"image_id": "b", "score": 0.8, "entropy": 0.49},
    ]
    thr = {"uncertainties": ["entropy"], "weights": [1.0], "thresholds": [0.4, 0.6]}
    kept = select_pseudo_labels(predictions_from_rows(rows), "pseudoscore_combo", 0.4, thr)
    assert kept["u"].to_pylist() == pytest.approx([0.1, 0.49])
    assert kept["weight"].to_pylist() == pytest.approx([1 - 0.1 / 0.5, 1 - 0.49 / 0.5])
    with pytest.raises(ValueError, match="thresholding result"):
        select_pseudo_labels(predictions_from_rows(rows), "combo", 0.4)


def test_alluncert_certainty_filter_and_ental_weights() -> None:
    # mean uncertainty m = mean(rel(mc), rel(al), mc_class); with unit stds on a 10×10 box
    # rel = 0.1, so m = (0.2 + mc_class)/3
    rows = [
        {"image_id": "a", "score": 0.9, "mc_class": 0.1},  # m = 0.1 → most certain
        {"image_id": "b", "score": 0.9, "mc_class": 0.4},  # m = 0.2
        {"image_id": "c", "score": 0.9, "mc_class": 1.3},  # m = 0.5 → least certain
    ]
    preds = predictions_from_rows(rows)
    kept = select_pseudo_labels(preds, "pseudoscore_alluncert", tau=0.4)
    inv = 1 / np.array([0.1, 0.2, 0.5])
    cert = (inv - inv.min()) / (inv.max() - inv.min())  # [1, 0.375, 0]
    assert kept["image_id"].to_pylist() == ["a"]  # certainty 0.375 and 0 are ≤ τ
    assert kept["certainty"].to_pylist() == pytest.approx([cert[0]])
    ental = select_pseudo_labels(preds, "ental", tau=0.4)
    assert ental.num_rows == 3 and ental["weight"].to_pylist() == [1.0] * 3
    assert ental["certainty"].null_count == 0


def test_pseudo_labels_table_is_valid() -> None:
    preds, _ = synthetic_predictions(20, 100, np.random.default_rng(0))
    kept = select_pseudo_labels(preds, "pseudoscore_epuncert", tau=0.4)
    labels = pseudo_labels_table(kept, iteration=2)
    schema.validate_table(labels, schema.LABELS)
    assert set(labels["source"].to_pylist()) == {"pseudo"}
    assert labels.num_rows == kept.num_rows > 0


def _teacher() -> tuple[pa.Table, pa.Table]:
    # image a: 4 candidates, 2 above 0.4 → S = 0.5; b: 2 of 2 → S = 1; c: 1 of 4 → S = 0.25
    scores = {"a": [0.9, 0.5, 0.2, 0.1], "b": [0.8, 0.7], "c": [0.95, 0.3, 0.2, 0.15], "d": [0.6]}
    teacher = predictions_from_rows(
        [{"image_id": i, "score": s} for i, ss in scores.items() for s in ss]
    )
    # pseudo-labels: a {car, car}, b {car, tram}, c {car}, d {tram}; shares car 4/6, tram 2/6
    pseudo = pa.table(
        {
            "image_id": ["a", "a", "b", "b", "c", "d"],
            "class_id": pa.array([0, 0, 0, 1, 0, 1], pa.int32()),
        }
    )
    return teacher, pseudo


def test_pls_scores_known_answer() -> None:
    teacher, pseudo = _teacher()
    out = pls_scores(teacher, pseudo, tau=0.4, beta=0.1).to_pydict()
    assert out["image_id"] == ["a", "b", "c", "d"]
    np.testing.assert_allclose(out["S"], [0.5, 1.0, 0.25, 1.0])
    rare_car, rare_tram = 1 - 4 / 6, 1 - 2 / 6
    np.testing.assert_allclose(
        out["C"], [rare_car, (rare_car + rare_tram) / 2, rare_car, rare_tram]
    )
    np.testing.assert_allclose(out["D"], 0.9 * np.array(out["S"]) + 0.1 * np.array(out["C"]))


def test_pls_top_fraction_bot_and_rand() -> None:
    teacher, pseudo = _teacher()
    scores = pls_scores(teacher, pseudo)
    # D: a 0.483, b 0.95, c 0.258, d 0.967 → top 40 % of 4 = ceil(1.6) = 2 images
    assert pls_select(scores, 0.4) == ["b", "d"]
    assert pls_select(scores, 0.4, "bot") == ["a", "c"]
    # 0.5 × 4 is exactly 2 (no float ceil surprise)
    assert len(pls_select(scores, 0.5)) == 2
    rand = pls_select(scores, 0.4, "rand", np.random.default_rng(0))
    assert len(rand) == 2 and rand == pls_select(scores, 0.4, "rand", np.random.default_rng(0))
    with pytest.raises(ValueError, match="generator"):
        pls_select(scores, 0.4, "rand")


def test_pls_top_k_of_ten_images_keeps_the_four_highest() -> None:
    # image k has k+1 teacher detections, one of them (score 0.9) above δ_S: S = 1/(k+1);
    # every pseudo-label is class 0, so C = 0 and D = 0.9·S
    rows = [
        {"image_id": f"i{k}", "score": 0.9 if d == 0 else 0.2}
        for k in range(10)
        for d in range(k + 1)
    ]
    teacher = predictions_from_rows(rows)
    pseudo = pa.table(
        {"image_id": [f"i{k}" for k in range(10)], "class_id": pa.array([0] * 10, pa.int32())}
    )
    scores = pls_scores(teacher, pseudo)
    np.testing.assert_allclose(scores["D"].to_numpy(), [0.9 / (k + 1) for k in range(10)])
    assert pls_select(scores, 0.4) == ["i0", "i1", "i2", "i3"]
    assert len(pls_select(scores, 0.4, "bot")) == 6


def test_combo_null_threshold_means_keep_everything_above_tau() -> None:
    rows = [{"image_id": "a", "score": 0.9, "entropy": 5.0}, {"image_id": "b", "score": 0.1}]
    thr = {"uncertainties": ["entropy"], "weights": [1.0], "threshold_mean": None}
    kept = select_pseudo_labels(predictions_from_rows(rows), "pseudoscore_combo", 0.4, thr)
    assert kept["image_id"].to_pylist() == ["a"] and kept["weight"].to_pylist() == [1.0]


def test_pseudo_labels_table_weights_and_box_ids() -> None:
    preds = predictions_from_rows(
        [{"image_id": "a", "score": 0.9}, {"image_id": "b", "score": 0.8}]
    )
    kept = select_pseudo_labels(preds, "pseudoscore_score", tau=0.4)
    labels = pseudo_labels_table(kept, iteration=3, first_box_id=100)
    assert labels["box_id"].to_pylist() == [100, 101]
    assert labels["iteration"].to_pylist() == [3, 3]
    assert labels["weight"].to_pylist() == pytest.approx([0.9, 0.8])


def test_cap_per_image_keeps_the_highest_scores() -> None:
    preds = predictions_from_rows(
        [{"image_id": "a", "score": s} for s in (0.5, 0.9, 0.7)] + [{"image_id": "b", "score": 0.6}]
    )
    kept = cap_per_image(select_pseudo_labels(preds, "score", tau=0.4), 2)
    assert kept["image_id"].to_pylist() == ["a", "a", "b"]
    assert sorted(kept["score"].to_pylist()) == pytest.approx([0.6, 0.7, 0.9])


def test_teacher_strategy_tokens() -> None:
    assert parse_teacher_strategy("") == TeacherSpec()
    spec = parse_teacher_strategy("rcc_scale_curriculum_learning_aug_curr")
    assert spec.rcc and spec.rcc_scale and spec.curriculum and spec.curriculum_aug
    assert spec.curriculum_pseudo and not spec.imscore
    assert parse_teacher_strategy(spec.name) == spec
    with pytest.raises(StrategyError, match=r"'curriculm'.*'curriculum_learning'"):
        parse_teacher_strategy("rcc_curriculm")
    with pytest.raises(StrategyError, match="aug needs 'curriculum_learning'"):
        parse_teacher_strategy("aug")


def test_ignore_regions_follow_the_pseudo_labels_of_stream_images() -> None:
    """``with_ignore_regions``: the pseudo rows first, then every teacher detection with score
    ≥ min_score on an image that has a pseudo-label (class ``IGNORE_CLASS_ID``); detections on
    other images and below the score floor are left out."""
    from detloop.data.labels import IGNORE_CLASS_ID
    from detloop.selectors.pseudo import STREAM_COLUMNS, with_ignore_regions

    pseudo = pa.table(
        {
            "image_id": ["a", "b"],
            "class_id": pa.array([2, 0], pa.int32()),
            "x1": [1.0, 2.0], "y1": [1.0, 2.0], "x2": [5.0, 6.0], "y2": [5.0, 6.0],
            "weight": pa.array([0.5, 1.0], pa.float32()),
            "source": ["pseudo", "pseudo"],
        }
    )  # fmt: skip
    preds = pa.table(
        {
            "image_id": ["a", "a", "b", "c"],
            "score": pa.array([0.9, 0.05, 0.3, 0.95], pa.float32()),
            "x1": [1.0, 7.0, 8.0, 9.0], "y1": [1.0, 7.0, 8.0, 9.0],
            "x2": [5.0, 9.0, 12.0, 19.0], "y2": [5.0, 9.0, 12.0, 19.0],
        }
    )  # fmt: skip
    out = with_ignore_regions(pseudo, preds, min_score=0.1)
    assert out.column_names == list(STREAM_COLUMNS)
    assert out.slice(0, 2).to_pylist() == pseudo.select(list(STREAM_COLUMNS)).to_pylist()
    regions = out.slice(2)
    assert regions["image_id"].to_pylist() == ["a", "b"]  # not c (no pseudo-label), not 0.05
    assert set(regions["class_id"].to_pylist()) == {IGNORE_CLASS_ID}
    assert regions["x1"].to_pylist() == [1.0, 8.0] and regions["y2"].to_pylist() == [5.0, 12.0]
