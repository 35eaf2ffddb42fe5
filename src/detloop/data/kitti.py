"""KITTI 2D object label reader (``label_2/*.txt``, one object per line).

A line is ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]``; the box
is already absolute ``x1, y1, x2, y2`` pixels. ``DontCare`` objects are dropped, and so are types
not in the class list (matched case-insensitively; e.g. ``Misc``).

Attributes kept as int8 (−1 unknown): ``occluded`` as given (0 fully visible, 1 partly
occluded, 2 largely occluded, 3 unknown in KITTI's own coding), ``truncated`` as a percentage
``round(100 * truncated)`` in 0..100 (KITTI gives a float in [0, 1]); values outside these
ranges become −1. ``source_id`` of a box is its 0-based line number in the label file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from detloop.data.errors import DataError
from detloop.data.images import IMAGE_EXTENSIONS, header_size
from detloop.data.parsed import Parsed, box_problem

log = logging.getLogger(__name__)

KITTI_CLASSES = ("car", "van", "truck", "pedestrian", "person_sitting", "cyclist", "tram")
_N_FIELDS = (15, 16)


def _find_image(stem: str, names: dict[str, str]) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        if stem + ext in names:
            return names[stem + ext]
    return None


def _default_images(labels: Path) -> Path:
    guess = labels.parent / "image_2"
    if guess.is_dir():
        return guess
    raise DataError(
        str(labels),
        None,
        "images",
        f"no images folder given (--images DIR) and no sibling 'image_2' folder at {guess}",
    )


def _attrs(truncated: float, occluded: float) -> tuple[int, int]:
    trunc = round(100 * truncated) if 0 <= truncated <= 1 else -1
    occl = int(occluded) if occluded in (0, 1, 2, 3) else -1
    return occl, trunc


def _parse_file(path: Path, image: int, parsed: Parsed, classes: dict[str, int]) -> None:
    file = str(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        parsed.problem(file, None, None, f"cannot read label file: {exc}", image=image)
        return
    for n, line in enumerate(lines):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in _N_FIELDS:
            parsed.problem(
                file, n, None, f"expected 15 or 16 fields, got {len(fields)}", image=image
            )
            continue
        kind = fields[0].lower()
        if kind == "dontcare":
            continue
        try:
            trunc, occl, x1, y1, x2, y2 = (float(fields[i]) for i in (1, 2, 4, 5, 6, 7))
        except ValueError:
            parsed.problem(file, n, "truncated..y2", "fields 2-8 must be numbers", image=image)
            continue
        if kind not in classes:
            continue
        coords = (x1, y1, x2, y2)
        why = box_problem(coords, parsed.width[image], parsed.height[image])
        if why is not None:
            parsed.problem(file, n, "bbox", why, image=image)
            continue
        occluded, truncated = _attrs(trunc, occl) if math.isfinite(trunc + occl) else (-1, -1)
        parsed.add_box(
            image,
            classes[kind],
            coords,
            (x2 - x1) * (y2 - y1),
            occluded=occluded,
            truncated=truncated,
            source_id=n,
        )


def parse_kitti(
    labels: Path, images: Path | None = None, classes: Sequence[str] | None = None
) -> Parsed:
    """Read a KITTI label folder; the image of ``X.txt`` is ``X.png`` (or .jpg, ...).

    Args:
        labels: the folder of ``.txt`` label files.
        images: the images folder (default: the sibling ``image_2``).
        classes: class names in class-id order (default: the 7 KITTI classes).

    Raises:
        DataError: the label folder is missing or holds no label files.
    """
    if not labels.is_dir():
        raise DataError(str(labels), None, None, "KITTI label folder does not exist")
    root = (images if images is not None else _default_images(labels)).resolve()
    names = list(classes) if classes else list(KITTI_CLASSES)
    parsed = Parsed(
        source=str(labels), images_root=root, labeled=True, categories=[(c, None) for c in names]
    )
    class_index = {c.lower(): k for k, c in enumerate(names)}
    label_files = sorted(p for p in labels.iterdir() if p.suffix == ".txt")
    if not label_files:
        raise DataError(str(labels), None, None, "no .txt label files in the folder")
    present = {p.name: p.name for p in root.iterdir()} if root.is_dir() else {}
    for lf in label_files:
        rel = _find_image(lf.stem, present) or f"{lf.stem}.png"
        index = parsed.add_image(rel, 0, 0, lf.stem)
        if rel in present:
            try:
                parsed.width[index], parsed.height[index] = header_size(root / rel)
            except OSError as exc:
                parsed.problem(
                    str(root / rel), None, None, f"cannot read image: {exc}", image=index
                )
                parsed.missing.add(index)
        _parse_file(lf, index, parsed, class_index)
    return parsed
