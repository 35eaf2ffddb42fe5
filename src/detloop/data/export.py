"""COCO JSON writing: the one writer, for run exports and for review exports.

Images are written in image-id order, each with its detloop id (``detloop_id``); category ids
are ``categories.source_id``, so an export restores the original ones. ``area`` and
``iscrowd`` are written as stored (w·h and 0 for boxes without them, e.g. predictions);
``score`` and ``u`` (as ``uncertainty``) are carried along when present and finite.

Two id policies (``CocoPolicy``):

* ``restore`` (``detloop export coco``): image ids from ``images.source_id`` and annotation ids
  from the boxes' ``source_id``; items without an original id (or whose id is already taken in
  the export) get fresh ids above the largest one in use. ``file_name`` is the path relative to
  the images root the split was imported from (``ids.relative_name``), or the absolute file when
  two exported images would share one name. Annotations in (image, box id) order. Widths and
  heights are the shortest decimal that reproduces the stored ``x2 = x + w``, so an imported
  COCO file exports with the same numbers.
* ``review`` (files for people and labeling tools): image and annotation ids are 1-based
  positions, ``file_name`` is the image file as stored (so a tool can open it), annotations in
  the order given, widths and heights ``x2 - x1`` and ``y2 - y1``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.ids import relative_name
from detloop.data.io import write_json
from detloop.data.rundir import RunDir

log = logging.getLogger(__name__)

BoxSource = Literal["dataset", "gt", "labels"]
CocoPolicy = Literal["restore", "review"]
Frame: TypeAlias = pa.Table | pd.DataFrame


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


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (strict JSON)."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _columns(frame: Frame, names: Sequence[str]) -> dict[str, list[Any]]:
    """The columns of ``frame`` among ``names`` that it has, as Python lists."""
    have = frame.column_names if isinstance(frame, pa.Table) else list(frame.columns)
    if isinstance(frame, pa.Table):
        return {n: frame[n].to_pylist() for n in names if n in have}
    return {n: frame[n].tolist() for n in names if n in have}


def _file_names(ids: list[str], files: list[str]) -> list[str]:
    rel = [relative_name(i, f) for i, f in zip(ids, files, strict=True)]
    if len(set(rel)) == len(rel):
        return rel
    log.warning("exported images share relative file names; writing absolute paths instead")
    return files


def _images(images: Frame, policy: CocoPolicy) -> list[dict[str, Any]]:
    cols = _columns(images, ("image_id", "file", "width", "height", "source_id"))
    order = sorted(range(len(cols["image_id"])), key=lambda k: str(cols["image_id"][k]))
    ids = [str(cols["image_id"][k]) for k in order]
    files = [str(cols["file"][k]) for k in order]
    if policy == "restore":
        source = cols.get("source_id", [None] * len(order))
        coco_ids = _assign_ids([_int_or_none(source[k]) for k in order])
        names = _file_names(ids, files)
    else:
        coco_ids, names = list(range(1, len(ids) + 1)), files
    return [
        {"id": c, "file_name": name, "width": int(cols["width"][k]),
         "height": int(cols["height"][k]), "detloop_id": i}
        for c, name, k, i in zip(coco_ids, names, order, ids, strict=True)
    ]  # fmt: skip


def _annotation(c: dict[str, list[Any]], k: int, policy: CocoPolicy) -> dict[str, Any]:
    """One box as COCO (``id``, ``image_id`` and ``category_id`` are filled by the caller)."""
    x1, y1, x2, y2 = (float(c[n][k]) for n in schema.COORDS)
    area = c["area"][k] if "area" in c else (x2 - x1) * (y2 - y1)
    w, h = (box_extent(x1, x2), box_extent(y1, y2)) if policy == "restore" else (x2 - x1, y2 - y1)
    ann: dict[str, Any] = {
        "bbox": [x1, y1, w, h],
        "area": area,
        "iscrowd": int(c["iscrowd"][k]) if "iscrowd" in c else 0,
    }
    for key, col in (("score", "score"), ("uncertainty", "u")):
        value = finite_or_none(c[col][k]) if col in c else None
        if value is not None:
            ann[key] = value
    if c.get("source") is not None and c["source"][k] is not None:
        ann["detloop_source"] = str(c["source"][k])  # provenance: gt, oracle, human, auto
    return ann


def _annotations(
    boxes: Frame, image_ids: dict[str, int], cat_ids: dict[int, int], policy: CocoPolicy
) -> list[dict[str, Any]]:
    names = ("image_id", "box_id", "class_id", *schema.COORDS, "area", "iscrowd", "source_id",
             "score", "u", "source")  # fmt: skip
    c = _columns(boxes, names)
    rows = [k for k, i in enumerate(c["image_id"]) if str(i) in image_ids]
    if policy == "restore":
        rows.sort(key=lambda k: (str(c["image_id"][k]), c["box_id"][k]))
        ann_ids = _assign_ids([_int_or_none(c["source_id"][k]) for k in rows])
    else:
        ann_ids = list(range(1, len(rows) + 1))
    out = []
    for ann_id, k in zip(ann_ids, rows, strict=True):
        head = {"id": ann_id, "image_id": image_ids[str(c["image_id"][k])],
                "category_id": cat_ids[int(c["class_id"][k])]}  # fmt: skip
        out.append({**head, **_annotation(c, k, policy)})
    return out


def coco_document(
    images: Frame, boxes: Frame, categories: Frame, *, policy: CocoPolicy
) -> dict[str, Any]:
    """A COCO detection document (see the module docstring for ``policy``).

    Args:
        images: ``image_id, file, width, height`` (and ``source_id`` for ``restore``).
        boxes: ``image_id, class_id, x1, y1, x2, y2`` in absolute pixels (``restore``: also
            ``box_id`` and ``source_id``); optionally ``area, iscrowd, score, u``. Boxes of
            images not in ``images`` are left out.
        categories: ``class_id, name, source_id``.
    """
    cats = _columns(categories, ("class_id", "name", "source_id"))
    order = sorted(range(len(cats["class_id"])), key=lambda k: int(cats["class_id"][k]))
    cat_ids = {int(cats["class_id"][k]): int(cats["source_id"][k]) for k in order}
    doc_images = _images(images, policy)
    id_map = {str(img["detloop_id"]): int(img["id"]) for img in doc_images}
    return {
        "images": doc_images,
        "annotations": _annotations(boxes, id_map, cat_ids, policy),
        "categories": [
            {"id": int(cats["source_id"][k]), "name": str(cats["name"][k])} for k in order
        ],
    }


def write_coco(
    images: Frame, boxes: Frame, categories: Frame, path: Path, *, policy: CocoPolicy
) -> Path:
    """Write ``coco_document`` atomically to ``path``."""
    write_json(coco_document(images, boxes, categories, policy=policy), path)
    return path


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


def _dataset(images: pa.Table, labels: pa.Table, gt: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The labeled dataset: pool images that are labeled or auto-labeled with their labels
    (pseudo-labels are a training aid, not labels), other splits with their ground truth."""
    in_pool = pc.equal(images["split"], "pool")
    done = pc.is_in(images["state"], value_set=pa.array(["labeled", "auto_labeled"]))
    images = images.filter(pc.or_(pc.invert(in_pool), done))
    pool_ids = images.filter(pc.equal(images["split"], "pool"))["image_id"]
    labels = labels.filter(pc.and_(pc.is_in(labels["image_id"], value_set=pool_ids),
                                   pc.not_equal(labels["source"], "pseudo")))  # fmt: skip
    other = gt.filter(pc.invert(pc.is_in(gt["image_id"], value_set=pool_ids)))
    other = other.filter(pc.is_in(other["image_id"], value_set=images["image_id"]))
    other = other.append_column("source", pa.array(["gt"] * other.num_rows, pa.string()))
    cols = other.column_names
    ours = labels.select(cols)
    return images, pa.concat_tables([ours, other.select(cols).cast(ours.schema)])


