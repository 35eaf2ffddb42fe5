"""Import of a parsed source (COCO, KITTI, image folder) into a run's pool tables.

An import runs in passes, each reporting every problem it finds:

1. ``parse_*`` (format modules) reads the source into a ``Parsed`` value, checking keys, types,
   boxes and categories;
2. ``check_files`` assigns image ids (``<split>/<relative path without extension>``), finds
   duplicates and checks that every file exists (one directory listing per folder);
3. ``decode_pass`` decodes every image (catching corrupt and truncated files) and computes the
   perceptual hash of pool images; it is separate so its cost can be measured on its own;
4. ``commit`` merges categories, images and boxes into the run's tables and writes them.

Nothing is written unless every check passed (or, with ``lenient``, the bad images were
quarantined with state ``examine`` and a ``reason``): a failed import changes nothing stored.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data import schema
from detloop.data.coco import parse_coco
from detloop.data.errors import DataError
from detloop.data.folder import parse_folder
from detloop.data.ids import image_id
from detloop.data.images import HashMethod, decode_images, missing_files
from detloop.data.io import write_table
from detloop.data.kitti import parse_kitti
from detloop.data.labels import next_box_id
from detloop.data.merge import ImportReport, gt_rows, image_rows, merge_categories
from detloop.data.parsed import Parsed, Problem
from detloop.data.rundir import RunDir

log = logging.getLogger(__name__)

SourceFormat = Literal["coco", "kitti", "folder"]


def check_files(parsed: Parsed, split: str) -> None:
    """Assign image ids and files, report duplicate ids or files, and missing files.

    Of several images mapping to one id (the same file, or ``a.png`` and ``a.jpg``) the first
    is kept and the others dropped; the kept one is reported (and quarantined when lenient).
    """
    root = str(parsed.images_root)
    parsed.files = [os.path.join(root, r) for r in parsed.rel]
    parsed.image_ids = [image_id(split, r) for r in parsed.rel]
    parsed.phash = [None] * parsed.n_images
    first: dict[str, int] = {}
    for i, iid in enumerate(parsed.image_ids):
        j = first.setdefault(iid, i)
        if j != i:
            parsed.dropped.add(i)
            parsed.problem(
                parsed.source,
                i,
                "file",
                f"duplicate image: {parsed.rel[i]!r} gives image id {iid!r} like "
                f"{parsed.rel[j]!r} (item {j}); only the first is kept",
                image=j,
            )
    missing = missing_files(parsed.files)
    for i in np.flatnonzero(missing).tolist():
        if i in parsed.dropped:
            continue
        parsed.missing.add(i)
        parsed.problem(
            parsed.source, i, "file", f"image file not found: {parsed.files[i]}", image=i
        )
    if parsed.n_images and missing.mean() > 0.5:
        log.warning(
            "%s: %d of %d image files not found under %s; pass --images DIR (data.<split>.images)"
            " if the images live elsewhere",
            parsed.source,
            int(missing.sum()),
            parsed.n_images,
            root,
        )


def decode_pass(
    parsed: Parsed,
    with_hash: bool,
    *,
    method: HashMethod = "p",
    workers: int | None = None,
) -> None:
    """Decode every present image, check its size, and hash it when ``with_hash``.

    Sizes unknown before (0) are filled in; a size that differs from the source's is reported.
    """
    todo = [i for i in range(parsed.n_images) if i not in parsed.missing | parsed.dropped]
    results = decode_images(
        [Path(parsed.files[i]) for i in todo],
        [with_hash] * len(todo),
        method=method,
        workers=workers,
    )
    for i, res in zip(todo, results, strict=True):
        if res.error is not None:
            parsed.problem(parsed.files[i], None, None, res.error, image=i)
            continue
        w, h = parsed.width[i], parsed.height[i]
        if w <= 0 or h <= 0:
            parsed.width[i], parsed.height[i] = res.width, res.height
        elif (w, h) != (res.width, res.height):
            parsed.problem(
                parsed.files[i],
                None,
                None,
                f"image is {res.width}x{res.height} but the source says {w}x{h}",
                image=i,
            )
        parsed.phash[i] = res.phash


def quarantine_reasons(problems: list[Problem]) -> dict[int, str]:
    """The reason text of every image that has problems."""
    reasons: dict[int, list[str]] = defaultdict(list)
    for p in problems:
        if p.image is not None:
            col = f"{p.error.column}: " if p.error.column else ""
            reasons[p.image].append(col + p.error.problem)
    return {i: "; ".join(r) for i, r in reasons.items()}


def _run_problems(
    images: pa.Table, categories: pa.Table, parsed: Parsed
) -> tuple[list[Problem], pa.Table, np.ndarray, list[str]]:
    """Problems between the source and what the run holds; the merged categories."""
    problems: list[Problem] = []
    known = set(images["image_id"].to_pylist())
    clash = [iid for iid in parsed.image_ids if iid in known]
    if clash:
        text = f"{len(clash)} image ids are already in the run (imported before?), e.g. {clash[:3]}"
        problems.append(Problem(DataError(parsed.source, None, "file", text), None, fatal=True))
    try:
        merged, mapping, added = merge_categories(categories, parsed)
    except DataError as exc:
        problems += [Problem(e, None, fatal=True) for e in exc.problems]
        merged, mapping, added = categories, np.zeros(0, np.int32), []
    return problems, merged, mapping, added


def _write(run: RunDir, images: pa.Table, gt: pa.Table, categories: pa.Table) -> None:
    """Validate all three tables first, then write them; images last, so an import becomes
    visible only once everything else is stored."""
    images = schema.validate_table(images, schema.IMAGES, str(run.images_file))
    gt = schema.validate_table(gt, schema.GT, str(run.gt_file))
    categories = schema.validate_table(categories, schema.CATEGORIES, str(run.categories_file))
    write_table(categories, schema.CATEGORIES, run.categories_file, validate=False)
    write_table(gt, schema.GT, run.gt_file, validate=False)
    write_table(images, schema.IMAGES, run.images_file, validate=False)


def commit(run: RunDir, parsed: Parsed, split: str, *, lenient: bool = False) -> ImportReport:
    """Merge ``parsed`` into the run's images, gt and categories tables and write them.

    Raises:
        DataError: every problem at once, when any is fatal or ``lenient`` is off; nothing is
            written then.
    """
    if split not in schema.SPLITS:
        text = f"unknown split {split!r}; one of {', '.join(schema.SPLITS)}"
        raise DataError(parsed.source, None, "split", text)
    images, gt = run.read_images(), run.read_gt()
    extra, categories, mapping, added = _run_problems(images, run.read_categories(), parsed)
    problems = parsed.problems + extra
    if problems and (not lenient or any(p.fatal for p in problems)):
        raise DataError.many([p.error for p in problems])
    for p in problems:
        if p.image is None:
            log.warning("skipped: %s", p.error.describe())
    reasons = quarantine_reasons(problems)
    keep = np.ones(parsed.n_images, dtype=bool)
    keep[list(parsed.dropped)] = False
    first_box = next_box_id(gt)
    new_images = schema.validate_table(image_rows(parsed, keep, split, reasons), schema.IMAGES)
    new_gt = schema.validate_table(gt_rows(parsed, keep, mapping, first_box), schema.GT)
    # gt rows whose image is not in the images table can only be left by an import that was
    # killed between its writes; they are dropped so a repeated import does not double them.
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=images["image_id"]))
    _write(run, pa.concat_tables([images, new_images]), pa.concat_tables([gt, new_gt]), categories)
    report = ImportReport(
        split=split,
        n_images=new_images.num_rows,
        n_boxes=new_gt.num_rows,
        n_quarantined=sum(1 for i in reasons if keep[i]),
        n_skipped=len(parsed.dropped) + sum(p.image is None for p in problems),
        categories_added=tuple(added),
        problems=tuple(p.error for p in problems),
    )
    # not logged here: the caller shows the report (``detloop import`` prints it, the loop shows
    # it as a progress line), and a log line too would show every import twice
    return report


def parse_source(
    fmt: SourceFormat,
    source: Path,
    *,
    images: Path | None = None,
    classes: Sequence[str] | None = None,
    known_classes: Sequence[str] = (),
) -> Parsed:
    """Read a COCO file, a KITTI label folder or an image folder into a ``Parsed`` value."""
    if fmt == "coco":
        return parse_coco(source, images, classes)
    if fmt == "kitti":
        return parse_kitti(source, images, classes or known_classes or None)
    if fmt == "folder":
        return parse_folder(source, images, classes)
    raise DataError(
        str(source), None, "format", f"unknown format {fmt!r}; one of coco, kitti, folder"
    )


def import_source(
    run: RunDir,
    fmt: SourceFormat,
    source: str | os.PathLike[str],
    split: str,
    *,
    images: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    lenient: bool = False,
    decode: bool = True,
    hash_pool: bool = True,
    hash_method: HashMethod = "p",
    workers: int | None = None,
) -> ImportReport:
    """Import one split of a dataset into ``run`` (all passes; see the module docstring).

    Args:
        run: the run directory (its pool tables are created when absent).
        fmt: ``coco``, ``kitti`` or ``folder``.
        source: the COCO JSON file, the KITTI label folder, or the image folder.
        split: ``pool``, ``val`` or ``test``.
        images: the images root (default: the COCO file's folder, KITTI's sibling ``image_2``,
            the folder itself).
        classes: class names to keep, in class-id order (other classes are dropped).
        lenient: quarantine bad images (state ``examine``) instead of failing.
        decode: decode every image (and hash pool images); off only for benchmarks or when the
            files were checked before.
        hash_pool: compute the perceptual hash of pool images while decoding (for pruning;
            about 1.4 ms an image at 128 px, two thirds of the decoding pass); the loop skips it
            when its strategy never prunes.
        hash_method: ``p`` DCT perceptual hash, ``w`` wavelet hash (``al.hash_method``, §9.5).
        workers: decoding processes (1: in this process).

    Raises:
        DataError: listing every problem (file and item named); nothing is written then.
    """
    known = run.read_categories()["name"].to_pylist()
    parsed = parse_source(
        fmt,
        Path(source),
        images=None if images is None else Path(images),
        classes=classes,
        known_classes=known,
    )
    check_files(parsed, split)
    if decode:
        with_hash = hash_pool and split == "pool"
        decode_pass(parsed, with_hash=with_hash, method=hash_method, workers=workers)
    return commit(run, parsed, split, lenient=lenient)
