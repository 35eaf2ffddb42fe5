"""Auto-labeling decision (ALGORITHMS §8, detloop decision 7: the per-detection rule).

Per detection u = Σ w_i·u_i with the weights of the thresholding result; δ̄ = mean over IoU
thresholds of δ*_τ. An image is ``auto_labeled`` iff every detection with score > ``min_score``
has u < δ̄, otherwise ``examine``; an image without such a detection is ``auto_labeled``
(``empty_image="examine"`` sends it to review instead). Pure tables in, tables out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from detloop.data import schema
from detloop.data.schema import COORDS
from detloop.selectors.threshold import ThresholdResult, uncertainty_values
from detloop.selectors.threshold_metrics import FloatArray

STRATEGY = "autolabel"


@dataclass(frozen=True)
class AutoLabelDecision:
    """Verdict per image and the detections that were considered (score > min_score).

    ``images``: image_id, verdict, u (max u over considered detections; NaN if none), n_det.
    ``detections``: the considered prediction rows plus their ``u``.
    """

    images: pd.DataFrame
    detections: pd.DataFrame
    delta: float
    min_score: float

    def ids(self, verdict: str) -> list[str]:
        return sorted(self.images.loc[self.images["verdict"] == verdict, "image_id"])


def decide(
    predictions: pd.DataFrame, image_ids: Sequence[str], thresholds: ThresholdResult,
    min_score: float, empty_image: str = "auto_labeled",
) -> AutoLabelDecision:  # fmt: skip
    """Apply the per-detection rule to the predictions of ``image_ids``."""
    if empty_image not in schema.VERDICTS:
        raise ValueError(f"empty_image must be one of {schema.VERDICTS}, got {empty_image!r}")
    ids = sorted(set(image_ids))
    keep = predictions["image_id"].isin(ids) & (predictions["score"] > min_score)
    dets = predictions[keep].reset_index(drop=True).copy()
    dets["u"] = thresholds.combine(dets) if len(dets) else np.zeros(0)
    delta = thresholds.delta_mean
    dets["uncertain"] = ~(dets["u"] < delta)  # NaN u counts as uncertain
    per = dets.groupby("image_id").agg(
        u=("u", "max"), n_det=("u", "size"), uncertain=("uncertain", "any")
    )
    images = pd.DataFrame({"image_id": ids}).merge(per, on="image_id", how="left")
    images["n_det"] = images["n_det"].fillna(0).astype(np.int64)
    verdict = np.where(images["uncertain"].fillna(False).astype(bool), "examine", "auto_labeled")
    verdict = np.where(images["n_det"] == 0, empty_image, verdict)
    images = images.drop(columns="uncertain").assign(verdict=verdict)
    return AutoLabelDecision(images, dets.drop(columns="uncertain"), delta, min_score)


def selection_table(decision: AutoLabelDecision, iteration: int) -> pa.Table:
    """SELECTION rows: score = u = max u of the image, rank by u ascending, selected = auto."""
    im = decision.images.sort_values(["u", "image_id"], na_position="first", kind="stable")
    n = len(im)
    u = im["u"].to_numpy(np.float64)
    delta = decision.delta if np.isfinite(decision.delta) else None
    table = pa.table(
        {
            "image_id": pa.array(im["image_id"].tolist(), pa.string()),
            "iteration": pa.array(np.full(n, iteration, np.int32)),
            "strategy": pa.array([STRATEGY] * n, pa.string()),
            "score": pa.array(u, pa.float64(), mask=np.isnan(u)),
            "rank": pa.array(np.arange(n, dtype=np.int32)),
            "selected": pa.array((im["verdict"] == "auto_labeled").to_numpy(bool)),
            "n_det": pa.array(im["n_det"].to_numpy(np.int32)),
            "components": pa.array([None] * n, pa.list_(pa.float64())),
            "u": pa.array(u, pa.float64(), mask=np.isnan(u)),
            "delta": pa.array([delta] * n, pa.float64()),
            "verdict": pa.array(im["verdict"].tolist(), pa.string()),
        }
    )
    return schema.validate_table(table, schema.SELECTION)


def auto_label_table(decision: AutoLabelDecision, iteration: int, start_box_id: int) -> pa.Table:
    """LABELS rows (source ``auto``, weight 1) for every considered detection of auto images."""
    auto = set(decision.ids("auto_labeled"))
    d = decision.detections[decision.detections["image_id"].isin(auto)]
    d = d.sort_values(["image_id", "det_id"], kind="stable")
    n = len(d)
    xy = {c: d[c].to_numpy(np.float64) for c in COORDS}
    table = pa.table(
        {
            "image_id": pa.array(d["image_id"].tolist(), pa.string()),
            "box_id": pa.array(np.arange(start_box_id, start_box_id + n, dtype=np.int64)),
            "class_id": pa.array(d["class_id"].to_numpy(np.int32)),
            **{c: pa.array(v) for c, v in xy.items()},
            "area": pa.array((xy["x2"] - xy["x1"]) * (xy["y2"] - xy["y1"])),
            "iscrowd": pa.array(np.zeros(n, np.int8)),
            "occluded": pa.array(np.full(n, -1, np.int8)),
            "truncated": pa.array(np.full(n, -1, np.int8)),
            "source_id": pa.array([None] * n, pa.int64()),
            "source": pa.array(["auto"] * n, pa.string()),
            "weight": pa.array(np.ones(n, np.float32)),
            "iteration": pa.array(np.full(n, iteration, np.int32)),
        }
    )
    return schema.validate_table(table, schema.LABELS)


# ---- quality report (§8, when GT exists) ---------------------------------------------------
def box_iou(a: FloatArray, b: FloatArray) -> FloatArray:
    """Pairwise IoU of [N, 4] and [M, 4] xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.asarray(np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0))


