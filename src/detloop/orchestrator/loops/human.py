"""Human labeling: import the labels people made for the queried images of a waiting run."""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.coco import parse_coco
from detloop.data.errors import DataError
from detloop.data.io import read_json, write_json
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.journal import Journal, Phase

logger = logging.getLogger(__name__)


def _stem(path: str) -> str:
    base = posixpath.basename(path.replace("\\", "/"))
    return base.rsplit(".", 1)[0] if "." in base else base


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
    out: dict[int, str] = {}
    problems: list[DataError] = []
    items = doc.get("images")
    if not isinstance(items, list):
        raise DataError(file, None, "images", "a COCO file needs an 'images' list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(DataError(file, i, "images", "an image must be an object"))
            continue
        if item.get("detloop_id") in by_id:
            out[i] = str(item["detloop_id"])
            continue
        name = str(item.get("file_name", ""))
        exact = f"pool/{name.rsplit('.', 1)[0]}"
        cands = [exact] if exact in by_id else by_stem.get(_stem(name), [])
        if len(cands) == 1:
            out[i] = cands[0]
        else:
            what = "is not one of the queried images" if not cands else "matches several images"
            problems.append(DataError(file, i, "images.file_name", f"{name!r} {what}"))
    if problems:
        raise DataError.many(problems)
    return out


def _normalised(
    doc: dict[str, Any], matched: dict[int, str], files: dict[str, str]
) -> dict[str, Any]:
    """The document with every file name replaced by the matched image's relative name."""
    images = []
    for i, item in enumerate(doc["images"]):
        iid = matched[i]
        ext = posixpath.splitext(files[iid])[1]
        images.append({**item, "file_name": iid.split("/", 1)[1] + ext})
    return {**doc, "images": images}


def import_labels(run: RunDir, file: Path) -> tuple[int, int]:
    """Validate human labels for the images a run is waiting on and store them.

    Returns:
        (images labeled, boxes imported). The run's journal completes ``wait_for_labels``, so
        ``detloop resume`` continues with training.

    Raises:
        DataError: the run is not waiting, or the file has problems (all listed).
    """
    journal = Journal(run)
    pos = journal.position
    if pos is None or pos.phase != Phase.WAIT_FOR_LABELS or pos.status != "started":
        where = "not started" if pos is None else f"{pos.phase} ({pos.status})"
        raise DataError(
            str(run.run_json), None, "journal", f"the run is not waiting for labels: {where}"
        )
    pool = PoolState.load(run)
    queried = pool.images.filter(pc.equal(pool.images["state"], "queried"))
    categories = run.read_categories()
    matched = _match_images(read_json(file), queried, str(file))
    files = dict(zip(queried["image_id"].to_pylist(), queried["file"].to_pylist(), strict=True))
    staged = run.exports / f".import_{file.stem}.json"
    write_json(_normalised(read_json(file), matched, files), staged)
    try:
        parsed = parse_coco(staged, None, categories["name"].to_pylist())
    finally:
        staged.unlink(missing_ok=True)
    problems = [p.error for p in parsed.problems]
    if problems:
        raise DataError.many(problems)
    ids = [f"pool/{posixpath.splitext(r)[0]}" for r in parsed.rel]
    labeled = sorted(set(ids))
    missing = sorted(set(queried["image_id"].to_pylist()) - set(labeled))
    if missing:
        raise DataError(str(file), None, "images", f"no labels for queried images {missing[:5]}")
    boxes = np.asarray(parsed.box_coords, dtype=np.float64).reshape(-1, 4)
    n = len(parsed.box_image)
    labels = pa.table(
        {
            "image_id": pa.array([ids[i] for i in parsed.box_image], pa.string()),
            "box_id": pa.array(np.arange(n, dtype=np.int64) + _next_box_id(pool)),
            "class_id": pa.array(np.asarray(parsed.box_class, dtype=np.int32)),
            "x1": boxes[:, 0],
            "y1": boxes[:, 1],
            "x2": boxes[:, 2],
            "y2": boxes[:, 3],
            "area": pa.array(np.asarray(parsed.box_area, dtype=np.float64)),
            "iscrowd": pa.array(np.asarray(parsed.box_iscrowd, dtype=np.int8)),
            "occluded": pa.array(np.asarray(parsed.box_occluded, dtype=np.int8)),
            "truncated": pa.array(np.asarray(parsed.box_truncated, dtype=np.int8)),
            "source_id": pa.array(parsed.box_source_id, pa.int64()),
            "source": pa.array(["oracle"] * n, pa.string()),
            "weight": pa.array(np.ones(n, dtype=np.float32)),
            "iteration": pa.array([pos.iteration] * n, pa.int32()),
        }
    )
    # Idempotent: labels of this iteration from an earlier, interrupted import are replaced.
    stale = pc.and_(
        pc.equal(pool.labels["source"], "oracle"), pc.equal(pool.labels["iteration"], pos.iteration)
    )
    pool = PoolState(pool.images, pool.labels.filter(pc.invert(pc.fill_null(stale, False))))
    pool = pool.with_labels(labels).with_state(labeled, "labeled", pos.iteration)
    pool.save(run)
    journal.complete(pos.iteration, Phase.WAIT_FOR_LABELS, images=len(labeled), boxes=n)
    return len(labeled), n


def _next_box_id(pool: PoolState) -> int:
    if pool.labels.num_rows == 0:
        return 1_000_000_000
    return int(pc.max(pool.labels["box_id"]).as_py()) + 1
