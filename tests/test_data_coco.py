"""COCO import and export: round trip of ids, boxes and attributes; every bad-input case."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.export import box_extent, export_coco
from detloop.data.importer import import_source
from detloop.data.rundir import RunDir

SIZES = {"a/cat.png": (64, 48), "a/dog.jpg": (80, 60), "b/cow.png": (50, 50), "owl.png": (40, 30)}


def _doc() -> dict[str, Any]:
    """Odd ids, decimal boxes, a crowd box, an area that is not w*h, an empty image."""
    images = [
        {"id": 101, "file_name": "a/cat.png", "width": 64, "height": 48},
        {"id": 7, "file_name": "a/dog.jpg", "width": 80, "height": 60},
        {"id": 42, "file_name": "b/cow.png", "width": 50, "height": 50},
        {"id": 9000, "file_name": "owl.png", "width": 40, "height": 30},
    ]
    categories = [{"id": 11, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "cow"}]
    anns = [
        {
            "id": 5001,
            "image_id": 101,
            "category_id": 11,
            "bbox": [1.5, 2.25, 30.1, 20.7],
            "area": 500.0,
            "iscrowd": 0,
        },
        {
            "id": 17,
            "image_id": 101,
            "category_id": 3,
            "bbox": [40.0, 10.0, 23.33, 37.0],
            "area": 863.21,
            "iscrowd": 1,
        },
        {
            "id": 3,
            "image_id": 7,
            "category_id": 3,
            "bbox": [0.1, 0.2, 79.3, 59.7],
            "area": 4734.21,
            "iscrowd": 0,
        },
        {
            "id": 900,
            "image_id": 42,
            "category_id": 7,
            "bbox": [-0.5, 10.0, 50.9, 12.125],
            "area": 617.1125,
            "iscrowd": 0,
        },
    ]
    return {"images": images, "annotations": anns, "categories": categories}


def _write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A COCO file (images next to it) and its document."""
    _write_images(tmp_path / "data")
    doc = _doc()
    path = tmp_path / "data" / "ann.json"
    path.write_text(json.dumps(doc))
    return path, doc


def _rewrite(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc))