def match_image(dets: pd.DataFrame, gts: pd.DataFrame, iou_thr: float) -> tuple[int, int, int]:
    """COCO-style greedy matching of one image (by score, same class): (TP, FP, FN)."""
    if len(dets) == 0 or len(gts) == 0:
        return 0, len(dets), len(gts)
    d = dets.sort_values("score", ascending=False, kind="stable")
    iou = box_iou(d[list(COORDS)].to_numpy(np.float64), gts[list(COORDS)].to_numpy(np.float64))
    same = d["class_id"].to_numpy()[:, None] == gts["class_id"].to_numpy()[None, :]
    iou = np.where(same, iou, -1.0)
    taken = np.zeros(len(gts), bool)
    tp = 0
    for i in range(len(d)):
        cand = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(cand))
        if cand[j] >= iou_thr:
            taken[j] = True
            tp += 1
    return tp, len(d) - tp, len(gts) - tp


def image_errors(boxes: pd.DataFrame, gt: pd.DataFrame, image_ids: Sequence[str],
                 iou_thr: float = 0.5) -> pd.DataFrame:  # fmt: skip
    """Per image TP, FP (background and duplicates included), FN and ``error_free``."""
    by_det = dict(tuple(boxes.groupby("image_id"))) if len(boxes) else {}
    by_gt = dict(tuple(gt.groupby("image_id"))) if len(gt) else {}
    empty_d, empty_g = boxes.iloc[:0], gt.iloc[:0]
    rows = [
        (i, *match_image(by_det.get(i, empty_d), by_gt.get(i, empty_g), iou_thr)) for i in image_ids
    ]
    out = pd.DataFrame(rows, columns=["image_id", "tp", "fp", "fn"])
    out["error_free"] = (out["fp"] == 0) & (out["fn"] == 0)
    return out


def score_rule_ids(detections: pd.DataFrame, image_ids: Sequence[str], n: int) -> list[str]:
    """The plain score threshold a user would otherwise use, at a given share: the ``n``
    images whose lowest considered score is highest (an image without detections first; ties
    by id)."""
    low = detections.groupby("image_id")["score"].min() if len(detections) else pd.Series()
    key = {i: float(low.get(i, np.inf)) for i in image_ids}
    return sorted(image_ids, key=lambda i: (-key[i], i))[:n]


