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
from pathlib import Path
from typing import Any

from detloop.data.errors import DataError
from detloop.data.io import read_json
from detloop.data.parsed import Parsed, box_problem, normalize_rel

log = logging.getLogger(__name__)


def _get(item: dict[str, Any], key: str) -> Any:
    """A key's value, or None (typed ``Any``: JSON values are checked where they are used)."""
    return item.get(key)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool) and math.isfinite(v)


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


def _annotations(
    items: list[Any],
    parsed: Parsed,
    images: dict[int, int],
    cats: dict[int, int],
    known_cats: set[int],
) -> None:
    file = parsed.source
    seen: set[int] = set()
    for k, ann in enumerate(items):
        if not isinstance(ann, dict):
            parsed.problem(file, k, "annotations", "must be an object")
            continue
        aid, iid, cid, bbox = (_get(ann, k) for k in ("id", "image_id", "category_id", "bbox"))
        image = images.get(iid) if _is_int(iid) else None
        if not _is_int(iid) or image is None:
            parsed.problem(
                file,
                k,
                "annotations.image_id",
                f"annotation {aid!r} refers to unknown image id {iid!r}",
            )
            continue
        bad = [
            key
            for key, ok in (
                ("id", _is_int(aid)),
                ("category_id", _is_int(cid)),
                (
                    "bbox",
                    isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox),
                ),
            )
            if not ok
        ]
        area, crowd = _get(ann, "area"), ann.get("iscrowd", 0)
        if area is not None and not _is_num(area):
            bad.append("area")
        if crowd not in (0, 1) or isinstance(crowd, bool):
            bad.append("iscrowd")
        if bad:
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
        x, y, w, h = (float(v) for v in bbox)
        coords = (x, y, x + w, y + h)
        why = box_problem(coords, parsed.width[image], parsed.height[image])
        if why is not None:
            parsed.problem(file, k, "annotations.bbox", f"annotation {aid}: {why}", image=image)
        elif cid in cats:
            parsed.add_box(
                image,
                cats[cid],
                coords,
                w * h if area is None else float(area),
                iscrowd=int(crowd),
                source_id=aid,
            )


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
    _annotations(ann_items, parsed, by_id, cats, known)
    n_other = len(known) - len(cats)
    if n_other > 0:
        log.info("%s: %d categories not in the class list; their boxes are skipped", path, n_other)
    return parsed
