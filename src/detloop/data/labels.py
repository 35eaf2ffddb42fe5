"""Building box tables: ground-truth rows, labels rows and the next free box id.

Every ``gt`` and ``labels`` table that is made rather than read comes from here
(``labels_from_boxes(box_rows(...), source=..., iteration=...)``), so the column
types and the defaults of what a source does not say (area w·h, not crowd, occlusion and
truncation unknown, no original id, weight 1) are written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data import schema

# class_id of an ignore region in a training stream's labels (``ssl.rejected: ignore``): anchors
# it covers are neither object nor background in the class loss. Only inside a training job,
# never in a stored labels table (whose class ids index the categories).
IGNORE_CLASS_ID: Final = -1


def next_box_id(*tables: pa.Table, empty: int = 0) -> int:
    """One more than the largest ``box_id`` of ``tables``; ``empty`` when they have no rows."""
    found = [int(pc.max(t["box_id"]).as_py()) for t in tables if t.num_rows]
    return max(found) + 1 if found else empty


def box_rows(
    image_ids: Sequence[str],
    coords: npt.ArrayLike,
    class_ids: npt.ArrayLike,
    *,
    first_box_id: int = 0,
    box_ids: npt.ArrayLike | None = None,
    area: npt.ArrayLike | None = None,
    iscrowd: npt.ArrayLike | None = None,
    occluded: npt.ArrayLike | None = None,
    truncated: npt.ArrayLike | None = None,
    source_id: Sequence[int | None] | None = None,
) -> pa.Table:
    """A ``gt`` table (columns and types of ``schema.GT``, not validated).

    Args:
        image_ids: one per box.
        coords: ``(n, 4)`` absolute x1, y1, x2, y2.
        class_ids: run class ids.
        first_box_id: box ids are ``first_box_id, first_box_id + 1, ...`` unless ``box_ids``.
        box_ids: the box ids, when they are given.
        area: default ``(x2 - x1) * (y2 - y1)``.
        iscrowd: default 0; ``occluded`` and ``truncated``: default -1 (unknown).
        source_id: the original annotation ids (default null).
    """
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 4)
    n = len(xy)
    ids = np.arange(first_box_id, first_box_id + n) if box_ids is None else box_ids
    if area is None:
        area = (xy[:, 2] - xy[:, 0]) * (xy[:, 3] - xy[:, 1])

    def int8(values: npt.ArrayLike | None, default: int) -> pa.Array:
        column = np.full(n, default) if values is None else values
        return pa.array(np.asarray(column, dtype=np.int8))

    return pa.table(
        {
            "image_id": pa.array(list(image_ids), pa.string()),
            "box_id": pa.array(np.asarray(ids, dtype=np.int64)),
            "class_id": pa.array(np.asarray(class_ids, dtype=np.int32).reshape(n)),
            **{c: pa.array(xy[:, k]) for k, c in enumerate(schema.COORDS)},
            "area": pa.array(np.asarray(area, dtype=np.float64)),
            "iscrowd": int8(iscrowd, 0),
            "occluded": int8(occluded, -1),
            "truncated": int8(truncated, -1),
            "source_id": pa.array([None] * n if source_id is None else list(source_id), pa.int64()),
        }
    )


def labels_from_boxes(
    boxes: pa.Table,
    *,
    source: str,
    iteration: int | None,
    weight: npt.ArrayLike | None = None,
) -> pa.Table:
    """``labels`` rows (validated) from box rows: their ``source``, training ``weight``
    (default 1) and the ``iteration`` they were made in."""
    n = boxes.num_rows
    w = np.ones(n, np.float32) if weight is None else np.asarray(weight, dtype=np.float32)
    table = boxes.select(schema.GT.schema.names)
    table = table.append_column("source", pa.array([source] * n, pa.string()))
    table = table.append_column("weight", pa.array(w))
    table = table.append_column("iteration", pa.array([iteration] * n, pa.int32()))
    return schema.validate_table(table, schema.LABELS, file=f"{source} labels")
