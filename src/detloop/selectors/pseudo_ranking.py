"""Which signal tells a right pseudo-label from a wrong one: the teacher's candidate detections
ranked by each selection signal and scored against the pool's hidden ground truth (simulated
runs).

A pseudo-label selection is a threshold on a ranking; its precision and recall move along that
ranking's precision–recall curve as the threshold moves. Comparing selections at their default
thresholds mixes two things — how well a signal ranks and how many detections its threshold
keeps — so this module measures the ranking alone:

- ``ap``: the area under the ranking's precision–recall curve, recall counted against every gt
  box of the candidate images (missed objects included), non-interpolated:
  AP = Σ over true detections at rank i of precision@i / n_gt;
- ``precision_at_k`` / ``recall_at_k``: at the count k the score rule (score > τ, STAC) keeps —
  so "signal X at STAC's count" is the comparison at equal quantity.

Matching follows the ranking (as COCO's does the score): detections in descending signal order
each take the unused gt box of their image and class with the highest IoU ≥ ``iou``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.selectors.columns import BoolArray, DetColumns, FloatArray
from detloop.selectors.pseudo import vector_certainty
from detloop.selectors.pseudo_correctness import CorrectnessModel
from detloop.selectors.scores import combo_values
from detloop.selectors.ssl_3d import match_rows, match_rows_at

#: the uncertainty strategies whose certainty is ranked (each also ranked joined with the
#: score as its selection joins them: ``min(score, certainty)``, kept iff both pass τ)
CERTAINTY_STRATEGIES: Final = ("alluncert", "ental", "epuncert")


@dataclass(frozen=True)
class RankingQuality:
    """One signal's ranking of the candidates against the hidden gt."""

    ap: float
    precision_at_k: float
    recall_at_k: float
    k: int

    def as_dict(self, name: str) -> dict[str, float]:
        return {
            f"rank_ap_{name}": self.ap,
            f"rank_precision_at_k_{name}": self.precision_at_k,
            f"rank_recall_at_k_{name}": self.recall_at_k,
        }


def ranking_signals(
    predictions: pa.Table,
    thresholds: Mapping[str, Any] | None = None,
    correctness: CorrectnessModel | None = None,
) -> dict[str, FloatArray]:
    """The signals to rank ``predictions`` by (higher = more trusted), per detection.

    ``score``; ``score_cal`` when the teacher was calibrated; for each of
    ``CERTAINTY_STRATEGIES`` its certainty (min-max of 1 / mean relative uncertainty, §11.2)
    and ``<name>_and_score`` = min(score, certainty), the joint rule ``alluncert`` selects by
    (score > τ and certainty > τ: ``alluncert_and_score`` is its own ranking); ``combo`` = −u
    when a thresholding result is given (kept iff u < δ̄); ``pcorrect`` = P(right) when a
    correctness model (fitted on validation, on the stored columns) is given.
    """
    cols = DetColumns(predictions)
    score = cols.get("score")
    out: dict[str, FloatArray] = {"score": score}
    if "score_cal" in predictions.column_names:
        out["score_cal"] = cols.get("score_cal")
    for name in CERTAINTY_STRATEGIES:
        certainty = vector_certainty(cols, name)
        out[name] = certainty
        out[f"{name}_and_score"] = np.minimum(score, certainty)
    if thresholds is not None:
        out["combo"] = -combo_values(cols, thresholds)
    if correctness is not None:
        out["pcorrect"] = correctness.predict(cols)
    return out


def rank_true(
    predictions: pa.Table, values: FloatArray, gt: pa.Table, iou: float = 0.5
) -> BoolArray:
    """Per detection of ``predictions``, whether it matches a gt box when detections are
    matched in descending ``values`` order (see the module docstring)."""
    gt_row, _ = match_rows(predictions, values, gt, iou)
    return gt_row >= 0


#: COCO's IoU thresholds of mAP@[.5:.95]: 0.50, 0.55, …, 0.95
COCO_IOUS: Final = tuple(float(t) for t in np.round(np.arange(0.5, 0.951, 0.05), 2))


