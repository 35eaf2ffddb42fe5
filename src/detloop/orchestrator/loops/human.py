"""Human labeling: import the labels people made for the queried images of a waiting run."""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import Any

import pyarrow as pa

from detloop.data.coco import parse_coco
from detloop.data.errors import DataError
from detloop.data.ids import image_id, relative_name, strip_extension
from detloop.data.io import read_json, write_json
from detloop.data.labels import box_rows, labels_from_boxes, next_box_id
from detloop.data.parsed import Parsed
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.journal import Journal, Phase

logger = logging.getLogger(__name__)

#: The first box id of human labels when the run has none yet: far above imported box ids.
FIRST_HUMAN_BOX_ID = 1_000_000_000


def _stem(path: str) -> str:
    """The base name of ``path`` without its extension (``/`` or ``\\`` separated)."""
    return strip_extension(posixpath.basename(path.replace("\\", "/")))


def _candidates(item: dict[str, Any], by_id: set[str], by_stem: dict[str, list[str]]) -> list[str]:
    """The queried images a COCO image item may be (see ``_match_images``)."""
    if item.get("detloop_id") in by_id:
        return [str(item["detloop_id"])]
    name = str(item.get("file_name", ""))
    exact = image_id("pool", name)
    return [exact] if exact in by_id else by_stem.get(_stem(name), [])


def _match_images(doc: dict[str, Any], queried: pa.Table, file: str) -> dict[int, str]:
    """Map each image item of a COCO document to a queried image id.

    An item matches by its ``detloop_id`` (files exported by detloop), else by ``file_name``:
    the image whose id is ``pool/<file_name without extension>``, else the queried image with
    the same base name (labeling tools often rewrite folders). Ambiguity is an error.
    """
    ids = queried["image_id"].to_pylist()
    by_id = set(ids)
    by_stem: dict[str, list[str]] = {}
    for iid, f in zip(ids, queried["file"].to_pylist(), strict=True):
        by_stem.setdefault(_stem(f), []).append(iid)
    items = doc.get("images")
    if not isinstance(items, list):
        raise DataError(file, None, "images", "a COCO file needs an 'images' list")
    out: dict[int, str] = {}
    problems: list[DataError] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(DataError(file, i, "images", "an image must be an object"))
            continue
        cands = _candidates(item, by_id, by_stem)
        if len(cands) == 1:
            out[i] = cands[0]
        else:
            what = "is not one of the queried images" if not cands else "matches several images"
            name = str(item.get("file_name", ""))
            problems.append(DataError(file, i, "images.file_name", f"{name!r} {what}"))
    if problems:
        raise DataError.many(problems)
    return out


def _normalised(
    doc: dict[str, Any], matched: dict[int, str], files: dict[str, str]
) -> dict[str, Any]:
    """The document with every file name replaced by the matched image's relative name."""
    images = [
        {**item, "file_name": relative_name(matched[i], files[matched[i]])}
        for i, item in enumerate(doc["images"])
    ]
    return {**doc, "images": images}


def _waiting_iteration(run: RunDir, journal: Journal) -> int:
    """The iteration whose ``wait_for_labels`` phase the run is in, else a DataError."""
    pos = journal.position
    if pos is None or pos.phase != Phase.WAIT_FOR_LABELS or pos.status != "started":
        where = "not started" if pos is None else f"{pos.phase} ({pos.status})"
        raise DataError(
            str(run.run_json), None, "journal", f"the run is not waiting for labels: {where}"
        )
    return pos.iteration


def _parse_labels(run: RunDir, file: Path, queried: pa.Table) -> Parsed:
    """``file`` read as COCO against the run's categories, its images matched to ``queried``.

    The file is staged with normalised file names (relative to the pool's images root) so the
    COCO reader yields the queried images' ids; every problem is reported at once.
    """
    doc = read_json(file)
    matched = _match_images(doc, queried, str(file))
    files = dict(zip(queried["image_id"].to_pylist(), queried["file"].to_pylist(), strict=True))
    staged = run.import_staging_file(file.stem)
    write_json(_normalised(doc, matched, files), staged)
    try:
        parsed = parse_coco(staged, None, run.read_categories()["name"].to_pylist())
    finally:
        staged.unlink(missing_ok=True)
    if parsed.problems:
        raise DataError.many([p.error for p in parsed.problems])
    parsed.image_ids = [image_id("pool", r) for r in parsed.rel]
    missing = sorted(set(queried["image_id"].to_pylist()) - set(parsed.image_ids))
    if missing:
        raise DataError(str(file), None, "images", f"no labels for queried images {missing[:5]}")
    return parsed


def _human_labels(parsed: Parsed, pool: PoolState, iteration: int) -> pa.Table:
    """The labels rows (source ``human``) of the boxes of ``parsed``, new box ids."""
    boxes = box_rows(
        [parsed.image_ids[i] for i in parsed.box_image],
        parsed.box_coords,
        parsed.box_class,
        first_box_id=next_box_id(pool.labels, empty=FIRST_HUMAN_BOX_ID),
        area=parsed.box_area,
        iscrowd=parsed.box_iscrowd,
        occluded=parsed.box_occluded,
        truncated=parsed.box_truncated,
        source_id=parsed.box_source_id,
    )
    return labels_from_boxes(boxes, source="human", iteration=iteration)


def import_labels(run: RunDir, file: Path) -> tuple[int, int]:
    """Validate human labels for the images a run is waiting on and store them.

    Returns:
        (images labeled, boxes imported). The run's journal completes ``wait_for_labels``, so
        ``detloop resume`` continues with training.

    Raises:
        DataError: the run is not waiting, or the file has problems (all listed).
    """
    journal = Journal(run)
    iteration = _waiting_iteration(run, journal)
    pool = PoolState.load(run)
    parsed = _parse_labels(run, file, pool.images_in("queried", split=None))
    labels = _human_labels(parsed, pool, iteration)
    labeled = sorted(set(parsed.image_ids))
    # Idempotent: labels of this iteration from an earlier, interrupted import are replaced.
    pool = pool.without_labels("human", iteration=iteration).with_labels(labels)
    pool.with_state(labeled, "labeled", iteration).save(run)
    n = labels.num_rows
    journal.complete(iteration, Phase.WAIT_FOR_LABELS, images=len(labeled), boxes=n)
    return len(labeled), n
