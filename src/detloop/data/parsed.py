"""The in-memory form of an import source: images, boxes, categories and problems, as columns.

Format readers (``coco``, ``kitti``, ``folder``) fill a ``Parsed``; ``detloop.data.importer``
checks files, decodes images and merges it into a run.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detloop.data.errors import DataError

BOX_TOLERANCE = 1.0  # pixels a box may extend beyond the image border


@dataclass(frozen=True)
class Problem:
    """One problem of an import; ``image`` is the index of the image it concerns, if any.

    A fatal problem (malformed file, conflicting categories) fails the import even when
    lenient; a non-fatal one quarantines its image, or skips its item when no image is known.
    """

    error: DataError
    image: int | None = None
    fatal: bool = False


@dataclass
class Parsed:
    """A source read into columns; class ids index ``categories`` (name, source id)."""

    source: str
    images_root: Path
    labeled: bool
    categories: list[tuple[str, int | None]] = field(default_factory=list)
    rel: list[str] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    height: list[int] = field(default_factory=list)
    source_id: list[str | None] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    phash: list[int | None] = field(default_factory=list)
    box_image: list[int] = field(default_factory=list)
    box_class: list[int] = field(default_factory=list)
    box_coords: list[tuple[float, float, float, float]] = field(default_factory=list)
    box_area: list[float] = field(default_factory=list)
    box_iscrowd: list[int] = field(default_factory=list)
    box_occluded: list[int] = field(default_factory=list)
    box_truncated: list[int] = field(default_factory=list)
    box_source_id: list[int | None] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)  # not to decode: absent or unreadable
    dropped: set[int] = field(default_factory=set)  # duplicates left out of the run

    @property
    def n_images(self) -> int:
        return len(self.rel)

    def add_image(self, rel: str, width: int, height: int, source_id: str | None) -> int:
        """Append an image (``rel``: path relative to the images root); returns its index."""
        self.rel.append(rel)
        self.width.append(width)
        self.height.append(height)
        self.source_id.append(source_id)
        return len(self.rel) - 1

    def add_box(
        self,
        image: int,
        class_id: int,
        coords: tuple[float, float, float, float],
        area: float,
        *,
        iscrowd: int = 0,
        occluded: int = -1,
        truncated: int = -1,
        source_id: int | None = None,
    ) -> None:
        """Append a ground-truth box (``coords`` as absolute x1, y1, x2, y2)."""
        self.box_image.append(image)
        self.box_class.append(class_id)
        self.box_coords.append(coords)
        self.box_area.append(area)
        self.box_iscrowd.append(iscrowd)
        self.box_occluded.append(occluded)
        self.box_truncated.append(truncated)
        self.box_source_id.append(source_id)

    def problem(
        self,
        file: str,
        row: int | None,
        column: str | None,
        text: str,
        *,
        image: int | None = None,
        fatal: bool = False,
    ) -> None:
        """Record a problem (see ``Problem``)."""
        self.problems.append(Problem(DataError(file, row, column, text), image, fatal))


def box_problem(coords: tuple[float, float, float, float], width: int, height: int) -> str | None:
    """Why a box is invalid in a ``width`` × ``height`` image (None when it is valid).

    Unknown image sizes (0) skip the border check.
    """
    x1, y1, x2, y2 = coords
    if not all(np.isfinite(coords)):
        return f"box has a non-finite coordinate {list(coords)}"
    if x2 <= x1 or y2 <= y1:
        return f"zero-area or negative box (width {x2 - x1:g}, height {y2 - y1:g})"
    if width > 0 and height > 0:
        t = BOX_TOLERANCE
        if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
            return (
                f"box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] (x1, y1, x2, y2) lies outside the "
                f"{width}x{height} image by more than {t:g} px"
            )
    return None


def normalize_rel(name: str) -> str | None:
    """A relative POSIX path for a file name, or None when it escapes its root."""
    if (
        name
        and not name.startswith((".", "/"))
        and not name.endswith("/")
        and "\\" not in name
        and "//" not in name
        and "/." not in name
    ):
        return name  # already normal (the common case); normpath is slow on millions of names
    rel = posixpath.normpath(name.replace("\\", "/"))
    if rel.startswith("/") or rel == "." or rel == ".." or rel.startswith("../"):
        return None
    return rel
