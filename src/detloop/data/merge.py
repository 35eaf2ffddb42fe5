"""The tables an import adds to a run: merged categories, new image rows and new gt rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from detloop.data.errors import DataError
from detloop.data.labels import box_rows
from detloop.data.parsed import Parsed


@dataclass(frozen=True)
class ImportReport:
    """What an import did."""

    split: str
    n_images: int
    n_boxes: int
    n_quarantined: int
    n_skipped: int
    categories_added: tuple[str, ...]
    problems: tuple[DataError, ...]

    def summary(self) -> str:
        """One line for a person."""
        text = f"imported {self.n_images} images and {self.n_boxes} boxes into split {self.split}"
        if self.categories_added:
            text += f"; new categories: {', '.join(self.categories_added)}"
        if self.n_quarantined:
            text += f"; {self.n_quarantined} images quarantined (state examine)"
        if self.n_skipped:
            text += f"; {self.n_skipped} items skipped"
        return text


def merge_categories(existing: pa.Table, parsed: Parsed) -> tuple[pa.Table, np.ndarray, list[str]]:
    """Map the source's categories onto the run's by name, appending new ones.

    Returns:
        The merged categories table, the run class id of every source class, and the names
        added.

    Raises:
        DataError: a name or COCO id that means different categories in the run and the source.
    """
    names = existing["name"].to_pylist()
    ids = existing["source_id"].to_pylist()
    class_ids = existing["class_id"].to_pylist()
    by_name = dict(zip(names, class_ids, strict=True))
    by_sid = dict(zip(ids, names, strict=True))
    mapping = np.zeros(len(parsed.categories), dtype=np.int32)
    added: list[str] = []
    problems: list[DataError] = []
    for k, (name, sid) in enumerate(parsed.categories):
        if name in by_name:
            run_sid = ids[names.index(name)]
            if sid is not None and sid != run_sid:
                problems.append(
                    DataError(
                        parsed.source,
                        k,
                        "categories.id",
                        (f"category {name!r} has id {sid} here but {run_sid} in the run"),
                    )
                )
            mapping[k] = by_name[name]
            continue
        if sid is None:
            sid = max([*ids, len(names)]) + 1
        if sid in by_sid:
            problems.append(
                DataError(
                    parsed.source,
                    k,
                    "categories.id",
                    (f"category id {sid} is {name!r} here but {by_sid[sid]!r} in the run"),
                )
            )
            continue
        new_id = len(names)
        names.append(name)
        ids.append(sid)
        class_ids.append(new_id)
        by_name[name], by_sid[sid], mapping[k] = new_id, name, new_id
        added.append(name)
    if problems:
        raise DataError.many(problems)
    table = pa.table(
        {
            "class_id": pa.array(class_ids, pa.int32()),
            "name": pa.array(names, pa.string()),
            "source_id": pa.array(ids, pa.int64()),
        }
    )
    return table, mapping, added


def image_rows(parsed: Parsed, keep: np.ndarray, split: str, reasons: dict[int, str]) -> pa.Table:
    """New images rows: the kept images of ``parsed``, quarantined ones in state ``examine``."""
    idx = np.flatnonzero(keep)
    normal = "labeled" if parsed.labeled and split != "pool" else "unlabeled"
    reason = [reasons.get(i) for i in idx.tolist()]
    return pa.table(
        {
            "image_id": pa.array([parsed.image_ids[i] for i in idx], pa.string()),
            "file": pa.array([parsed.files[i] for i in idx], pa.string()),
            "width": pa.array(np.asarray(parsed.width, dtype=np.int32)[idx]),
            "height": pa.array(np.asarray(parsed.height, dtype=np.int32)[idx]),
            "split": pa.array([split] * len(idx), pa.string()),
            "state": pa.array([normal if r is None else "examine" for r in reason], pa.string()),
            "iteration": pa.nulls(len(idx), pa.int32()),
            "phash": pa.array([parsed.phash[i] for i in idx], pa.uint64()),
            "source_id": pa.array([parsed.source_id[i] for i in idx], pa.string()),
            "reason": pa.array(reason, pa.string()),
        }
    )


def gt_rows(parsed: Parsed, keep: np.ndarray, mapping: np.ndarray, first_id: int) -> pa.Table:
    """New gt rows: boxes of kept images, run class ids, box ids from ``first_id`` on."""
    img = np.asarray(parsed.box_image, dtype=np.int64)
    sel = keep[img] if len(img) else np.zeros(0, dtype=bool)
    cls = np.asarray(parsed.box_class, dtype=np.int64)[sel]

    def col(values: list[int] | list[float], dtype: type[np.generic]) -> np.ndarray:
        out: np.ndarray = np.asarray(values, dtype=dtype)[sel]
        return out

    return box_rows(
        [parsed.image_ids[i] for i in img[sel].tolist()],
        np.asarray(parsed.box_coords, dtype=np.float64).reshape(-1, 4)[sel],
        mapping[cls] if len(cls) else cls,
        first_box_id=first_id,
        area=col(parsed.box_area, np.float64),
        iscrowd=col(parsed.box_iscrowd, np.int8),
        occluded=col(parsed.box_occluded, np.int8),
        truncated=col(parsed.box_truncated, np.int8),
        source_id=[s for s, k in zip(parsed.box_source_id, sel, strict=True) if k],
    )
