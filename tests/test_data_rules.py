"""The shared rules of ``data`` and ``seeding``, each with its one home: image ids, box and
labels tables, the next box id, the score floor, the stale-label filter, COCO id policies,
run-directory paths, derived generators."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from detloop import seeding
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.export import coco_document
from detloop.data.ids import extension, image_id, relative_name, strip_extension
from detloop.data.labels import box_rows, labels_from_boxes, next_box_id
from detloop.data.min_score import DEFAULT_MIN_SCORE, resolve_min_score
from detloop.data.pool import PoolState
from detloop.data.rundir import RunsRoot, is_checkpoint, iteration_of


# ---- image ids -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rel", "stripped"),
    [
        ("a.png", "a"),
        ("sub/a.b.jpg", "sub/a.b"),
        ("v1.2/a", "v1.2/a"),  # a dot in a folder is not an extension
        ("sub/.hidden", "sub/.hidden"),  # nor the leading dot of a base name
        ("noext", "noext"),
    ],
)
def test_strip_extension(rel: str, stripped: str) -> None:
    assert strip_extension(rel) == stripped
    assert stripped + extension(rel) == rel


def test_image_id_and_its_inverse() -> None:
    assert image_id("val", "sub/a.b.jpg") == "val/sub/a.b"
    for rel in ("a.png", "sub/a.b.jpg", "v1.2/a", "sub/.hidden"):
        iid = image_id("pool", rel)
        assert relative_name(iid, f"/data/pool/{rel}") == rel
        assert image_id("pool", relative_name(iid, f"/data/pool/{rel}")) == iid


# ---- box and labels tables -------------------------------------------------------------------
def test_next_box_id() -> None:
    empty = schema.LABELS.empty()
    assert next_box_id(empty) == 0
    assert next_box_id(empty, empty=1_000) == 1_000
    boxes = box_rows(["a", "a"], [[0, 0, 1, 1], [0, 0, 2, 2]], [0, 1], first_box_id=7)
    assert next_box_id(boxes) == 9
    assert next_box_id(boxes, box_rows(["b"], [[0, 0, 1, 1]], [0], first_box_id=20)) == 21


def test_box_rows_defaults_are_the_gt_schema() -> None:
    boxes = box_rows(["a", "b"], [[1, 2, 4, 6], [0, 0, 2, 2]], [3, 0], first_box_id=5)
    gt = schema.validate_table(boxes, schema.GT)
    assert gt.schema == schema.GT.schema
    assert gt["box_id"].to_pylist() == [5, 6]
    assert gt["area"].to_pylist() == [12.0, 4.0]
    assert gt["iscrowd"].to_pylist() == [0, 0]
    assert gt["occluded"].to_pylist() == gt["truncated"].to_pylist() == [-1, -1]
    assert gt["source_id"].to_pylist() == [None, None]
    given = box_rows(["a"], [[0, 0, 1, 1]], [0], box_ids=[42], area=[9.0], iscrowd=[1],
                     source_id=[17])  # fmt: skip
    assert given.to_pylist()[0] == {
        "image_id": "a", "box_id": 42, "class_id": 0, "x1": 0.0, "y1": 0.0, "x2": 1.0,
        "y2": 1.0, "area": 9.0, "iscrowd": 1, "occluded": -1, "truncated": -1, "source_id": 17,
    }  # fmt: skip


def test_labels_from_boxes() -> None:
    boxes = box_rows(["a", "b"], [[1, 2, 4, 6], [0, 0, 2, 2]], [3, 0])
    labels = labels_from_boxes(boxes, source="auto", iteration=2)
    assert labels.schema == schema.LABELS.schema
    assert labels["source"].to_pylist() == ["auto", "auto"]
    assert labels["weight"].to_pylist() == [1.0, 1.0]
    assert labels["iteration"].to_pylist() == [2, 2]
    weighted = labels_from_boxes(boxes, source="pseudo", iteration=None, weight=[0.5, 0.25])
    assert weighted["weight"].to_pylist() == [0.5, 0.25]
    assert weighted["iteration"].to_pylist() == [None, None]
    with pytest.raises(DataError, match="source"):
        labels_from_boxes(boxes, source="nobody", iteration=0)


# ---- the score floor -------------------------------------------------------------------------
def test_min_score_rule() -> None:
    assert resolve_min_score() == DEFAULT_MIN_SCORE == 0.4
    assert resolve_min_score(None, 0.3, mean_matched=0.9) == 0.3
    assert resolve_min_score(0.0, 0.3) == 0.0  # a configured 0 is a value, not "unset"
    assert resolve_min_score(None, None, mean_matched=0.57) == 0.5
    assert resolve_min_score(mean_matched=0.3) == 0.3  # floored without float noise
    assert resolve_min_score(mean_matched=float("nan")) == DEFAULT_MIN_SCORE
    assert resolve_min_score(None, mean_matched=None) == DEFAULT_MIN_SCORE


# ---- the stale-label filter ------------------------------------------------------------------
def _pool_with_labels() -> PoolState:
    rows = []
    for image, source, iteration in [
        ("a", "oracle", 1), ("b", "oracle", 2), ("c", "oracle", None), ("d", "auto", 2),
        ("e", "auto", 2),
    ]:  # fmt: skip
        boxes = box_rows([image], [[0, 0, 1, 1]], [0], first_box_id=len(rows))
        rows.append(labels_from_boxes(boxes, source=source, iteration=iteration))
    return PoolState(schema.IMAGES.empty(), pa.concat_tables(rows))


def test_without_labels_drops_only_the_stale_rows() -> None:
    pool = _pool_with_labels()
    ids = pool.without_labels("oracle", iteration=2).labels["image_id"].to_pylist()
    assert ids == ["a", "c", "d", "e"]  # a null iteration is never stale
    ids = pool.without_labels("auto", image_ids=["e", "a"]).labels["image_id"].to_pylist()
    assert ids == ["a", "b", "c", "d"]
    assert pool.without_labels("oracle").labels["image_id"].to_pylist() == ["d", "e"]
    assert pool.without_labels("pseudo").labels.equals(pool.labels)


# ---- COCO id policies ------------------------------------------------------------------------
def test_one_coco_writer_two_id_policies() -> None:
    size = pa.array([20, 10], pa.int32())
    images = pa.table({"image_id": ["pool/b", "pool/a"], "file": ["/d/b.png", "/d/x/a.jpg"],
                       "width": size, "height": size, "source_id": ["7", None]})  # fmt: skip
    boxes = box_rows(["pool/b", "pool/a", "pool/c"], [[0, 0, 0.3, 1]] * 3, [1, 0, 0],
                     source_id=[None, 3, 4])  # fmt: skip
    cats = pa.table({"class_id": pa.array([1, 0], pa.int32()), "name": ["y", "x"],
                     "source_id": pa.array([9, 4], pa.int64())})  # fmt: skip
    restore = coco_document(images, boxes, cats, policy="restore")
    assert [(i["id"], i["file_name"]) for i in restore["images"]] == [(8, "a.jpg"), (7, "b.png")]
    assert [(a["id"], a["image_id"]) for a in restore["annotations"]] == [(3, 8), (4, 7)]
    assert restore["categories"] == [{"id": 4, "name": "x"}, {"id": 9, "name": "y"}]
    review = coco_document(images.to_pandas(), boxes.to_pandas(), cats, policy="review")
    assert [(i["id"], i["file_name"]) for i in review["images"]] == [
        (1, "/d/x/a.jpg"), (2, "/d/b.png")
    ]  # fmt: skip
    assert [(a["id"], a["image_id"]) for a in review["annotations"]] == [(1, 2), (2, 1)]
    assert [i["detloop_id"] for i in review["images"]] == ["pool/a", "pool/b"]
    assert restore["annotations"][0]["bbox"][2] == 0.3  # shortest decimal: x1 + w == x2
    assert [a["category_id"] for a in review["annotations"]] == [9, 4]


# ---- run-directory paths ---------------------------------------------------------------------
def test_run_directory_paths(tmp_path: Path) -> None:
    root = RunsRoot(tmp_path)
    run = root.run("exp", "random-s0")
    assert root.unused_run("exp", "random-s0") == run
    run.path.mkdir(parents=True)
    run.write_meta({})
    assert root.unused_run("exp", "random-s0").name == "random-s0-r2"
    assert run.split_predictions_file(3, "pool") == run.predictions_file(3)
    assert run.split_predictions_file(3, "val") == run.val_predictions_file(3)
    assert run.split_predictions_file(3, "test").name == "test_predictions.parquet"
    assert run.artifact_path(3) == "iter_0003"
    assert run.artifact_path(3, "validation") == "iter_0003/validation"
    assert run.validation_dir(3) == run.iteration_dir(3) / "validation"
    assert iteration_of(run.checkpoint(12)) == 12
    assert iteration_of(tmp_path / "somewhere" / "checkpoint") is None
    assert not is_checkpoint(run.checkpoint(12))
    run.checkpoint(12).mkdir(parents=True)
    (run.checkpoint(12) / "metadata.json").write_text("{}")
    assert is_checkpoint(run.checkpoint(12)) and run.latest_checkpoint() == run.checkpoint(12)
    assert run.query_stem(2).name == "query_iter_0002"
    assert run.autolabel_coco_file(2).name == "autolabel_iter_0002_auto.coco.json"


# ---- derived generators ----------------------------------------------------------------------
def test_seeding_with_and_without_an_iteration() -> None:
    crc = zlib.crc32(b"stage")
    expect = np.random.default_rng(np.random.SeedSequence([5, 2, crc])).random(3)
    assert np.array_equal(seeding.rng(5, 2, "stage").random(3), expect)
    outside = np.random.default_rng(np.random.SeedSequence([5, crc])).random(3)
    assert np.array_equal(seeding.rng(5, None, "stage").random(3), outside)
    assert seeding.derive_seed(5, 2, "stage") != seeding.derive_seed(5, None, "stage")


def test_coco_review_accepts_empty_boxes() -> None:
    images = pd.DataFrame({"image_id": ["pool/a"], "file": ["/a.png"], "width": [4],
                           "height": [4]})  # fmt: skip
    boxes = pd.DataFrame(columns=["image_id", "class_id", *schema.COORDS, "score"])
    cats = pd.DataFrame({"class_id": [0], "name": ["x"], "source_id": [1]})
    doc = coco_document(images, boxes, cats, policy="review")
    assert doc["annotations"] == [] and doc["images"][0]["id"] == 1
