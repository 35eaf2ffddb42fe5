"""The 3D pseudo-label error study (ALGORITHMS §11.8, oracle): pseudo-labels matched to the
hidden GT, and the six corrected pseudo-label sets that isolate noise, missing and false
detections.

Matching: at IoU ≥ 0.5, pseudo-labels in descending score order (ties: row order) each take
their best still-unmatched GT (ties: the first GT row); by default only a GT of the same class
(a pseudo-label of the wrong class is a false detection, as in ``pseudo_quality.pseudo_quality``).

Tables in are box rows: ``pseudo`` with image_id, class_id, score, x1..y2 (the output of
``pseudo.select_pseudo_labels``; further columns are carried), ``gt`` with image_id, class_id,
x1..y2. ``oracle_variant`` returns the pseudo table's columns plus ``origin``: ``pseudo``,
``gt_box`` (box replaced by its GT, ``nonoise``) or ``gt`` (a missed GT added, ``fixmd``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.schema import COORDS
from detloop.selectors.autolabel import box_iou
from detloop.selectors.columns import BoolArray, FloatArray, IntArray

Variant = Literal["nofd", "nomd", "nomdfd", "fixmd", "highprec", "nonoise"]
VARIANTS: Final[tuple[Variant, ...]] = ("nofd", "nomd", "nomdfd", "fixmd", "highprec", "nonoise")
MATCH_IOU: Final = 0.5
HIGHPREC_IOU: Final = 0.9
NONOISE_IOU: Final = 0.75


def greedy_match(
    p_box: FloatArray,
    p_score: FloatArray,
    g_box: FloatArray,
    iou_thr: float = MATCH_IOU,
    allowed: BoolArray | None = None,
) -> tuple[IntArray, FloatArray]:
    """One image: (matched GT index or −1, its IoU or 0) per pseudo-label.

    Pseudo-labels in descending score order (stable) each take the unused GT of highest IoU
    (first on ties) if that IoU ≥ ``iou_thr``; ``allowed`` [n, m] masks pairs (class check).
    """
    gt_of, iou_of = greedy_match_at(p_box, p_score, g_box, (iou_thr,), allowed)
    return gt_of[0], iou_of[0]


def greedy_match_at(
    p_box: FloatArray,
    p_score: FloatArray,
    g_box: FloatArray,
    thresholds: Sequence[float],
    allowed: BoolArray | None = None,
) -> tuple[IntArray, FloatArray]:
    """``greedy_match`` at each of ``thresholds`` at once (one pass over the pseudo-labels, the
    T matchings side by side, as COCO matches at each of its IoU thresholds): [T, n] arrays."""
    thr = np.asarray(thresholds, dtype=np.float64)
    gt_of = np.full((len(thr), len(p_box)), -1, dtype=np.int64)
    iou_of = np.zeros((len(thr), len(p_box)))
    if len(p_box) == 0 or len(g_box) == 0:
        return gt_of, iou_of
    ious = box_iou(np.asarray(p_box, np.float64), np.asarray(g_box, np.float64))
    if allowed is not None:
        ious = np.where(allowed, ious, -1.0)
    free = np.ones((len(thr), len(g_box)), dtype=bool)
    rows = np.arange(len(thr))
    for k in np.argsort(-np.asarray(p_score, np.float64), kind="stable"):
        cand = np.where(free, ious[k], -1.0)
        j = np.argmax(cand, axis=1)
        best = cand[rows, j]
        hit = best >= thr
        free[rows[hit], j[hit]] = False
        gt_of[hit, k], iou_of[hit, k] = j[hit], best[hit]
    return gt_of, iou_of


@dataclass(frozen=True)
class PseudoMatch:
    """The study's images, their pseudo-labels and GT, and the matching between them.

    ``gt_row`` [n_pseudo]: row of ``gt`` matched by each pseudo-label (−1: false detection);
    ``iou`` its IoU; ``gt_matched`` [n_gt]: whether each GT was found (False: missed)."""

    image_ids: list[str]
    pseudo: pa.Table
    gt: pa.Table
    gt_row: IntArray
    iou: FloatArray
    gt_matched: BoolArray

    def images_with_misses(self) -> set[str]:
        ids = self.gt["image_id"].to_pylist()
        return {str(ids[k]) for k in np.flatnonzero(~self.gt_matched)}


def box_coords(table: pa.Table) -> FloatArray:
    """[n, 4] float64 x1, y1, x2, y2 of a box table."""
    return np.stack([table[c].to_numpy() for c in COORDS], axis=1).astype(np.float64).reshape(-1, 4)


def rows_by_image(table: pa.Table) -> dict[str, IntArray]:
    """Row indices of each image of a box table."""
    ids = np.asarray(table["image_id"].to_numpy(zero_copy_only=False), dtype=object).astype(str)
    if len(ids) == 0:
        return {}
    order = np.argsort(ids, kind="stable")
    uniq, starts = np.unique(ids[order], return_index=True)
    ends = np.r_[starts[1:], len(ids)]
    return {str(u): order[a:b] for u, a, b in zip(uniq, starts, ends, strict=True)}


def match_rows(
    detections: pa.Table,
    order: FloatArray,
    gt: pa.Table,
    iou_thr: float = MATCH_IOU,
    class_aware: bool = True,
) -> tuple[IntArray, FloatArray]:
    """Every image's detections matched to its gt boxes by ``greedy_match`` in descending
    ``order`` (a score, or any ranking of the detections): per detection the row of ``gt`` it
    matched (−1: none) and that IoU (0). With ``class_aware`` only a gt box of the detection's
    class can match. The one matching of the pseudo-label studies: the 3D oracles, pseudo-label
    precision/recall and the rankings all read it."""
    gt_row, iou = match_rows_at(detections, order, gt, (iou_thr,), class_aware)
    return gt_row[0], iou[0]


def match_rows_at(
    detections: pa.Table,
    order: FloatArray,
    gt: pa.Table,
    thresholds: Sequence[float],
    class_aware: bool = True,
) -> tuple[IntArray, FloatArray]:
    """``match_rows`` at each of ``thresholds`` (``greedy_match_at``): [T, n] arrays."""
    gt_row = np.full((len(thresholds), detections.num_rows), -1, dtype=np.int64)
    iou = np.zeros((len(thresholds), detections.num_rows))
    if detections.num_rows == 0 or gt.num_rows == 0:
        return gt_row, iou
    p_box, g_box = box_coords(detections), box_coords(gt)
    values = np.asarray(order, dtype=np.float64)
    p_cls, g_cls = (np.asarray(t["class_id"].to_numpy(), dtype=np.int64) for t in (detections, gt))
    g_groups = rows_by_image(gt)
    for image_id, p_rows in rows_by_image(detections).items():
        g_rows = g_groups.get(image_id)
        if g_rows is None:
            continue
        allowed = p_cls[p_rows][:, None] == g_cls[g_rows][None, :] if class_aware else None
        j, v = greedy_match_at(p_box[p_rows], values[p_rows], g_box[g_rows], thresholds, allowed)
        gt_row[:, p_rows] = np.where(j >= 0, g_rows[np.maximum(j, 0)], -1)
        iou[:, p_rows] = v
    return gt_row, iou


def match_pseudo_to_gt(
    pseudo: pa.Table,
    gt: pa.Table,
    image_ids: Sequence[str] | None = None,
    iou_thr: float = MATCH_IOU,
    class_aware: bool = True,
) -> PseudoMatch:
    """Match the pseudo-labels of ``image_ids`` (default: the images holding one) to their GT
    by descending score (``match_rows``)."""
    ids = sorted(set(pseudo["image_id"].to_pylist() if image_ids is None else image_ids))
    wanted = pa.array(ids, pa.string())
    pseudo = pseudo.filter(pc.is_in(pseudo["image_id"], value_set=wanted))
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=wanted))
    p_score = np.asarray(pseudo["score"].to_numpy(), dtype=np.float64)
    gt_row, iou = match_rows(pseudo, p_score, gt, iou_thr, class_aware)
    matched = np.zeros(gt.num_rows, dtype=bool)
    matched[gt_row[gt_row >= 0]] = True
    return PseudoMatch(ids, pseudo, gt, gt_row, iou, matched)


def _with_origin(table: pa.Table, origin: str) -> pa.Table:
    schema = pa.schema([f.with_nullable(True) for f in table.schema])
    out = table.cast(schema)
    return out.append_column("origin", pa.array([origin] * table.num_rows, pa.string()))


def _gt_rows_like(pseudo: pa.Table, gt: pa.Table) -> pa.Table:
    """GT boxes as rows of the pseudo table's schema: score and weight 1, other columns null."""
    n = gt.num_rows
    known = {"image_id": gt["image_id"], "class_id": gt["class_id"]}
    known |= {c: gt[c] for c in COORDS}
    known |= {"score": pa.array(np.ones(n)), "weight": pa.array(np.ones(n))}
    arrays = [
        known[f.name].cast(f.type) if f.name in known else pa.nulls(n, f.type)
        for f in pseudo.schema
    ]
    return _with_origin(pa.Table.from_arrays(arrays, schema=pseudo.schema), "gt")


