"""Human labeling: import the labels people made for the queried images of a waiting run."""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.coco import parse_coco
from detloop.data.errors import DataError
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir
from detloop.orchestrator.journal import Journal, Phase

logger = logging.getLogger(__name__)


def _stem(path: str) -> str:
    base = posixpath.basename(path.replace("\\", "/"))
    return base.rsplit(".", 1)[0] if "." in base else base


def _match_images(rel: list[str], queried: pa.Table, file: str) -> list[str]:
    """Map each labeled image of the file to a queried image id.

    A ``file_name`` matches the image whose id is ``pool/<file_name without extension>``
    (files exported by detloop), else the queried image with the same base name (files
    re-exported by labeling tools, which often rewrite folders); ambiguity is an error.
    """
    ids = queried["image_id"].to_pylist()
    by_id = set(ids)
    by_stem: dict[str, list[str]] = {}
    for iid, f in zip(ids, queried["file"].to_pylist(), strict=True):
        by_stem.setdefault(_stem(f), []).append(iid)
    out: list[str] = []
    problems: list[DataError] = []
    for i, name in enumerate(rel):
        exact = f"pool/{name.rsplit('.', 1)[0]}"
        if exact in by_id:
            out.append(exact)
            continue
        cands = by_stem.get(_stem(name), [])
        if len(cands) == 1:
            out.append(cands[0])
        else:
            what = "is not one of the queried images" if not cands else "matches several images"
            problems.append(DataError(file, i, "file_name", f"{name!r} {what}"))
            out.append("")
    if problems:
        raise DataError.many(problems)
    return out


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
    parsed = parse_coco(file, None, categories["name"].to_pylist())
    fatal = [p.error for p in parsed.problems]
    if fatal:
        raise DataError.many(fatal)
    ids = _match_images(parsed.rel, queried, str(file))
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
