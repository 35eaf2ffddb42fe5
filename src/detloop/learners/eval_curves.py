"""Extra evaluation curves of ALGORITHMS §4: AP vs IoU threshold, confusion matrix with a
background row/column, per-class precision/recall/F1 (§1.2 monitors), per-class ROC from
softmax(logits), and mIoU, gathered by :func:`curves_report` into one JSON-ready dict.

The confusion matrix and the ROC use a **class-agnostic** one-to-one greedy matching (unlike
``coco`` matching, which is per class): per image, detections in descending score order (ties
by ``det_id``) each take the still-unmatched GT with the highest IoU ≥ τ (ties → lowest
``box_id``) whatever its class, so a misclassified box lands off the diagonal instead of being
counted as one false positive plus one miss. Crowd GTs take no part in the matching; a detection
left unmatched that lies inside a crowd region (intersection over the detection's area ≥ τ, as
pycocotools) is ignored rather than counted as background.

Torch-free: numpy, pandas, pyarrow, pycocotools (scikit-learn for the ROC, imported lazily).
(A little over 300 lines: the class-agnostic matching is kept beside its two users.)
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.errors import DataError
from detloop.data.schema import COORDS
from detloop.learners.evaluate import (
    coco_api,
    coco_datasets,
    iou_matrix,
    match_reference,
    performance_summary,
)

#: AP vs IoU thresholds of §4: 0.05, 0.10, ..., 0.95.
DEFAULT_IOU_THRESHOLDS: Final = tuple(float(t) for t in np.round(np.arange(0.05, 0.951, 0.05), 2))
#: Default score threshold of the confusion matrix and P/R/F1: detections scoring ≥ 0.3 count
#: as "predicted" (low enough to keep most true positives of a trained detector, high enough
#: that the background row is not flooded by the low-score tail kept for mAP).
DEFAULT_SCORE_THRESH: Final = 0.3


def ap_vs_iou(
    predictions: pa.Table,
    gt: pa.Table,
    images: pa.Table,
    categories: pa.Table,
    thresholds: tuple[float, ...] | list[float] | np.ndarray = DEFAULT_IOU_THRESHOLDS,
) -> dict[float, float]:
    """COCO AP at each IoU threshold, computed by pycocotools' COCOeval (§4).

    COCOeval runs once with ``params.iouThrs`` set to ``thresholds``; AP at a threshold is
    COCOeval's summary at area "all", maxDets 100: the mean precision over the 101 recall
    points and the classes with GT.

    Args:
        predictions, gt, images, categories: as for :func:`~detloop.learners.evaluate.coco_map`.
        thresholds: IoU thresholds in (0, 1]; rounded to 10 decimals (so ``np.arange`` noise
            does not leak into the keys).

    Returns:
        {threshold: AP}, in the order given; −1 where undefined (no GT), as COCOeval's stats.
    """
    from pycocotools.cocoeval import COCOeval

    thrs = np.round(np.asarray(thresholds, dtype=np.float64).ravel(), 10)
    if thrs.size == 0 or np.any((thrs <= 0) | (thrs > 1)):
        raise ValueError(f"IoU thresholds must be a non-empty list in (0, 1], got {thrs}")
    gt_dict, dt_dict = coco_datasets(predictions, gt, images, categories)
    evaluator = COCOeval(coco_api(gt_dict), coco_api(dt_dict), "bbox")
    evaluator.params.iouThrs = thrs
    evaluator.params.areaRng = [[0.0, 1e5**2]]  # "all" only: the other ranges are not reported
    evaluator.params.areaRngLbl = ["all"]
    evaluator.params.maxDets = [100]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    out: dict[float, float] = {}
    for t, thr in enumerate(thrs):
        valid = precision[t][precision[t] > -1]
        out[float(thr)] = float(np.mean(valid)) if valid.size else -1.0
    return out


def _greedy_agnostic(ious: np.ndarray, threshold: float) -> np.ndarray:
    """One-to-one greedy matching, detections (rows) already in score order.

    Returns:
        Matched GT column per detection, −1 when unmatched.
    """
    taken = np.zeros(ious.shape[1], dtype=bool)
    out = np.full(ious.shape[0], -1, dtype=np.int64)
    for d in range(ious.shape[0]):
        cand = np.where(~taken & (ious[d] >= threshold), ious[d], -np.inf)
        j = int(np.argmax(cand))  # first maximum: the lowest box_id
        if np.isfinite(cand[j]):
            out[d], taken[j] = j, True
    return out


def _coverage(det: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """Per detection, the largest intersection with a crowd box over the detection's area."""
    a, b = det[:, None, :], crowd[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    cover = np.divide(iw * ih, area, out=np.zeros_like(iw), where=area > 0)
    return np.asarray(cover.max(axis=1))


def match_agnostic(
    predictions: pa.Table, gt: pa.Table, iou: float = 0.5, score_thresh: float = 0.0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Class-agnostic one-to-one greedy matching (module docstring) of the detections with
    score ≥ ``score_thresh``.

    Returns:
        (detections, gts). detections: ``row`` (position in ``predictions``), image_id, det_id,
        class_id, score, ``gt_class`` (−1 when unmatched), ``iou`` (with the matched GT, else
        0) and ``ignored`` (inside a crowd region); gts: the non-crowd GT rows (image_id,
        box_id, class_id) with ``matched`` (bool).
    """
    p = predictions.select(["image_id", "det_id", "class_id", "score", *COORDS]).to_pandas()
    p["row"] = np.arange(len(p))
    p = p[p["score"].to_numpy() >= score_thresh]
    p = p.sort_values(
        ["image_id", "score", "det_id"], ascending=[True, False, True], kind="mergesort"
    ).reset_index(drop=True)
    g = gt.select(["image_id", "box_id", "class_id", *COORDS, "iscrowd"]).to_pandas()
    crowd = g[g["iscrowd"].to_numpy() != 0]
    g = g[g["iscrowd"].to_numpy() == 0].sort_values(["image_id", "box_id"], kind="mergesort")
    g = g.reset_index(drop=True)
    gt_class = np.full(len(p), -1, dtype=np.int64)
    best = np.zeros(len(p), dtype=np.float64)
    ignored = np.zeros(len(p), dtype=bool)
    matched = np.zeros(len(g), dtype=bool)
    p_xy, g_xy, c_xy = (f[list(COORDS)].to_numpy(np.float64) for f in (p, g, crowd))
    g_cls = g["class_id"].to_numpy(dtype=np.int64)
    gt_rows = g.groupby("image_id", sort=False).indices
    crowd_rows = crowd.groupby("image_id", sort=False).indices
    for image_id, rows in p.groupby("image_id", sort=False).indices.items():
        if (g_idx := gt_rows.get(image_id)) is not None:
            ious = iou_matrix(p_xy[rows], g_xy[g_idx])
            m = _greedy_agnostic(ious, iou)
            hit = m >= 0
            gt_class[rows[hit]] = g_cls[g_idx[m[hit]]]
            best[rows[hit]] = ious[np.flatnonzero(hit), m[hit]]
            matched[g_idx[m[hit]]] = True
        if (c_idx := crowd_rows.get(image_id)) is not None:
            free = rows[gt_class[rows] < 0]
            ignored[free] = _coverage(p_xy[free], c_xy[c_idx]) >= iou
    dets = p[["row", "image_id", "det_id", "class_id", "score"]].assign(
        gt_class=gt_class, iou=best, ignored=ignored
    )
    return dets, g[["image_id", "box_id", "class_id"]].assign(matched=matched)


def _check_classes(table: pa.Table, num_classes: int, name: str) -> None:
    """Raise DataError at the first class_id of ``table`` outside 0..num_classes−1."""
    values = np.asarray(table.column("class_id"), dtype=np.int64)
    bad = (values < 0) | (values >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        problem = f"class {int(values[row])} outside 0..{num_classes - 1}"
        raise DataError(name, row, "class_id", problem)


def confusion_matrix(
    predictions: pa.Table,
    gt: pa.Table,
    num_classes: int,
    iou: float = 0.5,
    score_thresh: float = DEFAULT_SCORE_THRESH,
) -> np.ndarray:
    """Detection confusion matrix with a background row and column (§4).

    Detections with score ≥ ``score_thresh`` are matched class-agnostically at IoU ≥ ``iou``
    (module docstring).

    Returns:
        int64 [C + 1, C + 1]: entry [g, p] counts detections of predicted class p matched to a
        GT of class g; row C (background) counts unmatched detections (false positives) per
        predicted class; column C (background) counts GTs left unmatched (misses) per class.
        Entry [C, C] is 0. Detections inside crowd regions are not counted.
    """
    _check_classes(predictions, num_classes, "predictions")
    _check_classes(gt, num_classes, "gt")
    dets, gts = match_agnostic(predictions, gt, iou, score_thresh)
    pred = dets["class_id"].to_numpy(dtype=np.int64)
    true = dets["gt_class"].to_numpy()
    counted = ~dets["ignored"].to_numpy(dtype=bool)
    true = np.where(true < 0, num_classes, true)
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    np.add.at(matrix, (true[counted], pred[counted]), 1)
    missed = gts.loc[~gts["matched"], "class_id"].to_numpy(dtype=np.int64)
    matrix[:num_classes, num_classes] = np.bincount(missed, minlength=num_classes)
    return matrix


def per_class_precision_recall_f1(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall and F1 from a :func:`confusion_matrix` (§1.2 monitors).

    precision_c = TP_c / (detections predicted c) = M[c, c] / Σ_g M[g, c] (background row
    included); recall_c = TP_c / (GTs of class c) = M[c, c] / Σ_p M[c, p] (background column
    included); F1 = 2PR / (P + R), 0 when P = R = 0. NaN where a denominator is 0 (F1 is NaN
    when P or R is).

    Returns:
        ``precision``, ``recall``, ``f1`` (float64 [C]), ``n_det`` and ``n_gt`` (int64 [C]).
    """
    m = np.asarray(matrix, dtype=np.int64)
    tp = np.diag(m)[:-1].astype(np.float64)
    n_det, n_gt = m[:, :-1].sum(axis=0), m[:-1, :].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(n_det > 0, tp / n_det, np.nan)
        recall = np.where(n_gt > 0, tp / n_gt, np.nan)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / denom, 0.0)
    f1 = np.where(np.isnan(denom), np.nan, f1)
    return {"precision": precision, "recall": recall, "f1": f1, "n_det": n_det, "n_gt": n_gt}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float64, max-shifted)."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


