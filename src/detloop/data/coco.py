"""COCO JSON reader: images, categories and boxes, every problem reported with its item.

Boxes are COCO ``[x, y, w, h]`` in absolute pixels and are stored as ``x1 = x``,
``x2 = x + w`` in float64; ``area`` and ``iscrowd`` are kept as given (``area`` defaults to
``w * h``), and the original image, annotation and category ids are kept as ``source_id`` so an
export restores them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detloop.data.errors import DataError
from detloop.data.io import read_json
from detloop.data.parsed import BOX_TOLERANCE, Parsed, box_problem, normalize_rel

log = logging.getLogger(__name__)


def _get(item: dict[str, Any], key: str) -> Any:
    """A key's value, or None (typed ``Any``: JSON values are checked where they are used)."""
    return item.get(key)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool) and math.isfinite(_to_float(v))


def _to_float(v: float) -> float:
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _top_level(doc: Any, file: str) -> tuple[list[Any], list[Any], list[Any]]:
    if not isinstance(doc, dict):
        raise DataError(file, None, None, "a COCO file must hold a JSON object")
    problems = []
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            problems.append(DataError(file, None, key, "required key is missing"))
        elif not isinstance(doc[key], list):
            problems.append(DataError(file, None, key, "must be a list"))
    if problems:
        raise DataError.many(problems)
    return doc["images"], doc["annotations"], doc["categories"]


def _categories(items: list[Any], parsed: Parsed, classes: Sequence[str] | None) -> dict[int, int]:
    """Fill ``parsed.categories``; returns COCO category id -> local class index."""
    file = parsed.source
    found: dict[int, str] = {}
    for k, cat in enumerate(items):
        if not isinstance(cat, dict):
            parsed.problem(file, k, "categories", "must be an object", fatal=True)
            continue
        cid, name = _get(cat, "id"), _get(cat, "name")
        if not _is_int(cid) or not isinstance(name, str) or not name:
            parsed.problem(
                file,
                k,
                "categories",
                "needs an integer 'id' and a non-empty string "
                f"'name', got id={cid!r} name={name!r}",
                fatal=True,
            )
        elif cid in found or name in found.values():
            parsed.problem(
                file, k, "categories", f"duplicate category id {cid} or name {name!r}", fatal=True
            )
        else:
            found[cid] = name
    order = sorted(found) if classes is None else []
    if classes is not None:
        by_name = {n: c for c, n in found.items()}
        for name in classes:
            if name in by_name:
                order.append(by_name[name])
            else:
                parsed.problem(
                    file,
                    None,
                    "categories",
                    f"class {name!r} (from --classes) is not "
                    f"in the file; it has {sorted(found.values())}",
                    fatal=True,
                )
    parsed.categories = [(found[c], c) for c in order]
    return {c: k for k, c in enumerate(order)}


def _images(items: list[Any], parsed: Parsed) -> dict[int, int]:
    """Fill the images of ``parsed``; returns COCO image id -> image index."""
    file = parsed.source
    by_id: dict[int, int] = {}
    for k, img in enumerate(items):
        if not isinstance(img, dict):
            parsed.problem(file, k, "images", "must be an object", fatal=True)
            continue
        iid, name, w, h = (_get(img, key) for key in ("id", "file_name", "width", "height"))
        bad = [
            key
            for key, ok in (
                ("id", _is_int(iid)),
                ("file_name", isinstance(name, str)),
                ("width", _is_int(w) and w > 0),
                ("height", _is_int(h) and h > 0),
            )
            if not ok
        ]
        if bad:
            what = ", ".join(f"{b}={img.get(b)!r}" for b in bad)
            parsed.problem(
                file,
                k,
                f"images.{bad[0]}",
                f"missing or wrong type: {what} (id "
                "must be an integer, file_name a string, width and height positive "
                "integers)",
                fatal=True,
            )
            continue
        rel = normalize_rel(str(name))
        if rel is None:
            parsed.problem(
                file,
                k,
                "images.file_name",
                f"file_name {name!r} must be a path inside the images folder",
                fatal=True,
            )
            continue
        index = parsed.add_image(rel, int(w), int(h), str(iid))
        if iid in by_id:
            j = by_id[iid]
            for i in (j, index):
                parsed.problem(
                    file,
                    k,
                    "images.id",
                    f"duplicate image id {iid} (items {j} and {index})",
                    image=i,
                )
        else:
            by_id[iid] = index
    return by_id


