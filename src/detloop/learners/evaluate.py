"""Matching detections to ground truth and COCO mAP (ALGORITHMS §4).

Two matching modes (decision 4):

- ``reference`` (:func:`match_reference`): per GT, the prediction of the image with the highest
  IoU (any class, ties to the lowest ``det_id``); one matches-table row per GT, not one-to-one.
- ``coco`` (:func:`match_coco`): one-to-one, greedy by score, per class, with pycocotools'
  crowd and area-range rules; it reproduces COCOeval's ``dtMatches`` at one IoU threshold.

mAP is pycocotools' COCOeval run on COCO dicts built from the tables (:func:`coco_map`).
Torch-free: numpy, pandas, pyarrow and pycocotools only. (A little over 300 lines: both
matchers and the COCO bridge share the box and IoU helpers kept here.)
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
from pycocotools import mask as mask_utils

from detloop.data.errors import DataError
from detloop.data.min_score import DEFAULT_MIN_SCORE
from detloop.data.schema import COORDS, MATCHES, validate_table

ASSIGN_MODES: Final = ("IoU", "MSE", "index")
#: COCOeval's "all" area range: boxes outside it are ignored.
_AREA_ALL: Final = (0.0, 1e5**2)
_COCO_KEYS: Final = (
    "map", "map50", "map75", "map_s", "map_m", "map_l",
    "ar1", "ar10", "ar100", "ar_s", "ar_m", "ar_l",
)  # fmt: skip


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a [n, 4] and b [m, 4] (float64, 0 for empty unions)."""
    a = np.asarray(a, dtype=np.float64)[:, None, :]
    b = np.asarray(b, dtype=np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    out: np.ndarray = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def _boxes(df: pd.DataFrame, prefix: str = "") -> np.ndarray:
    return df[[prefix + c for c in COORDS]].to_numpy(dtype=np.float64)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    # C order matters: pycocotools' iou reads the raw buffer (pandas hands out F-ordered arrays)
    return np.ascontiguousarray(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1))


def _assign(gt_boxes: np.ndarray, det: pd.DataFrame, positions: np.ndarray, assign: str) -> Any:
    """Chosen prediction row per GT of one image and its IoU (§4 ``reference``)."""
    det_boxes = _boxes(det)
    ious = iou_matrix(gt_boxes, det_boxes)
    if assign == "IoU":
        choice = np.argmax(ious, axis=1)  # first maximum: predictions are sorted by det_id
    elif assign == "MSE":
        err = ((gt_boxes[:, None, :] - det_boxes[None, :, :]) ** 2).mean(axis=2)
        choice = np.argmin(err, axis=1)
    else:
        det_ids = det["det_id"].to_numpy()
        lookup = {int(d): i for i, d in enumerate(det_ids)}
        choice = np.array([lookup.get(int(p), -1) for p in positions])
    valid = choice >= 0
    chosen = np.where(valid, choice, 0)
    iou = np.where(valid, ious[np.arange(len(gt_boxes)), chosen], 0.0)
    det_id = np.where(valid & (iou > 0), det["det_id"].to_numpy()[chosen], -1)
    return det_id, iou


def match_reference(predictions: pa.Table, gt: pa.Table, assign: str = "IoU") -> pa.Table:
    """Match every GT box to a prediction of its image in ``reference`` mode (§4).

    Args:
        predictions: predictions table (schema PREDICTIONS).
        gt: ground-truth table (schema GT).
        assign: ``IoU`` (argmax IoU, ties → lowest det_id), ``MSE`` (argmin of the mean squared
            corner error) or ``index`` (the GT's position within its image, by box_id, taken as
            the det_id).

    Returns:
        The matches table (schema MATCHES), one row per GT in the order of ``gt``; ``det_id``
        is null and ``iou`` 0 when the assigned prediction does not overlap the GT.
    """
    if assign not in ASSIGN_MODES:
        raise ValueError(f"unknown assign_gt_box {assign!r}; choose one of {ASSIGN_MODES}")
    g = gt.select(["image_id", "box_id", "class_id", *COORDS, "occluded", "truncated"]).to_pandas()
    p = predictions.select(["image_id", "det_id", *COORDS]).to_pandas()
    p = p.sort_values(["image_id", "det_id"], kind="stable")
    det_id = np.full(len(g), -1, dtype=np.int64)
    iou = np.zeros(len(g), dtype=np.float64)
    by_image = dict(tuple(p.groupby("image_id", sort=False)))
    for image_id, rows in g.groupby("image_id", sort=False).indices.items():
        det = by_image.get(image_id)
        if det is None or det.empty:
            continue
        positions = g["box_id"].iloc[rows].rank(method="first").to_numpy().astype(int) - 1
        det_id[rows], iou[rows] = _assign(_boxes(g.iloc[rows]), det, positions, assign)
    table = pa.table(
        {
            "image_id": g["image_id"],
            "gt_id": g["box_id"],
            "gt_class": g["class_id"],
            **{f"gt_{c}": g[c].astype(np.float32) for c in COORDS},
            "gt_occl": g["occluded"],
            "gt_trunc": g["truncated"],
            "det_id": pa.array(det_id, mask=det_id < 0, type=pa.int32()),
            "iou": iou.astype(np.float32),
        }
    )
    return validate_table(table, MATCHES)