@dataclass(frozen=True)
class ClassRoc:
    """One-vs-rest ROC of one class; empty curve and NaN AUC without positives or negatives."""

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class RocResult:
    """Per-class ROC curves, their macro AUC (mean over defined classes) and the sample size."""

    per_class: list[ClassRoc]
    macro_auc: float
    n_matched: int


def _logit_matrix(predictions: pa.Table, rows: np.ndarray, num_classes: int) -> np.ndarray:
    logits = pc.take(predictions.column("logits"), pa.array(rows, pa.int64())).combine_chunks()
    lengths = np.asarray(pc.list_value_length(logits))
    if np.any(lengths != num_classes):
        bad = int(np.flatnonzero(lengths != num_classes)[0])
        problem = f"{lengths[bad]} logits, expected one per class ({num_classes})"
        raise DataError("predictions", int(rows[bad]), "logits", problem)
    return np.asarray(logits.flatten(), dtype=np.float64).reshape(len(rows), num_classes)


def per_class_roc(
    predictions: pa.Table,
    gt: pa.Table,
    num_classes: int,
    iou: float = 0.5,
    score_thresh: float = 0.0,
) -> RocResult:
    """One-vs-rest ROC per class of softmax(logits) on localised detections (§4).

    Samples are the detections (score ≥ ``score_thresh``) that the class-agnostic matching at
    IoU ≥ ``iou`` pairs with a GT, so at most one per GT; the label is the GT's class and the
    score for class c is softmax(logits)_c. Detections with null logits are left out.

    Returns:
        A :class:`RocResult` (curves from scikit-learn's ``roc_curve``, AUC by the trapezoid).
    """
    from sklearn.metrics import auc, roc_curve

    _check_classes(gt, num_classes, "gt")
    dets, _ = match_agnostic(predictions, gt, iou, score_thresh)
    dets = dets[dets["gt_class"].to_numpy() >= 0]
    rows = dets["row"].to_numpy(dtype=np.int64)
    valid = np.asarray(predictions.column("logits").is_valid())[rows]
    rows, labels = rows[valid], dets["gt_class"].to_numpy(dtype=np.int64)[valid]
    probs = softmax(_logit_matrix(predictions, rows, num_classes)) if rows.size else None
    curves: list[ClassRoc] = []
    for c in range(num_classes):
        y = labels == c
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if probs is None or n_pos == 0 or n_neg == 0:
            curves.append(ClassRoc(np.zeros(0), np.zeros(0), math.nan, n_pos, n_neg))
            continue
        fpr, tpr, _ = roc_curve(y, probs[:, c])
        curves.append(ClassRoc(fpr, tpr, float(auc(fpr, tpr)), n_pos, n_neg))
    aucs = [r.auc for r in curves if not math.isnan(r.auc)]
    return RocResult(curves, float(np.mean(aucs)) if aucs else math.nan, int(rows.size))


