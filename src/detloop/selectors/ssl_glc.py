"""GLC — ground-truth label correction (ALGORITHMS §11.5): the three rules on the teacher's
predictions (consistency mode, ``cons_iou``) over the labeled images.

Each GT's prediction is its best-IoU one over all the image's predictions (``reference``
matching of §4: any class, ties to the lowest det_id; best IoU 0 = none).

- ``md`` (missing): a prediction becomes a new GT if its max IoU with all GT ≤ ``md_max_inter``
  and ``cons_iou`` ≥ ``iou_consist``.
- ``mistakes`` (false): a GT whose best IoU with any prediction is 0 is removed.
- ``noisy``: a GT's box becomes its matched prediction's box if that ``cons_iou`` >
  ``noisy_consist``, IoU ≤ ``correct_max_inter`` and score ≥ ``correct_score`` (class kept;
  a prediction with the very same box changes nothing and leaves the GT ``kept``).

Rules see the original GT and predictions only (order-free). The result is a new label set
(new box ids; the input is untouched) with a provenance row per box, and the removed GT.
A null ``cons_iou`` passes no consistency test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from detloop.data import schema
from detloop.data.labels import box_rows, next_box_id
from detloop.selectors.autolabel import box_iou
from detloop.selectors.columns import BoolArray, FloatArray, IntArray
from detloop.selectors.ssl_3d import box_coords, rows_by_image
from detloop.selectors.vocabulary import did_you_mean

RULES = ("kept", "md", "noisy")  # a corrected box's provenance
GLC_RULES = ("md", "mistakes", "noisy")  # the rules GlcParams switches on and off


@dataclass(frozen=True)
class GlcParams:
    """Switches and thresholds of the GLC rules (defaults of §11.5)."""

    md: bool = True
    mistakes: bool = True
    noisy: bool = True
    md_max_inter: float = 0.0
    iou_consist: float = 0.9
    noisy_consist: float = 0.9
    correct_max_inter: float = 1.0
    correct_score: float = 0.4

    def only(self, rules: str) -> GlcParams:
        """These thresholds with just the comma-separated ``rules`` (of ``GLC_RULES``) on.

        Raises:
            ValueError: no rule named, or an unknown one (with close matches).
        """
        names = [r.strip() for r in rules.split(",") if r.strip()]
        if not names:
            raise ValueError(f"name at least one of {', '.join(GLC_RULES)}")
        for name in names:
            if name not in GLC_RULES:
                hint = did_you_mean(name, list(GLC_RULES))
                raise ValueError(f"unknown GLC rule {name!r}{hint}; rules: {', '.join(GLC_RULES)}")
        return replace(self, **{rule: rule in names for rule in GLC_RULES})

    def rules(self) -> tuple[str, ...]:
        """The rules switched on, in ``GLC_RULES`` order."""
        return tuple(rule for rule in GLC_RULES if getattr(self, rule))


@dataclass(frozen=True)
class GlcResult:
    """``labels``: the corrected set (schema.LABELS, new box ids); ``provenance``: per new
    box its ``rule`` (kept, md, noisy), the ``gt_box_id`` it descends from (null for md) and
    the ``det_id`` that made it (null for kept); ``removed``: image_id, box_id of the GT that
    ``mistakes`` removed."""

    labels: pa.Table
    provenance: pa.Table
    removed: pa.Table

    def counts(self) -> dict[str, int]:
        rules = self.provenance["rule"].to_pylist()
        return {**{r: rules.count(r) for r in RULES}, "mistakes": self.removed.num_rows}


def reference_match(gt: pa.Table, predictions: pa.Table) -> tuple[IntArray, FloatArray, FloatArray]:
    """Per GT row its best-IoU prediction row (−1 when the best IoU is 0) and that IoU; per
    prediction row its max IoU with the image's GT (0 without GT)."""
    g_box, p_box = box_coords(gt), box_coords(predictions)
    det = np.asarray(predictions["det_id"].to_numpy(), dtype=np.int64)
    best = np.full(gt.num_rows, -1, dtype=np.int64)
    best_iou = np.zeros(gt.num_rows)
    p_max = np.zeros(predictions.num_rows)
    p_groups = rows_by_image(predictions)
    for image_id, g_rows in rows_by_image(gt).items():
        p_rows = p_groups.get(image_id)
        if p_rows is None:
            continue
        p_rows = p_rows[np.argsort(det[p_rows], kind="stable")]  # argmax ties → lowest det_id
        ious = box_iou(g_box[g_rows], p_box[p_rows])
        j = ious.argmax(axis=1)
        v = ious[np.arange(len(g_rows)), j]
        best[g_rows] = np.where(v > 0, p_rows[j], -1)
        best_iou[g_rows] = v
        p_max[p_rows] = ious.max(axis=0)
    return best, best_iou, p_max


def _stored(values: pa.ChunkedArray) -> np.ndarray:
    """A float column as float32 (nulls NaN), compared with float32 thresholds (``_at``)."""
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32)


def _at(threshold: float) -> np.float32:
    return np.float32(threshold)


