"""The GLC stress test (ALGORITHMS §11.5): seeded corruption of a GT set and how much of it
the GLC rules recover.

``corrupt_labels`` drops 20 % of the boxes, moves 20 % of the remaining ones (a shift or a
resize, each corner offset 10–20 % of the box size) and adds k random boxes per image (sides
U(10, 100) px, inside the image, overlapping no other box of the image), and records every
change. ``glc_recovery`` scores a ``GlcResult`` of the corrupted set against that record:
``md`` additions against the dropped boxes, ``mistakes`` removals against the added boxes,
``noisy`` replacements against the moved boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from detloop import seeding
from detloop.data import schema
from detloop.data.labels import box_rows, next_box_id
from detloop.selectors.autolabel import box_iou
from detloop.selectors.columns import FloatArray, IntArray
from detloop.selectors.ssl_3d import box_coords, greedy_match, rows_by_image
from detloop.selectors.ssl_glc import GlcResult

KINDS = ("dropped", "shifted", "resized", "added")


@dataclass(frozen=True)
class StressParams:
    """Fractions and sizes of the corruption (defaults of §11.5; ``add_per_image`` is k)."""

    drop: float = 0.2
    jitter: float = 0.2
    jitter_size: tuple[float, float] = (0.1, 0.2)
    add_per_image: int = 1
    add_side: tuple[float, float] = (10.0, 100.0)
    max_tries: int = 100  # placements tried per added box before giving it up


def _jitter(
    box: FloatArray, size: tuple[float, float], rng: np.random.Generator
) -> tuple[str, FloatArray]:
    """A shift (both axes by ±U(size)·w, ±U(size)·h) or a resize about the centre (w and h
    scaled by 1 ± U(size)), chosen with probability ½ each."""
    w, h = box[2] - box[0], box[3] - box[1]
    frac = rng.uniform(*size, size=2) * rng.choice([-1.0, 1.0], size=2)
    if rng.random() < 0.5:
        dx, dy = frac[0] * w, frac[1] * h
        return "shifted", box + np.array([dx, dy, dx, dy])
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = w * (1 + frac[0]) / 2, h * (1 + frac[1]) / 2
    return "resized", np.array([cx - hw, cy - hh, cx + hw, cy + hh])


def _place(
    taken: list[FloatArray], wh: tuple[float, float], p: StressParams, rng: np.random.Generator
) -> FloatArray | None:
    """A random box with sides U(add_side) (at most the image's) inside a ``wh`` image that
    intersects none of ``taken``; None after ``max_tries`` attempts."""
    for _ in range(p.max_tries):
        w, h = np.minimum(rng.uniform(*p.add_side, size=2), wh)
        x1, y1 = rng.uniform(0, wh[0] - w), rng.uniform(0, wh[1] - h)
        box = np.array([x1, y1, x1 + w, y1 + h])
        others = np.asarray(taken, dtype=np.float64).reshape(-1, 4)
        lt = np.maximum(others[:, :2], box[:2])
        rb = np.minimum(others[:, 2:], box[2:])
        if not np.any(np.all(rb > lt, axis=1)):
            return box
    return None


def _sizes(images: pa.Table) -> dict[str, tuple[float, float]]:
    return {
        str(i): (float(w), float(h))
        for i, w, h in zip(
            images["image_id"].to_pylist(),
            images["width"].to_pylist(),
            images["height"].to_pylist(),
            strict=True,
        )
    }


def _change_row(
    kind: str, image_id: str, box_id: int, cls: int, orig: Any, new: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": kind, "image_id": image_id, "box_id": box_id, "class_id": cls}
    for k, c in enumerate(schema.COORDS):
        row[f"orig_{c}"] = None if orig is None else float(orig[k])
        row[c] = None if new is None else float(new[k])
    return row


def _added_boxes(
    taken: dict[str, list[FloatArray]],
    sizes: dict[str, tuple[float, float]],
    classes: IntArray,
    params: StressParams,
    rng: np.random.Generator,
) -> tuple[list[str], list[FloatArray], list[int]]:
    """k placed boxes per image (image_id order) with a class drawn from ``classes``."""
    ids: list[str] = []
    boxes: list[FloatArray] = []
    cls: list[int] = []
    for image_id in sorted(sizes):
        for _ in range(params.add_per_image):
            b = _place(taken[image_id], sizes[image_id], params, rng)
            if b is not None:
                taken[image_id].append(b)
                ids.append(image_id)
                boxes.append(b)
                cls.append(int(rng.choice(classes)))
    return ids, boxes, cls


def corrupt_labels(
    gt: pa.Table, images: pa.Table, seed: int, params: StressParams = StressParams()
) -> tuple[pa.Table, pa.Table]:
    """(corrupted gt table, changes) of the seeded stress test (``seeding.rng(seed, None,
    "glc_stress")``).

    ``images`` (image_id, width, height) lists every image (added boxes go to each, clipping
    uses its size). ``changes``: kind (dropped, shifted, resized, added), image_id, box_id
    (the original id; a new id after ``gt``'s largest for added boxes), class_id, orig_x1..y2
    (null for added) and x1..y2 in the corrupted set (null for dropped). Counts are rounded:
    round(drop·n) of the n boxes, round(jitter·m) of the m boxes left.
    """
    rng = seeding.rng(seed, None, "glc_stress")
    sizes = _sizes(images)
    box, cls = box_coords(gt), np.asarray(gt["class_id"].to_numpy(), dtype=np.int64)
    ids, box_ids = [str(i) for i in gt["image_id"].to_pylist()], gt["box_id"].to_pylist()
    missing = sorted(set(ids) - set(sizes))
    if missing:
        raise ValueError(f"stress test: no width/height for images {missing[:5]}")
    n = gt.num_rows
    dropped = np.sort(rng.choice(n, size=round(params.drop * n), replace=False))
    left = np.setdiff1d(np.arange(n), dropped)
    moved = np.sort(rng.choice(left, size=round(params.jitter * len(left)), replace=False))
    changes = [_change_row("dropped", ids[k], box_ids[k], cls[k], box[k], None) for k in dropped]
    new = box.copy()
    for k in moved:
        kind, b = _jitter(box[k], params.jitter_size, rng)
        w, h = sizes[ids[k]]
        new[k] = np.clip(b, 0, [w, h, w, h])
        changes.append(_change_row(kind, ids[k], box_ids[k], cls[k], box[k], new[k]))
    taken: dict[str, list[FloatArray]] = {i: [] for i in sizes}
    for k in left:
        taken[ids[k]].append(new[k])
    classes = np.unique(cls) if n else np.zeros(1, np.int64)
    add_ids, add_box, add_cls = _added_boxes(taken, sizes, classes, params, rng)
    first = next_box_id(gt)
    for j, (image_id, b, a_cls) in enumerate(zip(add_ids, add_box, add_cls, strict=True)):
        changes.append(_change_row("added", image_id, first + j, a_cls, None, b))
    kept = gt.select(schema.GT.schema.names).take(pa.array(left, pa.int64()))
    for k, c in enumerate(schema.COORDS):
        kept = kept.set_column(kept.column_names.index(c), c, pa.array(new[left, k]))
    area = (new[left, 2] - new[left, 0]) * (new[left, 3] - new[left, 1])
    kept = kept.set_column(kept.column_names.index("area"), "area", pa.array(area))
    extra = box_rows(add_ids, np.reshape(add_box, (-1, 4)), add_cls, first_box_id=first)
    # a validated input has non-nullable fields, box_rows' are nullable: unify the schemas
    both = pa.concat_tables([kept, extra], promote_options="default")
    out = schema.validate_table(both, schema.GT, "stress gt")
    return out, _changes_table(changes)


def _changes_table(rows: list[dict[str, Any]]) -> pa.Table:
    coords = [f"orig_{c}" for c in schema.COORDS] + list(schema.COORDS)
    fields = [
        pa.field("kind", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("box_id", pa.int64()),
        pa.field("class_id", pa.int32()),
        *(pa.field(c, pa.float64()) for c in coords),
    ]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def _md_hits(result: GlcResult, dropped: pa.Table, iou_thr: float) -> tuple[int, int]:
    """(md additions matching a dropped box of their class at IoU ≥ iou_thr, one-to-one,
    md additions)."""
    md = result.labels.filter(pa.array(np.asarray(result.provenance["rule"].to_pylist()) == "md"))
    orig_cols = [f"orig_{c}" for c in schema.COORDS]
    orig = dropped.select(["image_id", "class_id", *orig_cols])
    orig = orig.rename_columns(["image_id", "class_id", *schema.COORDS])
    m_box, d_box = box_coords(md), box_coords(orig)
    m_cls, d_cls = (np.asarray(t["class_id"].to_numpy(), dtype=np.int64) for t in (md, orig))
    d_groups, hits = rows_by_image(orig), 0
    for image_id, rows in rows_by_image(md).items():
        d_rows = d_groups.get(image_id, np.zeros(0, np.int64))
        allowed = m_cls[rows][:, None] == d_cls[d_rows][None, :]
        j, _ = greedy_match(m_box[rows], np.zeros(len(rows)), d_box[d_rows], iou_thr, allowed)
        hits += int((j >= 0).sum())
    return hits, md.num_rows


def _moved_ious(result: GlcResult, moved: pa.Table) -> tuple[FloatArray, FloatArray]:
    """IoU with the original box of each moved box: corrupted, and after correction (0 when
    ``mistakes`` removed it)."""
    orig = np.stack([moved[f"orig_{c}"].to_numpy() for c in schema.COORDS], axis=1)
    orig = orig.astype(np.float64).reshape(-1, 4)
    before = np.diag(box_iou(orig, box_coords(moved))) if len(orig) else np.zeros(0)
    parent = result.provenance["gt_box_id"].to_pylist()
    row_of = {p: k for k, p in enumerate(parent) if p is not None}
    fixed = box_coords(result.labels)
    after = np.zeros(len(orig))
    for k, box_id in enumerate(moved["box_id"].to_pylist()):
        r = row_of.get(box_id)
        if r is not None:
            after[k] = box_iou(orig[k : k + 1], fixed[r : r + 1])[0, 0]
    return before, after


def glc_recovery(result: GlcResult, changes: pa.Table, iou_thr: float = 0.5) -> dict[str, float]:
    """Precision/recall of each GLC rule against the stress test's ``changes``.

    md: additions matching a dropped box (same class, IoU ≥ ``iou_thr``, one-to-one) over
    additions / over dropped boxes; mistakes: removed boxes that were added over removed /
    over added; noisy: replaced boxes that were moved over replaced / over moved; and the
    moved boxes' mean IoU with their original before and after the correction.
    """
    kind = np.asarray(changes["kind"].to_pylist(), dtype=object)
    dropped = changes.filter(pa.array(kind == "dropped"))
    moved = changes.filter(pa.array((kind == "shifted") | (kind == "resized")))
    added_ids = set(changes.filter(pa.array(kind == "added"))["box_id"].to_pylist())
    md_hits, n_md = _md_hits(result, dropped, iou_thr)
    removed = set(result.removed["box_id"].to_pylist())
    rule = np.asarray(result.provenance["rule"].to_pylist(), dtype=object)
    noisy = np.asarray(result.provenance["gt_box_id"].to_pylist(), dtype=object)
    replaced = {int(b) for b in noisy[rule == "noisy"]}
    moved_ids = set(moved["box_id"].to_pylist())
    before, after = _moved_ious(result, moved)
    nan = float("nan")
    return {
        "md_precision": _ratio(md_hits, n_md),
        "md_recall": _ratio(md_hits, dropped.num_rows),
        "mistakes_precision": _ratio(len(removed & added_ids), len(removed)),
        "mistakes_recall": _ratio(len(removed & added_ids), len(added_ids)),
        "noisy_precision": _ratio(len(replaced & moved_ids), len(replaced)),
        "noisy_recall": _ratio(len(replaced & moved_ids), len(moved_ids)),
        "noisy_iou_before": float(before.mean()) if len(before) else nan,
        "noisy_iou_after": float(after.mean()) if len(after) else nan,
        "n_dropped": float(dropped.num_rows),
        "n_moved": float(moved.num_rows),
        "n_added": float(len(added_ids)),
    }
