"""Shared helpers of the learner tests: digits-det tables built straight from the COCO files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from detloop.data.digits import make_digits


def digits_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's digits-det tiny folder (the shared ``digits_tiny`` fixture when present)."""
    try:
        root = request.getfixturevalue("digits_tiny")
        return Path(root)
    except pytest.FixtureLookupError:
        root = tmp_path_factory.mktemp("digits_tiny_learners")
        make_digits(root, "tiny", seed=0)
        return root


def split_tables(root: Path, split: str, limit: int | None = None) -> tuple[pa.Table, pa.Table]:
    """(images, labels) of one split: absolute files, xyxy boxes, 0-based classes, weight 1."""
    doc = json.loads((root / f"{split}.json").read_text())
    images = doc["images"][:limit] if limit else doc["images"]
    keep = {im["id"]: f"{split}/{Path(im['file_name']).with_suffix('')}" for im in images}
    img_rows = [
        {
            "image_id": keep[im["id"]],
            "file": str(root / "images" / split / im["file_name"]),
            "width": im["width"],
            "height": im["height"],
        }
        for im in images
    ]
    lab_rows = []
    for k, ann in enumerate(doc["annotations"]):
        if ann["image_id"] not in keep:
            continue
        x, y, w, h = ann["bbox"]
        lab_rows.append(
            {
                "image_id": keep[ann["image_id"]],
                "box_id": k,
                "class_id": ann["category_id"] - 1,
                "x1": float(x),
                "y1": float(y),
                "x2": float(x + w),
                "y2": float(y + h),
                "area": float(w * h),
                "iscrowd": 0,
                "occluded": -1,
                "truncated": -1,
                "weight": 1.0,
            }
        )
    images_t = pa.Table.from_pylist(img_rows)
    images_t = images_t.set_column(2, "width", images_t.column("width").cast(pa.int32()))
    images_t = images_t.set_column(3, "height", images_t.column("height").cast(pa.int32()))
    return images_t, pa.Table.from_pylist(lab_rows)