def _greedy_match(
    ious: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray, threshold: float
) -> np.ndarray:
    """COCOeval.evaluateImg's matching loop at one threshold; dets sorted by score.

    Returns:
        Index of the matched GT per detection, −1 when unmatched.
    """
    n_det, n_gt = ious.shape
    matched = np.zeros(n_gt, dtype=bool)
    out = np.full(n_det, -1, dtype=np.int64)
    thr = min(threshold, 1 - 1e-10)
    for d in range(n_det):
        free = ~(matched & ~gt_crowd) & (ious[d] >= thr)
        for group in (free & ~gt_ignore, free & gt_ignore):  # regular GTs before ignored ones
            if group.any():
                cand = np.where(group, ious[d], -np.inf)
                m = n_gt - 1 - int(np.argmax(cand[::-1]))  # ties: the later GT, as COCOeval
                out[d] = m
                matched[m] = True
                break
    return out


def _match_group(
    det: pd.DataFrame, gts: pd.DataFrame | None, threshold: float, max_dets: int | None
) -> pd.DataFrame:
    """Match the detections of one (image, class) to its GTs, COCOeval style."""
    det = det.iloc[np.argsort(-det["score"].to_numpy(), kind="mergesort")].copy()
    n = len(det)
    d_xywh = _xywh(_boxes(det))
    area = d_xywh[:, 2] * d_xywh[:, 3]
    n_eval = n if max_dets is None else min(n, max_dets)
    match = np.full(n, -1, dtype=np.int64)
    iou = np.zeros(n, dtype=np.float64)
    gt_ids = np.zeros(0, dtype=np.int64)
    gt_ignore = np.zeros(0, dtype=bool)
    if gts is not None and len(gts) and n_eval:
        gts = gts.iloc[np.argsort(gts["ignore"].to_numpy(), kind="mergesort")]
        gt_ids = gts["box_id"].to_numpy(dtype=np.int64)
        gt_ignore = gts["ignore"].to_numpy(dtype=bool)
        crowd = gts["iscrowd"].to_numpy() != 0
        ious = np.asarray(
            mask_utils.iou(d_xywh[:n_eval], _xywh(_boxes(gts)), crowd.astype(np.uint8))
        )
        ious = ious.reshape(n_eval, len(gts))
        match[:n_eval] = _greedy_match(ious, gt_ignore, crowd, threshold)
        best = np.take_along_axis(ious, np.maximum(match[:n_eval], 0)[:, None], axis=1)[:, 0]
        iou[:n_eval] = np.where(match[:n_eval] >= 0, best, ious.max(axis=1))
    hit = match >= 0
    matched_ignore = np.zeros(n, dtype=bool)
    matched_ignore[hit] = gt_ignore[match[hit]]
    out_of_range = (area < _AREA_ALL[0]) | (area > _AREA_ALL[1])
    det["tp"] = hit & ~matched_ignore
    det["ignored"] = matched_ignore | (~hit & out_of_range) | (np.arange(n) >= n_eval)
    gt_col = np.zeros(n, dtype=np.int64)
    gt_col[hit] = gt_ids[match[hit]]
    det["gt_id"] = pd.arrays.IntegerArray(gt_col, ~hit)
    det["iou"] = iou
    return det