def export_coco(
    run: RunDir,
    out: str | os.PathLike[str],
    *,
    state: str | None = None,
    split: str | None = None,
    boxes: BoxSource = "gt",
) -> dict[str, int]:
    """Write the run's images (filtered by ``state`` and ``split``) as one COCO file, with the
    original ids restored (policy ``restore``).

    Args:
        run: the run directory.
        out: the COCO JSON file to write (atomically).
        state: only images in this state (e.g. ``examine`` for review).
        split: only images of this split.
        boxes: ``gt`` (the imported ground truth, the default); ``dataset`` (``detloop
            export``'s default: the labeled dataset — pool images labeled by the oracle or
            people, or auto-labeled, with their labels, the other splits with their ground
            truth; each box carries its provenance as ``detloop_source``); or ``labels``
            (what training uses, pseudo-labels included, with provenance).

    Returns:
        Counts of exported images, annotations and categories.
    """
    images = _select_images(run.read_images(), state, split)
    if boxes == "dataset":
        images, table = _dataset(images, run.read_labels(), run.read_gt())
    else:
        table = run.read_gt() if boxes == "gt" else run.read_labels()
    doc = coco_document(images, table, run.read_categories(), policy="restore")
    write_json(doc, Path(out))
    counts = {key: len(doc[key]) for key in ("images", "annotations", "categories")}
    log.info("exported %s to %s", counts, out)
    return counts
