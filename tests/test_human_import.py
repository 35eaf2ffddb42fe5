"""``import_labels`` without Ray: a run waiting for labels gets the labels people made."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from detloop.data.errors import DataError
from detloop.data.pool import PoolState
from detloop.data.review_export import export_review
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.journal import Journal, Phase
from detloop.orchestrator.loops.human import FIRST_HUMAN_BOX_ID, import_labels


def _waiting(run: RunDir, n: int = 3) -> list[str]:
    """Mark the first ``n`` pool images queried in iteration 0 and wait for their labels."""
    pool = PoolState.load(run)
    ids = pool.ids("unlabeled")[:n]
    pool.with_state(ids, "queried", 0).save(run)
    run.write_meta({})
    Journal(run).start(0, Phase.WAIT_FOR_LABELS)
    return ids


def _answer(
    run: RunDir, ids: list[str], out: Path, image: Callable[[Any], dict[str, Any]] | None = None
) -> Path:
    """The query export with the ground-truth boxes as a person's answer; ``image`` gives
    changes to each image item (what a labeling tool rewrites)."""
    stem = run.query_stem(0)
    export_review(run, image_ids=ids, predictions=None, out_stem=stem)
    doc = json.loads(Path(f"{stem}.coco.json").read_text())
    by_id = {img["detloop_id"]: img["id"] for img in doc["images"]}
    gt = run.read_gt().to_pandas()
    doc["annotations"] = [
        {"id": k + 1, "image_id": by_id[r.image_id], "category_id": int(r.class_id) + 1,
         "bbox": [r.x1, r.y1, r.x2 - r.x1, r.y2 - r.y1], "area": r.area, "iscrowd": 0}
        for k, r in enumerate(gt[gt["image_id"].isin(ids)].itertuples())
    ]  # fmt: skip
    for img in doc["images"]:
        img.update(image(img) if image is not None else {})
    out.write_text(json.dumps(doc))
    return out


def test_import_labels_stores_human_labels_and_completes_the_wait(
    digits_tiny_run: RunDir, tmp_path: Path
) -> None:
    run = digits_tiny_run
    ids = _waiting(run)
    n_images, n_boxes = import_labels(run, _answer(run, ids, tmp_path / "labels.json"))
    gt = run.read_gt()
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=pa.array(ids)))
    assert (n_images, n_boxes) == (3, gt.num_rows)
    labels = run.read_labels()
    first = FIRST_HUMAN_BOX_ID
    assert labels["box_id"].to_pylist() == list(range(first, first + n_boxes))
    assert set(labels["source"].to_pylist()) == {"human"}  # a person, not the simulated oracle
    assert set(labels["iteration"].to_pylist()) == {0}
    assert sorted(labels["image_id"].to_pylist()) == sorted(gt["image_id"].to_pylist())
    assert PoolState.load(run).ids("labeled") == ids
    assert Journal(run).position.as_dict() == {  # type: ignore[union-attr]
        "iteration": 0,
        "phase": "wait_for_labels",
        "status": "completed",
    }
    assert not list(run.exports.glob(".import_*"))  # the staged copy is removed


def test_an_interrupted_import_is_replaced_not_doubled(
    digits_tiny_run: RunDir, tmp_path: Path
) -> None:
    run = digits_tiny_run
    ids = _waiting(run)
    answer = _answer(run, ids, tmp_path / "labels.json")
    _, n_boxes = import_labels(run, answer)
    # as if the first import died after writing the labels, before the images and the journal
    PoolState.load(run).with_state(ids, "queried", 0).save(run)
    Journal(run).start(0, Phase.WAIT_FOR_LABELS)
    assert import_labels(run, answer) == (3, n_boxes)
    labels = run.read_labels()
    assert labels.num_rows == n_boxes
    assert min(labels["box_id"].to_pylist()) == FIRST_HUMAN_BOX_ID + n_boxes


def test_images_match_by_file_name_and_base_name(digits_tiny_run: RunDir, tmp_path: Path) -> None:
    run = digits_tiny_run
    ids = _waiting(run, 2)

    def rename(img: dict[str, Any]) -> dict[str, Any]:
        base = Path(img["file_name"]).name
        # one by its name relative to the pool's root, one moved by a labeling tool
        name = base if img["detloop_id"] == ids[0] else f"upload/123/{base}"
        return {"file_name": name, "detloop_id": None}

    answer = _answer(run, ids, tmp_path / "labels.json", image=rename)
    assert import_labels(run, answer)[0] == 2


def test_problems_are_reported(digits_tiny_run: RunDir, tmp_path: Path) -> None:
    run = digits_tiny_run
    ids = _waiting(run, 2)
    stranger = _answer(run, ids, tmp_path / "a.json",
                       image=lambda img: {"file_name": "nope.png", "detloop_id": None})  # fmt: skip
    with pytest.raises(DataError, match="is not one of the queried images"):
        import_labels(run, stranger)
    one = json.loads(_answer(run, ids, tmp_path / "b.json").read_text())
    one["images"] = one["images"][:1]
    one["annotations"] = [a for a in one["annotations"] if a["image_id"] == one["images"][0]["id"]]
    (tmp_path / "b.json").write_text(json.dumps(one))
    with pytest.raises(DataError, match="no labels for queried images"):
        import_labels(run, tmp_path / "b.json")
    assert run.read_labels().num_rows == 0  # nothing stored