def match_coco(
    predictions: pa.Table, gt: pa.Table, iou_threshold: float = 0.5, max_dets: int | None = 100
) -> pa.Table:
    """Per-detection TP/FP under COCO matching at one IoU threshold (§4 ``coco``).

    Per image and class, detections in descending score order (stable) take the still
    unmatched GT of their class with the highest IoU ≥ threshold; crowd GTs may absorb several
    detections and use intersection over the detection's area; detections matched to a crowd
    GT (or to a GT outside COCO's "all" area range) are ignored, as in pycocotools.

    Args:
        predictions: predictions table (schema PREDICTIONS).
        gt: ground-truth table (schema GT).
        iou_threshold: IoU threshold τ.
        max_dets: per image and class only this many top detections are evaluated (COCOeval's
            100); the rest are marked ignored. None evaluates all.

    Returns:
        Table with one row per prediction (sorted by image, class, descending score):
        image_id, det_id, class_id, score, tp (bool), ignored (bool), gt_id (nullable int64)
        and iou (IoU with the matched GT; for unmatched detections the best IoU with a GT of
        their class, 0 when there is none).
    """
    p = predictions.select(["image_id", "det_id", "class_id", "score", *COORDS]).to_pandas()
    g = gt.select(["image_id", "box_id", "class_id", *COORDS, "area", "iscrowd"]).to_pandas()
    g["ignore"] = (g["iscrowd"] != 0) | (g["area"] < _AREA_ALL[0]) | (g["area"] > _AREA_ALL[1])
    gt_groups = dict(tuple(g.groupby(["image_id", "class_id"], sort=False)))
    parts = [
        _match_group(det, gt_groups.get(key), iou_threshold, max_dets)
        for key, det in p.groupby(["image_id", "class_id"], sort=True)
    ]
    cols = ["image_id", "det_id", "class_id", "score", "tp", "ignored", "gt_id", "iou"]
    df = pd.concat(parts)[cols] if parts else pd.DataFrame(columns=cols)
    schema = pa.schema(
        [
            ("image_id", pa.string()), ("det_id", pa.int32()), ("class_id", pa.int32()),
            ("score", pa.float32()), ("tp", pa.bool_()), ("ignored", pa.bool_()),
            ("gt_id", pa.int64()), ("iou", pa.float64()),
        ]
    )  # fmt: skip
    return pa.Table.from_pandas(df.reset_index(drop=True), schema=schema, preserve_index=False)


def _coco_images(images: pa.Table) -> tuple[list[dict[str, Any]], dict[str, int]]:
    ids = images.column("image_id").to_pylist()
    widths = images.column("width").to_pylist()
    heights = images.column("height").to_pylist()
    index = {image_id: i + 1 for i, image_id in enumerate(ids)}
    coco = [
        {"id": index[i], "file_name": i, "width": w, "height": h}
        for i, w, h in zip(ids, widths, heights, strict=True)
    ]
    return coco, index


def _image_index(df: pd.DataFrame, index: dict[str, int], table: str) -> list[int]:
    missing = ~df["image_id"].isin(list(index))
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise DataError(table, row, "image_id", f"image {df['image_id'].iloc[row]!r} not in images")
    return [index[i] for i in df["image_id"]]


