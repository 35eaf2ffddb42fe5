"""Extra evaluation curves (ALGORITHMS §4): AP vs IoU, confusion matrix, P/R/F1, ROC, plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score

from detloop.data.errors import DataError
from detloop.learners.eval_curves import (
    DEFAULT_IOU_THRESHOLDS,
    ap_vs_iou,
    confusion_matrix,
    curves_report,
    per_class_precision_recall_f1,
    per_class_roc,
    softmax,
)
from detloop.learners.evaluate import coco_map
from detloop.reports.eval_plots import write_eval_plots
from test_evaluate import categories_table, gt_table, pred_table, random_fixture


def with_logits(preds: pa.Table, logits: np.ndarray) -> pa.Table:
    column = pa.array([list(map(float, row)) for row in logits], pa.list_(pa.float32()))
    return preds.set_column(preds.schema.get_field_index("logits"), "logits", column)


def rows_to_preds(rows: list[tuple[Any, ...]]) -> pa.Table:
    keys = ("image_id", "det_id", "class_id", "score", "box")
    return pred_table([dict(zip(keys, r, strict=True)) for r in rows])


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_vs_iou_equals_cocoeval(seed: int) -> None:
    fx = random_fixture(seed)
    tables = (fx["predictions"], fx["gt"], fx["images"], fx["categories"])
    ap = ap_vs_iou(*tables)
    ref = coco_map(*tables)
    assert list(ap) == list(DEFAULT_IOU_THRESHOLDS) and len(ap) == 19
    assert ap[0.5] == pytest.approx(ref["map50"], abs=1e-9)
    assert ap[0.75] == pytest.approx(ref["map75"], abs=1e-9)
    coco_range = [ap[t] for t in DEFAULT_IOU_THRESHOLDS if t >= 0.5]
    assert np.mean(coco_range) == pytest.approx(ref["map"], abs=1e-9)
    assert ap[0.05] >= ap[0.5] > ap[0.95]
    assert ap_vs_iou(*tables, thresholds=np.array([0.75]))[0.75] == ap[0.75]
    no_gt = ap_vs_iou(tables[0], fx["gt"].slice(0, 0), *tables[2:], thresholds=[0.5])
    assert no_gt == {0.5: -1.0}  # undefined, as COCOeval's stats
    with pytest.raises(ValueError, match="IoU thresholds"):
        ap_vs_iou(*tables, thresholds=[0.0])


def confusion_hand_case() -> tuple[pa.Table, pa.Table]:
    """4 classes; class 3 has neither GT nor detections."""
    gt = gt_table(
        [
            {"image_id": "a", "class_id": 0, "box": (0, 0, 10, 10), "box_id": 1},
            {"image_id": "a", "class_id": 1, "box": (20, 20, 40, 40), "box_id": 2},
            {"image_id": "a", "class_id": 2, "box": (100, 100, 120, 120), "box_id": 3},
            {"image_id": "b", "class_id": 0, "box": (0, 0, 100, 100), "iscrowd": 1},
        ]
    )
    preds = rows_to_preds(
        [
            ("a", 0, 0, 0.9, (0, 0, 10, 11)),  # correct: GT 1 → [0, 0]
            ("a", 1, 2, 0.8, (21, 20, 41, 40)),  # misclassified: GT 2 (class 1) → [1, 2]
            ("a", 2, 1, 0.7, (60, 60, 80, 80)),  # stray → background row, column 1
            ("a", 3, 0, 0.6, (0, 0, 10, 10)),  # duplicate of GT 1, already taken → [4, 0]
            ("a", 4, 1, 0.1, (100, 100, 120, 120)),  # below the score threshold: GT 3 missed
            ("b", 0, 2, 0.9, (10, 10, 30, 30)),  # inside the crowd region: not counted
        ]
    )
    return preds, gt


def test_confusion_matrix_hand_example() -> None:
    preds, gt = confusion_hand_case()
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 0, 1],  # the missed GT: background column
            [0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],  # the duplicate and the stray: background row
        ]
    )
    matrix = confusion_matrix(preds, gt, num_classes=4, iou=0.5, score_thresh=0.3)
    assert matrix.dtype == np.int64
    np.testing.assert_array_equal(matrix, expected)
    low = confusion_matrix(preds, gt, num_classes=4, score_thresh=0.0)
    assert low[2, 1] == 1 and low[2, 4] == 0  # det 4 now takes GT 3, with the wrong class


def test_confusion_matrix_class_agnostic_greedy_and_errors() -> None:
    gt = gt_table([{"image_id": "a", "class_id": 0, "box": (0, 0, 10, 10)}])
    # equal scores: the lower det_id goes first; it takes the GT although its class is wrong
    preds = rows_to_preds([("a", 1, 0, 0.5, (0, 0, 10, 10)), ("a", 0, 1, 0.5, (0, 0, 10, 9))])
    np.testing.assert_array_equal(confusion_matrix(preds, gt, 2), [[0, 1, 0], [0, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(
        confusion_matrix(preds, gt, 2, iou=0.95), [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    )
    with pytest.raises(DataError, match=r"class 1 outside 0\.\.0"):
        confusion_matrix(preds, gt, 1)


def test_precision_recall_f1_hand_example() -> None:
    preds, gt = confusion_hand_case()
    prf = per_class_precision_recall_f1(confusion_matrix(preds, gt, 4, score_thresh=0.3))
    np.testing.assert_array_equal(prf["n_det"], [2, 1, 1, 0])
    np.testing.assert_array_equal(prf["n_gt"], [1, 1, 1, 0])
    np.testing.assert_allclose(prf["precision"], [0.5, 0.0, 0.0, np.nan])
    np.testing.assert_allclose(prf["recall"], [1.0, 0.0, 0.0, np.nan])
    np.testing.assert_allclose(prf["f1"], [2 / 3, 0.0, 0.0, np.nan])


def test_confusion_matrix_sums_on_random_fixture() -> None:
    fx = random_fixture(2)
    preds, gt = fx["predictions"], fx["gt"]
    matrix = confusion_matrix(preds, gt, 4, score_thresh=0.3)
    g = gt.to_pandas()
    per_class = g[g["iscrowd"] == 0]["class_id"].value_counts().reindex(range(4), fill_value=0)
    np.testing.assert_array_equal(matrix[:4].sum(axis=1), per_class.to_numpy())
    n_kept = int((np.asarray(preds.column("score")) >= 0.3).sum())
    assert 0 < matrix[:, :4].sum() <= n_kept and matrix[4, 4] == 0
    assert np.trace(matrix[:4, :4]) > 0 and matrix[:4, :4].sum() > np.trace(matrix[:4, :4])


def roc_fixture(seed: int, n_classes: int = 4) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """Exact boxes on every GT (classes 0..n−2, the last class has no GT) plus strays, all
    with random logits; returns predictions, gt and the GT class per exact detection."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes - 1, size=120)
    gt_rows, rows = [], []
    for k, c in enumerate(labels):
        image_id = f"img{k // 6}"
        box = (40.0 * (k % 6), 0.0, 40.0 * (k % 6) + 30, 30.0)
        gt_rows.append({"image_id": image_id, "class_id": int(c), "box": box, "box_id": k})
        rows.append((image_id, k % 6, int(rng.integers(0, n_classes)), 0.5, box))
    for i in range(5):
        rows.append((f"img{i}", 10, 0, 0.9, (500.0, 500.0, 520.0, 520.0)))  # strays
    preds = with_logits(rows_to_preds(rows), rng.normal(0, 2, size=(len(rows), n_classes)))
    return preds, gt_table(gt_rows), labels