_NUM = frozenset((int, float))


def _bad_fields(ann: dict[str, Any]) -> list[str]:
    """The fields of an annotation that are missing or of the wrong type (slow, exact)."""
    bbox, area, crowd = _get(ann, "bbox"), _get(ann, "area"), ann.get("iscrowd", 0)
    checks = (
        ("id", _is_int(_get(ann, "id"))),
        ("category_id", _is_int(_get(ann, "category_id"))),
        ("bbox", isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)),
        ("area", area is None or _is_num(area)),
        ("iscrowd", _is_int(crowd) and crowd in (0, 1)),
    )
    return [key for key, ok in checks if not ok]


@dataclass
class _Boxes:
    """Annotations that passed the per-item checks, collected for vectorised box checks."""

    item: list[int] = field(default_factory=list)
    image: list[int] = field(default_factory=list)
    category: list[int] = field(default_factory=list)
    ann_id: list[int] = field(default_factory=list)
    xywh: list[list[float]] = field(default_factory=list)
    area: list[float | None] = field(default_factory=list)
    iscrowd: list[int] = field(default_factory=list)


def _annotations(
    items: list[Any], parsed: Parsed, images: dict[int, int], known_cats: set[int]
) -> _Boxes:
    """Per-item checks (types, references, duplicates); boxes are checked in ``_add_boxes``."""
    file, num = parsed.source, _NUM
    seen: set[int] = set()
    out = _Boxes()
    for k, ann in enumerate(items):
        if type(ann) is not dict:
            parsed.problem(file, k, "annotations", "must be an object")
            continue
        iid = ann.get("image_id")
        image = images.get(iid) if type(iid) is int else None
        if image is None:
            parsed.problem(
                file,
                k,
                "annotations.image_id",
                f"annotation {ann.get('id')!r} refers to unknown image id {iid!r}",
            )
            continue
        aid, cid, bbox = ann.get("id"), ann.get("category_id"), ann.get("bbox")
        area, crowd = ann.get("area"), ann.get("iscrowd", 0)
        # Inline type checks: this loop runs once per annotation (millions in big datasets).
        if not (
            type(aid) is int
            and type(cid) is int
            and type(bbox) is list
            and len(bbox) == 4
            and type(bbox[0]) in num
            and type(bbox[1]) in num
            and type(bbox[2]) in num
            and type(bbox[3]) in num
            and (area is None or type(area) in num)
            and type(crowd) is int
            and crowd in (0, 1)
        ):
            bad = _bad_fields(ann)
            what = ", ".join(f"{b}={ann.get(b)!r}" for b in bad)
            parsed.problem(
                file, k, f"annotations.{bad[0]}", f"missing or wrong type: {what}", image=image
            )
            continue
        if aid in seen:
            parsed.problem(file, k, "annotations.id", f"duplicate annotation id {aid}", image=image)
            continue
        seen.add(aid)
        if cid not in known_cats:
            parsed.problem(
                file, k, "annotations.category_id", f"unknown category id {cid}", image=image
            )
            continue
        out.item.append(k)
        out.image.append(image)
        out.category.append(cid)
        out.ann_id.append(aid)
        out.xywh.append(bbox)
        out.area.append(area)
        out.iscrowd.append(crowd)
    return out


