"""Image-folder reader: unlabeled images, found recursively (hidden entries skipped)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detloop.data.errors import DataError
from detloop.data.images import find_images, header_size
from detloop.data.parsed import Parsed


def parse_folder(
    folder: Path, images: Path | None = None, classes: Sequence[str] | None = None
) -> Parsed:
    """Read every image under ``folder`` (no boxes).

    Args:
        folder: the folder to scan.
        images: the root image ids are relative to (default: ``folder``); must contain it.
        classes: class names to register in the run (categories with ids 1..n), optional.

    Raises:
        DataError: the folder does not exist or holds no images.
    """
    if not folder.is_dir():
        raise DataError(str(folder), None, None, "image folder does not exist")
    folder = folder.resolve()
    root = folder if images is None else images.resolve()
    if not folder.is_relative_to(root):
        raise DataError(str(folder), None, "images", f"folder is not inside the images root {root}")
    parsed = Parsed(
        source=str(folder),
        images_root=root,
        labeled=False,
        categories=[(c, None) for c in classes or ()],
    )
    files = find_images(folder)
    if not files:
        raise DataError(str(folder), None, None, "no image files found")
    for path in files:
        index = parsed.add_image(path.relative_to(root).as_posix(), 0, 0, None)
        try:
            parsed.width[index], parsed.height[index] = header_size(path)
        except OSError as exc:
            parsed.problem(str(path), None, None, f"cannot read image: {exc}", image=index)
            parsed.missing.add(index)
    return parsed
