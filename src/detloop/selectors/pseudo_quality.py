"""Pseudo-labels against the hidden ground truth of their candidate images (simulated runs):
precision and recall at IoU 0.5 — of all of them and of each class, beside the labeled part's
count of that class. The per-class table is what tells a selection that feeds the student
common classes from one that feeds it rare ones (mAP weighs every class alike)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.selectors.ssl_3d import match_rows


@dataclass(frozen=True)
class PseudoQuality:
    """Pseudo-labels against the hidden ground truth of their candidate images: precision =
    pseudo-labels matching a gt box of their class at IoU ≥ ``iou`` (each gt matched once,
    greedily by descending score) / pseudo-labels; recall = matched gt boxes / gt boxes of the
    candidate images."""

    n_pseudo: int
    n_gt: int
    matched: int

    @property
    def precision(self) -> float:
        return self.matched / self.n_pseudo if self.n_pseudo else float("nan")

    @property
    def recall(self) -> float:
        return self.matched / self.n_gt if self.n_gt else float("nan")

    def __add__(self, other: PseudoQuality) -> PseudoQuality:
        """The quality of both sets of pseudo-labels together (counts add)."""
        return PseudoQuality(
            self.n_pseudo + other.n_pseudo, self.n_gt + other.n_gt, self.matched + other.matched
        )

    @staticmethod
    def total(parts: Iterable[PseudoQuality]) -> PseudoQuality:
        """The quality of all ``parts`` together (per class, per epoch: their counts add)."""
        return sum(parts, PseudoQuality(0, 0, 0))

    def as_dict(self) -> dict[str, float]:
        return {
            "pseudo_precision": self.precision,
            "pseudo_recall": self.recall,
            "pseudo_boxes": float(self.n_pseudo),
            "pseudo_gt_boxes": float(self.n_gt),
        }


def _class_ids(table: pa.Table) -> np.ndarray:
    return np.asarray(table["class_id"].to_numpy(), dtype=np.int64)


def _class_counts(table: pa.Table, names: Mapping[int, str]) -> dict[int, int]:
    ids, counts = np.unique(_class_ids(table), return_counts=True)
    return {int(i): int(n) for i, n in zip(ids, counts, strict=True) if int(i) in names}


def pseudo_quality_by_class(
    pseudo: pa.Table, gt: pa.Table, candidate_ids: list[str], iou: float = 0.5
) -> dict[int, PseudoQuality]:
    """``pseudo_quality`` of each class — its pseudo-labels against its gt boxes — for every
    class holding a pseudo-label or a gt box of the candidate images. The matching never
    crosses classes (``match_rows`` is class-aware), so the classes' counts add up to the
    whole set's."""
    wanted = pa.array(sorted(set(candidate_ids)), pa.string())
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=wanted))
    pseudo = pseudo.filter(pc.is_in(pseudo["image_id"], value_set=wanted))
    order = pseudo["score" if "score" in pseudo.column_names else "weight"].to_numpy()
    gt_row, _ = match_rows(pseudo, np.asarray(order, dtype=np.float64), gt, iou)
    p_cls, g_cls = _class_ids(pseudo), _class_ids(gt)
    hit = gt_row >= 0
    return {
        int(c): PseudoQuality(
            int((p_cls == c).sum()), int((g_cls == c).sum()), int((hit & (p_cls == c)).sum())
        )
        for c in np.union1d(p_cls, g_cls)
    }


def pseudo_quality(
    pseudo: pa.Table, gt: pa.Table, candidate_ids: list[str], iou: float = 0.5
) -> PseudoQuality:
    """Precision and recall of ``pseudo`` (rows with image_id, class_id, x1..y2 and ``score``
    when known) against ``gt`` over the images ``candidate_ids`` (see ``PseudoQuality``)."""
    return PseudoQuality.total(pseudo_quality_by_class(pseudo, gt, candidate_ids, iou).values())


def pseudo_class_rows(
    pseudo: pa.Table,
    labeled: pa.Table,
    names: Mapping[int, str],
    quality: Mapping[int, PseudoQuality] | None = None,
) -> list[dict[str, Any]]:
    """One row per class of ``names`` (class id → name): ``labeled`` boxes of the class (what
    the model learnt it from), ``pseudo`` labels of it and — with their ``quality`` against
    the hidden gt (``pseudo_quality_by_class``) — its ``gt`` boxes, the ``matched``
    pseudo-labels and their ``precision`` and ``recall`` at IoU 0.5 (None where a count is 0)."""
    n_labeled, n_pseudo = (_class_counts(t, names) for t in (labeled, pseudo))
    rows: list[dict[str, Any]] = []
    for class_id in sorted(names):
        row: dict[str, Any] = {
            "class_id": class_id,
            "name": names[class_id],
            "labeled": n_labeled.get(class_id, 0),
            "pseudo": n_pseudo.get(class_id, 0),
        }
        if quality is not None:
            q = quality.get(class_id, PseudoQuality(0, 0, 0))
            row.update(
                gt=q.n_gt,
                matched=q.matched,
                precision=q.precision if q.n_pseudo else None,
                recall=q.recall if q.n_gt else None,
            )
        rows.append(row)
    return rows