def _add_boxes(parsed: Parsed, boxes: _Boxes, cats: dict[int, int]) -> None:
    """Check every box at once (finite, positive size, inside the image) and keep the good ones."""
    if not boxes.item:
        return
    try:
        xywh = np.array(boxes.xywh, dtype=np.float64).reshape(-1, 4)
    except OverflowError:  # integers beyond float range: they become inf and are reported
        xywh = np.array([[_to_float(v) for v in b] for b in boxes.xywh], dtype=np.float64)
    x1, y1 = xywh[:, 0], xywh[:, 1]
    x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
    img = np.asarray(boxes.image, dtype=np.int64)
    w = np.asarray(parsed.width, dtype=np.float64)[img]
    h = np.asarray(parsed.height, dtype=np.float64)[img]
    t = BOX_TOLERANCE
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(xywh).all(axis=1) | (x2 <= x1) | (y2 <= y1)
        bad |= (x1 < -t) | (y1 < -t) | (x2 > w + t) | (y2 > h + t)
    coords = np.stack([x1, y1, x2, y2], axis=1)
    for r in np.flatnonzero(bad).tolist():
        c = (float(x1[r]), float(y1[r]), float(x2[r]), float(y2[r]))
        why = box_problem(c, parsed.width[boxes.image[r]], parsed.height[boxes.image[r]])
        parsed.problem(
            parsed.source,
            boxes.item[r],
            "annotations.bbox",
            f"annotation {boxes.ann_id[r]}: {why}",
            image=boxes.image[r],
        )
    given = np.array([a is not None for a in boxes.area], dtype=bool)
    area = np.array([0.0 if a is None else _to_float(a) for a in boxes.area], np.float64)
    area = np.where(given, area, xywh[:, 2] * xywh[:, 3])
    bad_area = ~bad & ~(np.isfinite(area) & (area >= 0))
    for r in np.flatnonzero(bad_area).tolist():
        parsed.problem(
            parsed.source,
            boxes.item[r],
            "annotations.area",
            f"annotation {boxes.ann_id[r]}: area {boxes.area[r]!r} is not a finite number >= 0",
            image=boxes.image[r],
        )
    cat_of = np.array([cats.get(c, -1) for c in boxes.category], dtype=np.int64)
    keep = np.flatnonzero(~bad & ~bad_area & (cat_of >= 0))
    parsed.box_image.extend(img[keep].tolist())
    parsed.box_class.extend(cat_of[keep].tolist())
    parsed.box_coords.extend(map(tuple, coords[keep].tolist()))
    parsed.box_area.extend(area[keep].tolist())
    parsed.box_iscrowd.extend(np.asarray(boxes.iscrowd)[keep].tolist())
    parsed.box_occluded.extend([-1] * len(keep))
    parsed.box_truncated.extend([-1] * len(keep))
    parsed.box_source_id.extend(np.asarray(boxes.ann_id, dtype=np.int64)[keep].tolist())


def parse_coco(
    path: Path, images: Path | None = None, classes: Sequence[str] | None = None
) -> Parsed:
    """Read a COCO detection file.

    Args:
        path: the JSON file.
        images: the folder ``file_name`` is relative to (default: the JSON file's folder).
        classes: category names to keep, in class-id order (default: all, by COCO id).

    Raises:
        DataError: the file is missing, not JSON, or lacks the top-level lists.
    """
    doc = read_json(path)
    root = (images if images is not None else path.parent).resolve()
    parsed = Parsed(source=str(path), images_root=root, labeled=True)
    image_items, ann_items, cat_items = _top_level(doc, str(path))
    cats = _categories(cat_items, parsed, classes)
    by_id = _images(image_items, parsed)
    known: set[int] = {c["id"] for c in cat_items if isinstance(c, dict) and _is_int(c.get("id"))}
    _add_boxes(parsed, _annotations(ann_items, parsed, by_id, known), cats)
    n_other = len(known) - len(cats)
    if n_other > 0:
        log.info("%s: %d categories not in the class list; their boxes are skipped", path, n_other)
    return parsed
