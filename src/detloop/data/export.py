"""COCO JSON export of a run's images with their ground truth or training labels.

Original ids are restored: image ids from ``images.source_id``, annotation ids from the boxes'
``source_id``, category ids from ``categories.source_id``; items without an original id (or
whose id is already taken in the export) get fresh ids above the largest one in use.
``file_name`` is the path relative to the images root the split was imported from (the image id
without its split, plus the file's extension), or the absolute file when two exported images
would share one name. Widths and heights of boxes are recovered as the shortest decimal that
reproduces the stored ``x2 = x + w``, so an imported COCO file exports with the same numbers.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import write_json
from detloop.data.rundir import RunDir

log = logging.getLogger(__name__)

BoxSource = Literal["gt", "labels"]


def box_extent(lo: float, hi: float) -> float:
    """The shortest decimal ``d`` with ``lo + d == hi`` in float64 (``hi - lo`` if none)."""
    d = hi - lo
    for digits in range(1, 18):
        c = float(f"{d:.{digits}g}")
        if lo + c == hi:
            return c
    return d


def _assign_ids(original: Sequence[int | None]) -> list[int]:
    """Keep each original id once; the rest get fresh ids above the largest in use."""
    used: set[int] = set()
    out: list[int | None] = []
    for oid in original:
        if oid is not None and oid not in used:
            used.add(oid)
            out.append(oid)
        else:
            out.append(None)
    nxt = max(used, default=0) + 1
    result: list[int] = []
    for oid in out:
        if oid is None:
            oid, nxt = nxt, nxt + 1
        result.append(oid)
    return result


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _file_names(images: pa.Table) -> list[str]:
    ids: list[str] = images["image_id"].to_pylist()
    files: list[str] = images["file"].to_pylist()
    rel = [i.split("/", 1)[1] + posixpath.splitext(f)[1] for i, f in zip(ids, files, strict=True)]
    if len(set(rel)) == len(rel):
        return rel
    log.warning("exported images share relative file names; writing absolute paths instead")
    return files


def _select_images(images: pa.Table, state: str | None, split: str | None) -> pa.Table:
    for column, value, allowed in (
        ("state", state, schema.IMAGE_STATES),
        ("split", split, schema.SPLITS),
    ):
        if value is None:
            continue
        if value not in allowed:
            raise DataError(
                "export", None, column, f"unknown {column} {value!r}; one of {', '.join(allowed)}"
            )
        images = images.filter(pc.equal(images[column], value))
    return images.sort_by("image_id")


def _annotations(boxes: pa.Table, image_ids: dict[str, int], cat_ids: list[int]) -> list[Any]:
    boxes = boxes.filter(pc.is_in(boxes["image_id"], value_set=pa.array(list(image_ids))))
    boxes = boxes.sort_by([("image_id", "ascending"), ("box_id", "ascending")])
    cols = {
        c: boxes[c].to_pylist()
        for c in ("image_id", "class_id", "x1", "y1", "x2", "y2", "area", "iscrowd", "source_id")
    }
    ann_ids = _assign_ids(cols["source_id"])
    out = []
    for k in range(boxes.num_rows):
        x1, y1 = cols["x1"][k], cols["y1"][k]
        out.append(
            {
                "id": ann_ids[k],
                "image_id": image_ids[cols["image_id"][k]],
                "category_id": cat_ids[cols["class_id"][k]],
                "bbox": [x1, y1, box_extent(x1, cols["x2"][k]), box_extent(y1, cols["y2"][k])],
                "area": cols["area"][k],
                "iscrowd": cols["iscrowd"][k],
            }
        )
    return out


def export_coco(
    run: RunDir,
    out: str | os.PathLike[str],
    *,
    state: str | None = None,
    split: str | None = None,
    boxes: BoxSource = "gt",
) -> dict[str, int]:
    """Write the run's images (filtered by ``state`` and ``split``) as one COCO file.

    Args:
        run: the run directory.
        out: the COCO JSON file to write (atomically).
        state: only images in this state (e.g. ``examine`` for review).
        split: only images of this split.
        boxes: ``gt`` (imported ground truth) or ``labels`` (what training uses).

    Returns:
        Counts of exported images, annotations and categories.
    """
    images = _select_images(run.read_images(), state, split)
    cats = run.read_categories().sort_by("class_id")
    cat_ids = cats["source_id"].to_pylist()
    coco_ids = _assign_ids([_int_or_none(s) for s in images["source_id"].to_pylist()])
    names = _file_names(images)
    doc_images = [
        {"id": cid, "file_name": name, "width": w, "height": h, "detloop_id": iid}
        for cid, name, w, h, iid in zip(
            coco_ids,
            names,
            images["width"].to_pylist(),
            images["height"].to_pylist(),
            images["image_id"].to_pylist(),
            strict=True,
        )
    ]
    id_map = dict(zip(images["image_id"].to_pylist(), coco_ids, strict=True))
    table = run.read_gt() if boxes == "gt" else run.read_labels()
    annotations = _annotations(table, id_map, cat_ids)
    categories = [
        {"id": i, "name": n} for i, n in zip(cat_ids, cats["name"].to_pylist(), strict=True)
    ]
    write_json(
        {"images": doc_images, "annotations": annotations, "categories": categories}, Path(out)
    )
    counts = {
        "images": len(doc_images),
        "annotations": len(annotations),
        "categories": len(categories),
    }
    log.info("exported %s to %s", counts, out)
    return counts