def _num(x: float) -> float | None:
    """A JSON-safe float: NaN → null."""
    return None if math.isnan(x) else float(x)


def _prf_json(prf: dict[str, np.ndarray], names: list[str]) -> dict[str, Any]:
    keys = ("precision", "recall", "f1")
    return {
        name: {**{k: _num(float(prf[k][c])) for k in keys},
               "n_det": int(prf["n_det"][c]), "n_gt": int(prf["n_gt"][c])}
        for c, name in enumerate(names)
    }  # fmt: skip


def _roc_json(roc: RocResult, names: list[str], iou: float) -> dict[str, Any]:
    per_class = {
        name: {"fpr": r.fpr.tolist(), "tpr": r.tpr.tolist(), "auc": _num(r.auc),
               "n_pos": r.n_pos, "n_neg": r.n_neg}
        for name, r in zip(names, roc.per_class, strict=True)
    }  # fmt: skip
    return {"iou": iou, "n_matched": roc.n_matched, "macro_auc": _num(roc.macro_auc),
            "per_class": per_class}  # fmt: skip


def curves_report(
    predictions: pa.Table,
    gt: pa.Table,
    images: pa.Table,
    categories: pa.Table,
    *,
    iou: float = 0.5,
    score_thresh: float = DEFAULT_SCORE_THRESH,
    thresholds: tuple[float, ...] | list[float] | np.ndarray = DEFAULT_IOU_THRESHOLDS,
) -> dict[str, Any]:
    """All extra curves of §4 as one JSON-serialisable dict (NaN written as null).

    Keys: ``classes`` (names by class_id); ``ap_vs_iou`` {iou, ap}; ``confusion`` {iou,
    score_thresh, labels (classes + "background"), matrix}; ``per_class`` {name: precision,
    recall, f1, n_det, n_gt} from the confusion matrix; ``roc`` {iou, n_matched, macro_auc,
    per_class {name: fpr, tpr, auc, n_pos, n_neg}} (all detections, score ≥ 0); ``miou`` {all,
    matched} from the ``reference`` matching's performance summary.
    """
    ids = categories.column("class_id").to_pylist()
    names_by_id = dict(zip(ids, categories.column("name").to_pylist(), strict=True))
    num_classes = max(ids) + 1 if ids else 0
    names = [str(names_by_id.get(c, c)) for c in range(num_classes)]
    ap = ap_vs_iou(predictions, gt, images, categories, thresholds)
    matrix = confusion_matrix(predictions, gt, num_classes, iou, score_thresh)
    roc = per_class_roc(predictions, gt, num_classes, iou)
    summary = performance_summary(match_reference(predictions, gt), predictions)
    confusion = {"iou": iou, "score_thresh": score_thresh, "labels": [*names, "background"],
                 "matrix": matrix.tolist()}  # fmt: skip
    return {
        "classes": names,
        "ap_vs_iou": {"iou": list(ap), "ap": list(ap.values())},
        "confusion": confusion,
        "per_class": _prf_json(per_class_precision_recall_f1(matrix), names),
        "roc": _roc_json(roc, names, iou),
        "miou": {"all": _num(summary["miou_all"]), "matched": _num(summary["miou_matched"])},
    }