def test_round_trip_restores_ids_boxes_and_attributes(
    coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, doc = coco
    run = RunDir(tmp_path / "run")
    report = import_source(run, "coco", path, "pool")
    assert (report.n_images, report.n_boxes, report.n_quarantined) == (4, 4, 0)
    out = tmp_path / "out.json"
    export_coco(run, out)
    back = json.loads(out.read_text())
    by_id = {i["id"]: i for i in back["images"]}
    for img in doc["images"]:
        got = by_id[img["id"]]
        assert {k: got[k] for k in img} == img
    assert sorted(back["categories"], key=lambda c: c["id"]) == sorted(
        doc["categories"], key=lambda c: c["id"]
    )
    assert sorted(back["annotations"], key=lambda a: a["id"]) == sorted(
        doc["annotations"], key=lambda a: a["id"]
    )


def test_tables_after_import(coco: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = coco
    run = RunDir(tmp_path / "run")
    import_source(run, "coco", path, "val")
    images = run.read_images().to_pylist()
    assert {i["image_id"] for i in images} == {"val/a/cat", "val/a/dog", "val/b/cow", "val/owl"}
    assert all(i["state"] == "labeled" and i["phash"] is None for i in images)
    cats = run.read_categories().to_pylist()
    # class ids follow the COCO category ids in ascending order
    assert [(c["class_id"], c["name"], c["source_id"]) for c in cats] == [
        (0, "dog", 3),
        (1, "cow", 7),
        (2, "cat", 11),
    ]
    gt = {r["source_id"]: r for r in run.read_gt().to_pylist()}
    assert gt[17]["class_id"] == 0 and gt[17]["iscrowd"] == 1
    assert (gt[5001]["x1"], gt[5001]["y2"]) == (1.5, 2.25 + 20.7)
    assert gt[5001]["occluded"] == -1 and gt[5001]["truncated"] == -1


def test_pool_images_get_a_phash(coco: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = coco
    run = RunDir(tmp_path / "run")
    import_source(run, "coco", path, "pool")
    images = run.read_images()
    assert images.schema.field("phash").type == schema.IMAGES.schema.field("phash").type
    hashes = images["phash"].to_pylist()
    assert all(isinstance(h, int) for h in hashes) and len(set(hashes)) == 4
    assert set(images["state"].to_pylist()) == {"unlabeled"}


def test_classes_select_and_order(coco: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = coco
    run = RunDir(tmp_path / "run")
    report = import_source(run, "coco", path, "pool", classes=["cow", "cat"])
    assert report.n_boxes == 2  # the dog boxes are skipped
    assert run.read_categories()["name"].to_pylist() == ["cow", "cat"]
    with pytest.raises(DataError, match="'horse'"):
        import_source(RunDir(tmp_path / "r2"), "coco", path, "pool", classes=["horse"])


def test_splits_never_collide_and_reimport_is_refused(
    coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = coco
    run = RunDir(tmp_path / "run")
    for split in ("pool", "val", "test"):
        import_source(run, "coco", path, split)
    ids = run.read_images()["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert len(set(run.read_gt()["box_id"].to_pylist())) == 12
    before = run.images_file.read_bytes()
    with pytest.raises(DataError, match="already in the run"):
        import_source(run, "coco", path, "val")
    assert run.images_file.read_bytes() == before


def test_box_within_one_pixel_is_accepted(
    coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, doc = coco
    doc["annotations"][2]["bbox"] = [-0.9, -0.9, 80.8, 60.8]  # 0.9 px beyond on every side
    _rewrite(path, doc)
    report = import_source(RunDir(tmp_path / "run"), "coco", path, "pool")
    assert report.n_boxes == 4


def test_box_extent_is_the_shortest_exact_decimal() -> None:
    for lo, w in [(0.1, 0.2), (1234.5678, 0.1), (3.0, 7.25), (0.3, 1e-7)]:
        assert box_extent(lo, lo + w) == w


# ---- bad input ---------------------------------------------------------------------------------
Mutator = Callable[[Path, dict[str, Any]], None]


def _missing_file(root: Path, doc: dict[str, Any]) -> None:
    (root / "b/cow.png").unlink()


def _undecodable(root: Path, doc: dict[str, Any]) -> None:
    (root / "b/cow.png").write_bytes(b"this is not a png")


def _truncated(root: Path, doc: dict[str, Any]) -> None:
    data = (root / "b/cow.png").read_bytes()
    (root / "b/cow.png").write_bytes(data[: len(data) // 2])


def _ann(k: int, **changes: Any) -> Mutator:
    def mutate(root: Path, doc: dict[str, Any]) -> None:
        doc["annotations"][k].update(changes)
        for key, value in changes.items():
            if value is None:
                del doc["annotations"][k][key]

    return mutate


def _dup_image_id(root: Path, doc: dict[str, Any]) -> None:
    doc["images"][2]["id"] = 9000  # b/cow.png now shares its id with owl.png


def _dup_file(root: Path, doc: dict[str, Any]) -> None:
    doc["images"][3]["file_name"] = "b/cow.png"
    doc["images"][3].update(width=50, height=50)


# name -> (mutation, message, lenient outcome: quarantined image ids, or "skip", or "fatal")
CASES: dict[str, tuple[Mutator, str, set[str] | str]] = {
    "missing file": (_missing_file, "image file not found", {"pool/b/cow"}),
    "undecodable": (_undecodable, "cannot decode image", {"pool/b/cow"}),
    "truncated": (_truncated, "cannot decode image", {"pool/b/cow"}),
    "zero-area box": (_ann(3, bbox=[1.0, 1.0, 0.0, 5.0]), "zero-area", {"pool/b/cow"}),
    "negative box": (_ann(3, bbox=[10.0, 1.0, 5.0, -3.0]), "negative box", {"pool/b/cow"}),
    "box outside": (
        _ann(3, bbox=[10.0, 10.0, 45.0, 5.0]),
        "outside the 50x50 image",
        {"pool/b/cow"},
    ),
    "unknown category": (_ann(3, category_id=99), "unknown category id 99", {"pool/b/cow"}),
    "unknown image": (_ann(3, image_id=12345), "unknown image id 12345", "skip"),
    "duplicate image id": (_dup_image_id, "duplicate image id 9000", {"pool/b/cow", "pool/owl"}),
    "duplicate file": (_dup_file, "duplicate image", {"pool/b/cow"}),
    "duplicate annotation id": (_ann(3, id=3), "duplicate annotation id 3", {"pool/b/cow"}),
    "missing bbox": (_ann(3, bbox=None), "bbox=None", {"pool/b/cow"}),
    "wrong bbox type": (_ann(3, bbox="1,2,3,4"), "missing or wrong type", {"pool/b/cow"}),
    "wrong iscrowd": (_ann(3, iscrowd=2), "iscrowd=2", {"pool/b/cow"}),
    "nan in bbox": (_ann(3, bbox=[1.0, float("nan"), 2.0, 2.0]), "non-finite", {"pool/b/cow"}),
    "negative area": (_ann(3, area=-4.0), "not a finite number >= 0", {"pool/b/cow"}),
    "bool in bbox": (_ann(3, bbox=[1.0, True, 2.0, 2.0]), "bbox=[1.0, True", {"pool/b/cow"}),
    "file_name escapes": (
        lambda r, d: d["images"][2].update(file_name="../x.png"),
        "must be a path inside",
        "fatal",
    ),
    "wrong image width": (lambda r, d: d["images"][2].update(width="50"), "width='50'", "fatal"),
    "missing file_name": (lambda r, d: d["images"][2].pop("file_name"), "file_name=None", "fatal"),
    "missing images key": (lambda r, d: d.pop("images"), "'images': required key", "fatal"),
    "categories not a list": (lambda r, d: d.update(categories={}), "must be a list", "fatal"),
}


def _apply(case: str, path: Path) -> None:
    mutate = CASES[case][0]
    doc = copy.deepcopy(_doc())
    mutate(path.parent, doc)
    _rewrite(path, doc)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_strict_fails_and_stores_nothing(
    case: str, coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = coco
    run = RunDir(tmp_path / "run")
    _apply(case, path)
    with pytest.raises(DataError) as info:
        import_source(run, "coco", path, "pool")
    assert CASES[case][1] in str(info.value)
    assert str(path) in str(info.value) or "cow.png" in str(info.value)
    assert not run.images_file.exists() and not run.gt_file.exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_lenient_quarantines(
    case: str, coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = coco
    run = RunDir(tmp_path / "run")
    _apply(case, path)
    outcome = CASES[case][2]
    if outcome == "fatal":
        with pytest.raises(DataError, match=re.escape(CASES[case][1])):
            import_source(run, "coco", path, "pool", lenient=True)
        assert not run.images_file.exists()
        return
    report = import_source(run, "coco", path, "pool", lenient=True)
    images = {r["image_id"]: r for r in run.read_images().to_pylist()}
    examined = {i for i, r in images.items() if r["state"] == "examine"}
    assert examined == (set() if outcome == "skip" else outcome)
    assert report.n_quarantined == len(examined)
    for image_id in examined:
        assert CASES[case][1] in images[image_id]["reason"]
    for image_id in set(images) - examined:
        assert images[image_id]["state"] == "unlabeled" and images[image_id]["reason"] is None
    assert "pool/a/cat" in images and images["pool/a/cat"]["state"] == "unlabeled"


def test_every_problem_reported_in_one_pass(
    coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, doc = coco
    (path.parent / "owl.png").unlink()
    doc["annotations"][0]["bbox"] = [0.0, 0.0, 0.0, 1.0]
    doc["annotations"][1]["category_id"] = 99
    doc["annotations"][3]["image_id"] = 555
    _rewrite(path, doc)
    with pytest.raises(DataError) as info:
        import_source(RunDir(tmp_path / "run"), "coco", path, "pool")
    problems = info.value.problems
    assert len(problems) == 4
    text = str(info.value)
    for needle in (
        "owl.png",
        "zero-area",
        "unknown category id 99",
        "unknown image id 555",
        "row 0",
        "row 1",
        "row 3",
    ):
        assert needle in text


def test_malformed_json_names_the_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [,]}')
    with pytest.raises(DataError, match=r"malformed JSON at line 1 column \d+"):
        import_source(RunDir(tmp_path / "run"), "coco", path, "pool", lenient=True)


def test_failed_import_keeps_what_was_stored(
    coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, doc = coco
    run = RunDir(tmp_path / "run")
    import_source(run, "coco", path, "pool")
    stored = {f: f.read_bytes() for f in (run.images_file, run.gt_file, run.categories_file)}
    doc["categories"].append({"id": 3, "name": "horse"})  # duplicate category id
    _rewrite(path, doc)
    with pytest.raises(DataError, match="duplicate category id 3"):
        import_source(run, "coco", path, "val", lenient=True)
    assert {f: f.read_bytes() for f in stored} == stored


def test_conflicting_category_ids_between_imports(
    coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, doc = coco
    run = RunDir(tmp_path / "run")
    import_source(run, "coco", path, "pool")
    doc["categories"][0]["id"] = 12  # "cat" had id 11 in the pool file
    for ann in doc["annotations"]:
        ann["category_id"] = 12 if ann["category_id"] == 11 else ann["category_id"]
    _rewrite(path, doc)
    with pytest.raises(DataError, match="'cat' has id 12 here but 11 in the run"):
        import_source(run, "coco", path, "val")


def test_export_filters_by_state_and_split(
    coco: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = coco
    (path.parent / "owl.png").write_bytes(b"broken")
    run = RunDir(tmp_path / "run")
    import_source(run, "coco", path, "pool", lenient=True)
    import_source(run, "coco", path.with_name("ann.json"), "val", lenient=True)
    out = tmp_path / "examine.json"
    counts = export_coco(run, out, state="examine", split="pool")
    back = json.loads(out.read_text())
    assert counts["images"] == 1 and back["images"][0]["file_name"] == "owl.png"
    assert back["images"][0]["id"] == 9000
    # both splits: relative names collide, so absolute files are written
    export_coco(run, out)
    names = [i["file_name"] for i in json.loads(out.read_text())["images"]]
    assert len(names) == 8 and all(Path(n).is_absolute() for n in names)
    with pytest.raises(DataError, match="unknown state"):
        export_coco(run, out, state="nope")