def _replace_boxes(pseudo: pa.Table, rows: IntArray, boxes: FloatArray) -> pa.Table:
    """``pseudo`` with the boxes of ``rows`` set to ``boxes`` (column types kept)."""
    for k, c in enumerate(COORDS):
        col = np.asarray(pseudo[c].to_numpy(), dtype=np.float64).copy()
        col[rows] = boxes[:, k]
        index = pseudo.column_names.index(c)
        pseudo = pseudo.set_column(index, c, pa.array(col).cast(pseudo.schema.field(c).type))
    return pseudo


def oracle_variant(match: PseudoMatch, variant: Variant) -> pa.Table:
    """The pseudo-label set of one 3D-study variant (§11.8).

    ``nofd``: only matched pseudo-labels; ``nomd``: images with a missed GT dropped;
    ``nomdfd``: both; ``fixmd``: the missed GT boxes added; ``highprec``: only pseudo-labels
    matched at IoU ≥ 0.9; ``nonoise``: boxes matched at IoU ≥ 0.75 replaced by their GT box.
    """
    if variant not in VARIANTS:
        raise ValueError(f"3D study variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    pseudo, matched = match.pseudo, match.gt_row >= 0
    keep = np.ones(pseudo.num_rows, dtype=bool)
    if variant in ("nofd", "nomdfd"):
        keep &= matched
    if variant == "highprec":
        keep &= matched & (match.iou >= HIGHPREC_IOU)
    if variant in ("nomd", "nomdfd"):
        missed = pa.array(sorted(match.images_with_misses()), pa.string())
        keep &= ~np.asarray(pc.is_in(pseudo["image_id"], value_set=missed).to_numpy(False))
    origin = np.full(pseudo.num_rows, "pseudo", dtype=object)
    if variant == "nonoise":
        rows = np.flatnonzero(matched & (match.iou >= NONOISE_IOU))
        pseudo = _replace_boxes(pseudo, rows, box_coords(match.gt)[match.gt_row[rows]])
        origin[rows] = "gt_box"
    out = _with_origin(pseudo, "pseudo").filter(pa.array(keep))
    out = out.set_column(out.num_columns - 1, "origin", pa.array(list(origin[keep]), pa.string()))
    if variant == "fixmd":
        added = _gt_rows_like(match.pseudo, match.gt.filter(pa.array(~match.gt_matched)))
        out = pa.concat_tables([out, added])
    ids = np.asarray(out["image_id"].to_numpy(zero_copy_only=False), dtype=object).astype(str)
    return out.take(pa.array(np.argsort(ids, kind="stable")))