def share_at_precision(u: Sequence[float], correct: Sequence[bool], target: float) -> float:
    """The largest share of images a threshold on the image uncertainty ``u`` (lowest first;
    NaN, an image without detections, lowest of all) could auto-label with an image precision
    (share ``correct``) of at least ``target`` — what the best threshold in hindsight gives."""
    n = len(u)
    if n == 0:
        return 0.0
    key = np.nan_to_num(np.asarray(u, np.float64), nan=-np.inf)
    order = np.argsort(key, kind="stable")
    ok = np.asarray(correct, bool)[order]
    precision = np.cumsum(ok) / np.arange(1, n + 1)
    # a threshold cannot split tied values: only the last position of a run of ties counts
    ends = np.r_[key[order][1:] != key[order][:-1], True]
    good = np.flatnonzero((precision >= target) & ends)
    return float((good[-1] + 1) / n) if len(good) else 0.0


def quality_report(
    decision: AutoLabelDecision, gt: pd.DataFrame, iou_thr: float = 0.5
) -> dict[str, Any]:
    """How good the auto-labels are against ground truth (frames that have it).

    ``image_precision``: share of auto-labeled images whose every auto-label is right (no
    background, duplicate, mislocalised or misclassified box); ``pct_error_free`` also
    counts a missed object as an error. ``score_rule_image_precision``: the same for a plain
    score threshold auto-labeling as many images (:func:`score_rule_ids`). Label precision and
    recall are over the boxes of the auto-labeled images.
    """
    auto = decision.ids("auto_labeled")
    every = decision.images["image_id"].tolist()
    err = image_errors(decision.detections, gt, every, iou_thr).set_index("image_id")
    ours = err.loc[auto]
    base = err.loc[score_rule_ids(decision.detections, every, len(auto))]
    tp, fp, fn = (int(ours[k].sum()) for k in ("tp", "fp", "fn"))
    n_all = len(decision.images)

    def share(rows: pd.DataFrame, ok: pd.Series) -> float:
        return float(ok.mean()) if len(rows) else 1.0

    correct = err.loc[every, "fp"] == 0
    u = decision.images.set_index("image_id").loc[every, "u"].to_numpy(np.float64)
    return {
        "iou_thr": iou_thr,
        "n_images": n_all,
        "n_auto_labeled": len(auto),
        "share_at_95": share_at_precision(u, correct.to_numpy(), 0.95),
        "pct_auto_labeled": 100.0 * len(auto) / n_all if n_all else 0.0,
        "image_precision": share(ours, ours["fp"] == 0),
        "score_rule_image_precision": share(base, base["fp"] == 0),
        "label_precision": tp / (tp + fp) if tp + fp else 1.0,
        "label_recall": tp / (tp + fn) if tp + fn else 1.0,
        "pct_error_free": 100.0 * share(ours, ours["error_free"]),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def uncertainty_rankings(
    predictions: pd.DataFrame, calibrated: bool, frac: float = 0.1
) -> dict[str, Any]:
    """Per-image max relative uncertainties; top/bottom ``frac`` images of each; the images with
    the largest / smallest (epistemic − aleatoric) after max-normalisation."""
    out: dict[str, Any] = {}
    per: dict[str, pd.Series] = {}
    for name in ("entropy", "albox_rel", "mcbox_rel"):
        try:
            vals = uncertainty_values(predictions, name, calibrated)
        except ValueError:
            continue
        if not np.isfinite(vals).any():
            continue
        s = pd.Series(vals).groupby(predictions["image_id"].to_numpy()).max().sort_values()
        per[name] = s
        k = max(1, int(np.ceil(frac * len(s))))
        out[name] = {"top": list(s.index[-k:][::-1]), "bottom": list(s.index[:k])}
    if "albox_rel" in per and "mcbox_rel" in per:
        diff = (per["mcbox_rel"] / per["mcbox_rel"].max()) - (
            per["albox_rel"] / per["albox_rel"].max()
        )
        diff = diff.sort_values()
        k = max(1, int(np.ceil(frac * len(diff))))
        out["epi_minus_ale"] = {
            "largest": list(diff.index[-k:][::-1]),
            "smallest": list(diff.index[:k]),
        }
    out["max_rel_al"] = {str(i): float(v) for i, v in per.get("albox_rel", pd.Series()).items()}
    return out