def rank_true_coco(predictions: pa.Table, values: FloatArray, gt: pa.Table) -> FloatArray:
    """Per detection of ``predictions``, the fraction of ``COCO_IOUS`` at which it matches a
    gt box (matched in descending ``values`` order at each threshold, as COCO's mAP does): 1 for
    a box right at IoU 0.95, 0.5 for one right up to 0.7, 0 for a wrong one."""
    gt_row, _ = match_rows_at(predictions, values, gt, COCO_IOUS)
    out: FloatArray = (gt_row >= 0).mean(axis=0)
    return out


def ranking_quality(values: FloatArray, tp: BoolArray, n_gt: int, k: int) -> RankingQuality:
    """AP of the ranking by ``values`` (ties in row order) and its precision and recall over
    the top ``k``; NaN where undefined (no gt box, k = 0)."""
    order = np.argsort(-np.asarray(values, np.float64), kind="stable")
    hits = np.cumsum(tp[order])
    ranks = np.arange(1, len(order) + 1)
    nan = float("nan")
    ap = float((hits / ranks)[tp[order]].sum() / n_gt) if n_gt else nan
    k = min(k, len(order))
    precision = float(hits[k - 1] / k) if k else nan
    recall = float(hits[k - 1] / n_gt) if k and n_gt else (0.0 if n_gt else nan)
    return RankingQuality(ap=ap, precision_at_k=precision, recall_at_k=recall, k=k)


@dataclass(frozen=True)
class TauFit:
    """A threshold fitted to a precision target: ``tau`` (kept iff signal > tau; +inf when
    no threshold reaches the target) and what it keeps on the fitting set."""

    tau: float
    precision: float
    recall: float
    kept: int
    reached: bool

    def as_dict(self) -> dict[str, float]:
        return {
            "pseudo_tau": self.tau,
            "pseudo_tau_val_precision": self.precision,
            "pseudo_tau_val_recall": self.recall,
            "pseudo_tau_val_kept": float(self.kept),
            "pseudo_tau_reached": float(self.reached),
        }


def fit_tau(signal: FloatArray, tp: BoolArray, n_gt: int, target: float) -> TauFit:
    """The lowest threshold whose kept set {signal > τ} has precision ≥ ``target``: of the
    cuts between distinct signal values (−∞ never kept), the one keeping the most detections
    while meeting the target — the most pseudo-labels at that precision. τ is a float32 value
    (as the score columns), the smallest at or above the first value left out."""
    signal = np.asarray(signal, np.float64)
    order = np.argsort(-signal, kind="stable")
    order = order[np.isfinite(signal[order])]
    v = signal[order]
    m = len(v)
    hits = np.cumsum(tp[order])
    precision = hits / np.arange(1, m + 1) if m else np.zeros(0)
    cut = np.ones(m, dtype=bool)
    cut[:-1] = v[:-1] > v[1:]  # a kept set ends where the next value is lower
    ok = np.flatnonzero(cut & (precision >= target))
    nan = float("nan")
    if len(ok) == 0:
        return TauFit(tau=float("inf"), precision=nan, recall=0.0, kept=0, reached=False)
    k = int(ok[-1]) + 1
    tau = _float32_at_least(v[k]) if k < m else float(np.nextafter(np.float32(v[-1]), -np.inf))
    recall = float(hits[k - 1] / n_gt) if n_gt else nan
    return TauFit(tau=tau, precision=float(precision[k - 1]), recall=recall, kept=k, reached=True)


def _float32_at_least(x: float) -> float:
    t = np.float32(x)
    return float(t if t >= x else np.nextafter(t, np.float32(np.inf)))


def ranking_report(
    predictions: pa.Table,
    gt: pa.Table,
    tau: float,
    thresholds: Mapping[str, Any] | None = None,
    iou: float = 0.5,
    correctness: CorrectnessModel | None = None,
) -> dict[str, RankingQuality]:
    """Every signal of ``ranking_signals`` ranked over ``predictions`` (the candidates: the
    teacher's detections on the unlabeled images) against the gt of those images, each at
    k = the number of detections with score > τ (what STAC keeps)."""
    ids = pc.unique(predictions["image_id"].combine_chunks())
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=ids))
    k = int(np.count_nonzero(DetColumns(predictions).get("score") > np.float32(tau)))
    out = {}
    for name, values in ranking_signals(predictions, thresholds, correctness).items():
        tp = rank_true(predictions, values, gt, iou)
        out[name] = ranking_quality(values, tp, gt.num_rows, k)
    return out
