"""Review exports: COCO with pre-annotations (pycocotools) and Label Studio tasks (schema)."""

from __future__ import annotations

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from pycocotools.coco import COCO

from detloop.data.export import coco_document, write_coco
from detloop.data.review_export import export_review, label_studio_tasks, write_label_studio
from detloop.data.rundir import RunDir

SCHEMA = json.loads((Path(__file__).parent / "fixtures/label_studio_tasks.schema.json").read_text())


def frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    images = pd.DataFrame({"image_id": ["pool/b", "pool/a"], "file": ["/d/b.png", "/d/a.png"],
                           "width": [200, 100], "height": [100, 50]})  # fmt: skip
    boxes = pd.DataFrame({
        "image_id": ["pool/a", "pool/a", "pool/b"], "det_id": [0, 1, 0], "class_id": [0, 2, 2],
        "x1": [10.0, 0.0, 50.0], "y1": [5.0, 0.0, 10.0], "x2": [30.0, 100.0, 150.0],
        "y2": [25.0, 50.0, 60.0], "score": [0.9, 0.6, 0.75], "u": [0.1, np.nan, 0.3],
    })  # fmt: skip
    cats = pd.DataFrame({"class_id": [0, 1, 2], "name": ["car", "van", "bike & co"],
                         "source_id": [3, 5, 9]})  # fmt: skip
    return images, boxes, cats


def test_coco_loads_with_pycocotools_and_restores_category_ids(tmp_path: Path) -> None:
    images, boxes, cats = frames()
    path = write_coco(images, boxes, cats, tmp_path / "review.coco.json", policy="review")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    assert sorted(coco.getCatIds()) == [3, 5, 9]
    a_id = next(i["id"] for i in coco.dataset["images"] if i["detloop_id"] == "pool/a")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[a_id]))
    assert [a["bbox"] for a in anns] == [[10.0, 5.0, 20.0, 20.0], [0.0, 0.0, 100.0, 50.0]]
    assert [a["category_id"] for a in anns] == [3, 9]
    assert anns[0]["score"] == 0.9 and anns[0]["uncertainty"] == 0.1
    assert "uncertainty" not in anns[1]  # NaN is left out, not written as NaN
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes(coco.dataset["annotations"])
    assert len(res.getAnnIds()) == 3


def test_label_studio_tasks_validate_and_are_percent_of_image(tmp_path: Path) -> None:
    images, boxes, cats = frames()
    json_path, xml_path = write_label_studio(images, boxes, cats, tmp_path / "review.json")
    tasks = json.loads(json_path.read_text())
    jsonschema.validate(tasks, SCHEMA)
    assert [t["data"]["detloop_id"] for t in tasks] == ["pool/a", "pool/b"]
    region = tasks[1]["predictions"][0]["result"][0]
    assert region["value"]["x"] == pytest.approx(25.0)
    assert region["value"]["width"] == pytest.approx(50.0)
    assert region["value"]["height"] == pytest.approx(50.0)
    assert region["value"]["rectanglelabels"] == ["bike & co"]
    assert region["score"] == 0.75 and region["meta"]["uncertainty"] == 0.3
    root = ET.fromstring(xml_path.read_text())
    labels = [lab.get("value") for lab in root.iter("Label")]
    assert labels == ["car", "van", "bike & co"]
    rect = root.find("RectangleLabels")
    assert rect is not None and rect.get("name") == region["from_name"]
    assert rect.get("toName") == region["to_name"] == root.find("Image").get("name")  # type: ignore[union-attr]


def test_schema_rejects_absolute_pixels() -> None:
    images, boxes, cats = frames()
    tasks = label_studio_tasks(images, boxes, cats)
    tasks[0]["predictions"][0]["result"][0]["value"]["x"] = 150.0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(tasks, SCHEMA)


def test_local_files_url(tmp_path: Path) -> None:
    images, boxes, cats = frames()
    images["file"] = [str(tmp_path / "imgs/b.png"), str(tmp_path / "imgs/a.png")]
    tasks = label_studio_tasks(images, boxes, cats, document_root=tmp_path)
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=imgs/a.png"


def test_export_review_from_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    images, boxes, cats = frames()
    n = len(images)
    run.write_images(pa.table({
        "image_id": images["image_id"], "file": images["file"],
        "width": pa.array(images["width"], pa.int32()),
        "height": pa.array(images["height"], pa.int32()), "split": ["pool"] * n,
        "state": ["examine"] * n, "iteration": pa.array([1] * n, pa.int32()),
        "phash": pa.array([None] * n, pa.uint64()), "source_id": [None] * n, "reason": [None] * n,
    }))  # fmt: skip
    out = export_review(
        run, image_ids=["pool/a"], predictions=boxes, out_stem=tmp_path / "q", min_score=0.7
    )
    assert set(out) == {"coco", "label_studio", "label_studio_config"}
    doc = json.loads(out["coco"].read_text())
    assert len(doc["images"]) == 1 and len(doc["annotations"]) == 1  # 0.6 < min_score
    assert [c["id"] for c in doc["categories"]] == [1]  # no categories table: class_id + 1
    jsonschema.validate(json.loads(out["label_studio"].read_text()), SCHEMA)
    assert coco_document(images, boxes.iloc[:0], cats, policy="review")["annotations"] == []


def test_image_reference_stays_under_its_root(tmp_path: Path) -> None:
    from detloop.config import ExperimentConfig
    from detloop.data.errors import DataError
    from detloop.data.review_export import image_reference

    root = tmp_path / "images"
    (root / "a b").mkdir(parents=True)
    file = str(root / "a b" / "x.png")
    assert image_reference(file, None) == file
    assert image_reference(file, root) == "/data/local-files/?d=a b/x.png"
    assert image_reference(file, root, "https://data.example/set/") == (
        "https://data.example/set/a%20b/x.png"
    )
    with pytest.raises(DataError, match=r"outside labeling\.document_root"):
        image_reference(str(tmp_path / "elsewhere.png"), root)
    with pytest.raises(ValueError, match=r"url_prefix needs labeling\.document_root"):
        ExperimentConfig.model_validate({"labeling": {"url_prefix": "https://x"}})