def test_per_class_roc_equals_sklearn() -> None:
    preds, gt, labels = roc_fixture(0)
    result = per_class_roc(preds, gt, num_classes=4)
    assert result.n_matched == len(labels)
    probs = softmax(np.stack(preds.column("logits").to_numpy(zero_copy_only=False))[: len(labels)])
    for c in range(3):
        expected = roc_auc_score(labels == c, probs[:, c])
        assert result.per_class[c].auc == pytest.approx(expected, abs=1e-12)
        assert result.per_class[c].n_pos == int((labels == c).sum())
        assert result.per_class[c].fpr[0] == 0.0 and result.per_class[c].tpr[-1] == 1.0
    last = result.per_class[3]
    assert math.isnan(last.auc) and last.n_pos == 0 and last.fpr.size == 0
    assert result.macro_auc == pytest.approx(np.mean([r.auc for r in result.per_class[:3]]))
    nulls = preds.set_column(
        preds.schema.get_field_index("logits"),
        "logits",
        pa.nulls(preds.num_rows, preds.schema.field("logits").type),
    )
    assert per_class_roc(nulls, gt, 4).n_matched == 0


def test_curves_report_is_json_and_plots_are_written(tmp_path: Path) -> None:
    fx = random_fixture(1)
    rng = np.random.default_rng(1)
    preds = with_logits(fx["predictions"], rng.normal(size=(fx["predictions"].num_rows, 4)))
    report = curves_report(preds, fx["gt"], fx["images"], fx["categories"])
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text) == report
    assert report["confusion"]["labels"] == ["car", "person", "bike", "truck", "background"]
    assert len(report["ap_vs_iou"]["ap"]) == 19 and report["roc"]["n_matched"] > 0
    assert set(report["per_class"]["car"]) == {"precision", "recall", "f1", "n_det", "n_gt"}
    assert 0 < report["miou"]["all"] <= report["miou"]["matched"] <= 1
    paths = write_eval_plots(report, tmp_path / "eval", prefix="val_")
    assert [p.name for p in paths] == ["val_ap_vs_iou.png", "val_confusion.png", "val_roc.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_curves_report_without_detections() -> None:
    fx = random_fixture(3)
    empty = fx["predictions"].slice(0, 0)
    report = curves_report(empty, fx["gt"], fx["images"], categories_table(4))
    assert report["ap_vs_iou"]["ap"][0] == 0.0 and report["roc"]["macro_auc"] is None
    assert report["per_class"]["car"]["precision"] is None
    assert report["per_class"]["car"]["recall"] == 0.0
    json.dumps(report, allow_nan=False)