def glc_decisions(
    gt: pa.Table, predictions: pa.Table, params: GlcParams = GlcParams()
) -> tuple[BoolArray, IntArray, BoolArray]:
    """(removed per GT row, prediction row replacing each GT's box or −1, added per
    prediction row) under the switched-on rules."""
    if (params.md or params.noisy) and "cons_iou" not in predictions.column_names:
        raise ValueError("GLC md/noisy need the predictions' cons_iou (predict.consistency_ssl)")
    best, best_iou, p_max = reference_match(gt, predictions)
    n_pred = predictions.num_rows
    cons = _stored(predictions["cons_iou"]) if "cons_iou" in predictions.column_names else None
    removed = (best < 0) if params.mistakes else np.zeros(gt.num_rows, dtype=bool)
    replace = np.full(gt.num_rows, -1, dtype=np.int64)
    if params.noisy and cons is not None and n_pred:
        score = _stored(predictions["score"])
        row = np.maximum(best, 0)
        ok = (best >= 0) & (best_iou <= params.correct_max_inter)
        ok &= (cons[row] > _at(params.noisy_consist)) & (score[row] >= _at(params.correct_score))
        ok &= np.any(box_coords(predictions)[row] != box_coords(gt), axis=1)  # else no change
        replace = np.where(ok & ~removed, best, -1)
    added = np.zeros(n_pred, dtype=bool)
    if params.md and cons is not None:
        added = (p_max <= params.md_max_inter) & (cons >= _at(params.iou_consist))
    return removed, replace, added


def _carried(gt: pa.Table, name: str, default: object, keep: IntArray, n_add: int) -> list[Any]:
    """Column ``name`` of the kept GT rows (``default`` where ``gt`` lacks it), then
    ``default`` for the ``n_add`` md rows."""
    if name not in gt.column_names:
        return [default] * (len(keep) + n_add)
    values = gt[name].to_pylist()
    return [*(values[k] for k in keep), *([default] * n_add)]


def _corrected_boxes(
    gt: pa.Table, predictions: pa.Table, params: GlcParams
) -> tuple[pa.Table, pa.Table, BoolArray]:
    """(box rows of the corrected set, their provenance, removed mask), in input order with
    box ids 0, 1, …; kept/noisy GT first, then the md additions."""
    removed, replace, added = glc_decisions(gt, predictions, params)
    g_box, p_box = box_coords(gt), box_coords(predictions)
    keep, add = np.flatnonzero(~removed), np.flatnonzero(added)
    n_add = len(add)
    coords = np.concatenate([g_box[keep], p_box[add]]).reshape(-1, 4)
    noisy = replace[keep] >= 0
    coords[: len(keep)][noisy] = p_box[replace[keep][noisy]]
    area = (coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])
    if "area" in gt.column_names:  # a kept box keeps its recorded area
        area[: len(keep)] = np.where(noisy, area[: len(keep)], gt["area"].to_numpy()[keep])
    p_ids, det = predictions["image_id"].to_pylist(), predictions["det_id"].to_pylist()
    boxes = box_rows(
        [*_carried(gt, "image_id", "", keep, 0), *(p_ids[k] for k in add)],
        coords,
        np.r_[gt["class_id"].to_numpy()[keep], predictions["class_id"].to_numpy()[add]],
        area=area,
        iscrowd=_carried(gt, "iscrowd", 0, keep, n_add),
        occluded=_carried(gt, "occluded", -1, keep, n_add),
        truncated=_carried(gt, "truncated", -1, keep, n_add),
        source_id=_carried(gt, "source_id", None, keep, n_add),
    )
    rule = [*np.where(noisy, "noisy", "kept").tolist(), *(["md"] * n_add)]
    prov = pa.table(
        {
            "image_id": boxes["image_id"],
            "box_id": boxes["box_id"],
            "rule": pa.array(rule, pa.string()),
            "gt_box_id": pa.array(_carried(gt, "box_id", None, keep, n_add), pa.int64()),
            "det_id": pa.array(
                [*(det[r] if r >= 0 else None for r in replace[keep]), *(det[k] for k in add)],
                pa.int32(),
            ),
        }
    )
    return boxes, prov, removed


def glc_correct(
    gt: pa.Table,
    predictions: pa.Table,
    params: GlcParams = GlcParams(),
    first_box_id: int | None = None,
    iteration: int | None = None,
) -> GlcResult:
    """The GLC-corrected label set of ``gt`` (gt or labels rows of the labeled images) from
    the teacher's ``predictions`` on them (§11.5).

    Rows are ordered by image_id (kept/noisy GT in input order, then the md additions in
    prediction row order) and numbered from ``first_box_id`` (default: after ``gt``'s
    largest box id); kept rows keep ``source`` and ``weight`` where ``gt`` has them, other
    rows get ``gt`` and 1; all get ``iteration``.
    """
    boxes, prov, removed = _corrected_boxes(gt, predictions, params)
    ids = np.asarray(boxes["image_id"].to_pylist(), dtype=str)
    order = pa.array(np.argsort(ids, kind="stable"), pa.int64())
    first = next_box_id(gt) if first_box_id is None else first_box_id
    new_ids = pa.array(np.arange(first, first + boxes.num_rows, dtype=np.int64))
    keep, n_add = np.flatnonzero(~removed), boxes.num_rows - int((~removed).sum())
    labels = boxes.append_column("source", pa.array(_carried(gt, "source", "gt", keep, n_add)))
    labels = labels.append_column(
        "weight", pa.array(_carried(gt, "weight", 1.0, keep, n_add), pa.float32())
    )
    labels = labels.append_column("iteration", pa.array([iteration] * len(ids), pa.int32()))
    labels = labels.take(order).set_column(1, "box_id", new_ids)
    prov = prov.take(order).set_column(1, "box_id", new_ids)
    gone = gt.filter(pa.array(removed)).select(["image_id", "box_id"])
    return GlcResult(schema.validate_table(labels, schema.LABELS, "glc labels"), prov, gone)
