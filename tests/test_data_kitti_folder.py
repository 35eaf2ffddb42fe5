"""KITTI label import and image-folder import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detloop.data.errors import DataError
from detloop.data.importer import import_source
from detloop.data.kitti import KITTI_CLASSES
from detloop.data.rundir import RunDir

W, H = 320, 100
LABELS = {
    "000000": [
        "Car 0.00 0 -1.58 200.5 30.25 260.0 80.0 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59",
        "Pedestrian 0.35 2 0.21 10.0 20.5 30.0 99.0 1.7 0.5 0.8 1.0 2.0 3.0 0.1",
        "DontCare -1 -1 -10 150.0 10.0 170.0 30.0 -1 -1 -1 -1000 -1000 -1000 -10",
        "Misc 0.00 1 0.5 1.0 1.0 20.0 20.0 1 1 1 1 1 1 1",
    ],
    "000001": ["Cyclist 1.00 3 0.0 100.0 10.0 140.0 60.0 1 1 1 1 1 1 1 0.9", ""],
    "000002": [],
}


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def kitti(tmp_path: Path) -> Path:
    """``training/label_2`` with its sibling ``image_2``."""
    labels = tmp_path / "training" / "label_2"
    labels.mkdir(parents=True)
    for k, (stem, lines) in enumerate(LABELS.items()):
        (labels / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        _image(tmp_path / "training" / "image_2" / f"{stem}.png", k)
    return labels


def test_kitti_import_keeps_attributes_and_drops_dontcare(kitti: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    report = import_source(run, "kitti", kitti, "pool")
    assert (report.n_images, report.n_boxes) == (3, 3)
    cats = run.read_categories().to_pylist()
    assert [c["name"] for c in cats] == list(KITTI_CLASSES)
    assert [c["source_id"] for c in cats] == list(range(1, 8))
    gt = run.read_gt().sort_by("box_id").to_pylist()
    car, ped, cyc = gt
    assert car["image_id"] == "pool/000000" and car["class_id"] == KITTI_CLASSES.index("car")
    assert (car["x1"], car["y1"], car["x2"], car["y2"]) == (200.5, 30.25, 260.0, 80.0)
    assert (car["occluded"], car["truncated"], car["source_id"]) == (0, 0, 0)
    assert (ped["occluded"], ped["truncated"], ped["source_id"]) == (2, 35, 1)
    assert (cyc["occluded"], cyc["truncated"]) == (3, 100)
    assert ped["area"] == pytest.approx(20.0 * 78.5)
    images = run.read_images().to_pylist()
    assert {i["image_id"] for i in images} == {"pool/000000", "pool/000001", "pool/000002"}
    assert all((i["width"], i["height"]) == (W, H) and i["phash"] is not None for i in images)


def test_kitti_classes_option_and_run_categories(kitti: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    report = import_source(run, "kitti", kitti, "pool", classes=["Pedestrian", "car"])
    assert report.n_boxes == 2
    assert run.read_categories()["name"].to_pylist() == ["Pedestrian", "car"]
    # a later split without --classes uses the run's categories
    report = import_source(run, "kitti", kitti, "val")
    assert report.n_boxes == 2 and report.categories_added == ()


@pytest.mark.parametrize(
    ("stem", "line", "needle"),
    [
        ("000002", "Car 0 0 0 1 2 3", "expected 15 or 16 fields, got 7"),
        ("000002", "Car x 0 0 1 2 3 4 1 1 1 1 1 1 1", "must be numbers"),
        ("000002", "Car 0 0 0 10 10 10 50 1 1 1 1 1 1 1", "zero-area"),
        ("000002", f"Van 0 0 0 10 10 {W + 5} 50 1 1 1 1 1 1 1", "outside the 320x100 image"),
    ],
)
def test_kitti_bad_lines(kitti: Path, tmp_path: Path, stem: str, line: str, needle: str) -> None:
    (kitti / f"{stem}.txt").write_text(line + "\n")
    run = RunDir(tmp_path / "run")
    with pytest.raises(DataError) as info:
        import_source(run, "kitti", kitti, "pool")
    assert needle in str(info.value) and f"{stem}.txt, row 0" in str(info.value)
    assert not run.images_file.exists()
    import_source(run, "kitti", kitti, "pool", lenient=True)
    states = {r["image_id"]: r["state"] for r in run.read_images().to_pylist()}
    assert states == {
        "pool/000000": "unlabeled",
        "pool/000001": "unlabeled",
        "pool/000002": "examine",
    }


def test_kitti_label_without_image(kitti: Path, tmp_path: Path) -> None:
    (kitti.parent / "image_2" / "000001.png").unlink()
    with pytest.raises(DataError, match=r"image file not found: .*000001\.png"):
        import_source(RunDir(tmp_path / "run"), "kitti", kitti, "pool")


def test_kitti_needs_an_images_folder(kitti: Path, tmp_path: Path) -> None:
    (kitti.parent / "image_2").rename(kitti.parent / "pics")
    with pytest.raises(DataError, match="--images"):
        import_source(RunDir(tmp_path / "run"), "kitti", kitti, "pool")
    report = import_source(
        RunDir(tmp_path / "r"), "kitti", kitti, "pool", images=kitti.parent / "pics"
    )
    assert report.n_images == 3


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "frames"
    _image(root / "a.png", 0)
    _image(root / "seq1" / "b.jpg", 1)
    _image(root / "seq1" / "deeper" / "c.png", 2)
    (root / "notes.txt").write_text("not an image")
    _image(root / ".hidden" / "d.png", 3)
    return root


def test_folder_import_is_unlabeled(folder: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    report = import_source(run, "folder", folder, "pool")
    assert (report.n_images, report.n_boxes) == (3, 0)
    images = run.read_images().sort_by("image_id").to_pylist()
    assert [i["image_id"] for i in images] == ["pool/a", "pool/seq1/b", "pool/seq1/deeper/c"]
    assert all(i["state"] == "unlabeled" and i["phash"] is not None for i in images)
    assert run.read_gt().num_rows == 0 and run.read_categories().num_rows == 0
    import_source(run, "folder", folder, "test", classes=["car"])
    test_images = [i for i in run.read_images().to_pylist() if i["split"] == "test"]
    assert {i["state"] for i in test_images} == {"unlabeled"}
    assert run.read_categories()["name"].to_pylist() == ["car"]


def test_folder_with_a_corrupt_image(folder: Path, tmp_path: Path) -> None:
    (folder / "seq1" / "b.jpg").write_bytes(b"\xff\xd8garbage")
    run = RunDir(tmp_path / "run")
    with pytest.raises(DataError, match=r"b\.jpg: cannot read image"):
        import_source(run, "folder", folder, "pool")
    import_source(run, "folder", folder, "pool", lenient=True)
    bad = [i for i in run.read_images().to_pylist() if i["state"] == "examine"]
    assert [i["image_id"] for i in bad] == ["pool/seq1/b"] and "cannot read" in bad[0]["reason"]


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        import_source(RunDir(tmp_path / "run"), "folder", tmp_path / "empty", "pool")
    with pytest.raises(DataError, match="does not exist"):
        import_source(RunDir(tmp_path / "run"), "folder", tmp_path / "none", "pool")