def coco_api(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def coco_datasets(
    predictions: pa.Table, gt: pa.Table, images: pa.Table, categories: pa.Table
) -> tuple[dict[str, Any], dict[str, Any]]:
    """COCO dicts (ground truth, detections) of the tables: bbox as x, y, w, h; category =
    class_id + 1; image ids numbered 1.. in the order of ``images`` (``file_name`` keeps the
    image_id); GT area and iscrowd as stored; detection area = w·h, as pycocotools' loadRes.

    Raises:
        DataError: a prediction or GT refers to an image not in ``images``.
    """
    coco_images, index = _coco_images(images)
    class_ids, names = categories["class_id"].to_pylist(), categories["name"].to_pylist()
    cats = [{"id": int(c) + 1, "name": str(n)} for c, n in zip(class_ids, names, strict=True)]
    g = gt.select(["image_id", "class_id", *COORDS, "area", "iscrowd"]).to_pandas()
    p = predictions.select(["image_id", "class_id", "score", *COORDS]).to_pandas()
    g_rows = zip(_image_index(g, index, "gt"), g["class_id"], _xywh(_boxes(g)).tolist(),
                 g["area"], g["iscrowd"], strict=True)  # fmt: skip
    p_rows = zip(_image_index(p, index, "predictions"), p["class_id"], p["score"],
                 _xywh(_boxes(p)).tolist(), strict=True)  # fmt: skip
    gt_anns = [
        {"id": k + 1, "image_id": i, "category_id": int(c) + 1, "bbox": b, "area": float(a),
         "iscrowd": int(z)}
        for k, (i, c, b, a, z) in enumerate(g_rows)
    ]  # fmt: skip
    dt_anns = [
        {"id": k + 1, "image_id": i, "category_id": int(c) + 1, "bbox": b, "score": float(s),
         "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, c, s, b) in enumerate(p_rows)
    ]  # fmt: skip
    base = {"images": coco_images, "categories": cats}
    return {**base, "annotations": gt_anns}, {**base, "annotations": dt_anns}


def coco_map(
    predictions: pa.Table, gt: pa.Table, images: pa.Table, categories: pa.Table
) -> dict[str, float]:
    """COCO box mAP of a predictions table, computed by pycocotools' COCOeval (§4).

    Args:
        predictions: predictions table (schema PREDICTIONS) of the evaluated images.
        gt: ground-truth table (schema GT); its ``area`` and ``iscrowd`` are used as given.
        images: the evaluated images (image_id, width, height); images without boxes count.
        categories: categories table (class_id, name); COCO category = class_id + 1.

    Returns:
        ``map``, ``map50``, ``map75``, ``map_s``, ``map_m``, ``map_l``, ``ar1``, ``ar10``,
        ``ar100``, ``ar_s``, ``ar_m``, ``ar_l`` (COCOeval's stats, −1 where undefined) and
        ``ap/<class name>`` per class (NaN for a class without GT).

    Raises:
        DataError: a prediction or GT refers to an image not in ``images``.
    """
    from pycocotools.cocoeval import COCOeval

    gt_dict, dt_dict = coco_datasets(predictions, gt, images, categories)
    evaluator = COCOeval(coco_api(gt_dict), coco_api(dt_dict), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    result = {k: float(v) for k, v in zip(_COCO_KEYS, evaluator.stats, strict=True)}
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    names = {c["id"]: c["name"] for c in gt_dict["categories"]}
    for k, cat_id in enumerate(evaluator.params.catIds):
        pr = precision[:, :, k, 0, -1]
        pr = pr[pr > -1]
        result[f"ap/{names[cat_id]}"] = float(np.mean(pr)) if pr.size else math.nan
    return result


def performance_summary(
    matches: pa.Table, predictions: pa.Table, decode_method: str | None = None
) -> dict[str, Any]:
    """Model performance summary from a ``reference`` matches table (§4).

    Returns:
        ``n_gt``; ``missing_pct`` (% of GT rows with IoU 0); ``misclass_rate`` (class ≠ GT class
        over rows with IoU > 0); ``miou_all`` (missing count as 0) and ``miou_matched``;
        ``rmse`` of the corners over matched rows and non-zero GT coordinates; NaN where a set
        is empty; ``decode_method`` when given.
    """
    m = matches.to_pandas()
    p = predictions.select(["image_id", "det_id", "class_id", *COORDS]).to_pandas()
    iou = m["iou"].fillna(0).to_numpy(dtype=np.float64)
    hit = (iou > 0) & m["det_id"].notna().to_numpy()
    joined = m[hit].merge(p, on=["image_id", "det_id"], how="left", validate="many_to_one")
    if joined["class_id"].isna().any():
        row = int(np.flatnonzero(joined["class_id"].isna().to_numpy())[0])
        raise DataError("matches", row, "det_id", "no prediction with this image_id and det_id")
    gt_xy, det_xy = _boxes(joined, "gt_"), _boxes(joined)
    nonzero = gt_xy != 0
    sq = (det_xy - gt_xy)[nonzero] ** 2
    n = len(m)
    summary: dict[str, Any] = {
        "n_gt": n,
        "missing_pct": 100.0 * float(np.mean(~hit)) if n else math.nan,
        "misclass_rate": float(np.mean(joined["class_id"] != joined["gt_class"]))
        if len(joined)
        else math.nan,
        "miou_all": float(np.mean(np.where(hit, iou, 0.0))) if n else math.nan,
        "miou_matched": float(np.mean(iou[hit])) if hit.any() else math.nan,
        "rmse": float(np.sqrt(np.mean(sq))) if sq.size else math.nan,
    }
    if decode_method is not None:
        summary["decode_method"] = decode_method
    return summary


def background_false_positives(
    predictions: pa.Table, gt: pa.Table, iou: float = 0.5, min_score: float = DEFAULT_MIN_SCORE
) -> int:
    """Detections with score > ``min_score`` that COCO matching at ``iou`` leaves unmatched.

    Only the detections above ``min_score`` take part in the matching (they are the labels a
    consumer would keep), all of them (no per-image cap); detections absorbed by crowd GTs are
    not counted.
    """
    kept = predictions.filter(np.asarray(predictions.column("score")) > min_score)
    matched = match_coco(kept, gt, iou_threshold=iou, max_dets=None).to_pandas()
    return int((~matched["tp"] & ~matched["ignored"]).sum())
