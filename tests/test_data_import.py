"""Importer passes: separate decode pass, recovery after a killed import, exact box round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detloop.data import schema
from detloop.data.coco import parse_coco
from detloop.data.digits import digits_source
from detloop.data.errors import DataError
from detloop.data.export import export_coco
from detloop.data.importer import check_files, commit, decode_pass, import_source
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir


def test_passes_can_run_one_by_one(digits_tiny: Path, tmp_path: Path) -> None:
    source, images = digits_source(digits_tiny, "pool")
    parsed = parse_coco(source, images)
    check_files(parsed, "pool")
    assert not parsed.problems and parsed.image_ids[0] == "pool/000001"
    assert all(h is None for h in parsed.phash)
    decode_pass(parsed, with_hash=True)
    assert all(isinstance(h, int) for h in parsed.phash)
    report = commit(RunDir(tmp_path / "run"), parsed, "pool")
    assert report.n_images == 64 and report.n_quarantined == 0
    fast = import_source(
        RunDir(tmp_path / "nodecode"), "coco", source, "pool", images=images, decode=False
    )
    assert fast.n_boxes == report.n_boxes
    assert RunDir(tmp_path / "nodecode").read_images()["phash"].null_count == 64


def test_digits_run_fixture(digits_tiny_run: RunDir) -> None:
    images = digits_tiny_run.read_images()
    assert images.num_rows == 96
    assert set(images["split"].to_pylist()) == {"pool", "val"}
    assert digits_tiny_run.read_categories()["name"].to_pylist() == [str(k) for k in range(10)]


def test_import_killed_between_its_writes_is_repaired(digits_tiny: Path, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    source, images = digits_source(digits_tiny, "val")
    import_source(run, "coco", source, "val", images=images)
    gt_before = run.read_gt()
    # A killed import of the test split wrote its gt but not its images.
    orphans = gt_before.slice(0, 5)
    orphans = orphans.set_column(0, "image_id", pa.array(["test/000001"] * 5))
    orphans = orphans.set_column(1, "box_id", pa.array(range(10**6, 10**6 + 5), pa.int64()))
    orphans = schema.validate_table(orphans, schema.GT)
    run.write_gt(pa.concat_tables([gt_before, orphans]))
    source, images = digits_source(digits_tiny, "test")
    report = import_source(run, "coco", source, "test", images=images)
    gt = run.read_gt()
    assert gt.num_rows == gt_before.num_rows + report.n_boxes
    assert len(set(gt["box_id"].to_pylist())) == gt.num_rows


decimals = st.decimals(min_value=0, max_value=900, places=3, allow_nan=False).map(float)
sizes = st.decimals(min_value="0.01", max_value=99, places=3).map(float)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(boxes=st.lists(st.tuples(decimals, decimals, sizes, sizes), min_size=1, max_size=8))
def test_boxes_round_trip_exactly(
    digits_tiny: Path,
    tmp_path_factory: pytest.TempPathFactory,
    boxes: list[tuple[float, float, float, float]],
) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    doc = {
        "images": [{"id": 3, "file_name": "000001.png", "width": 1000, "height": 1000}],
        "categories": [{"id": 1, "name": "0"}],
        "annotations": [
            {
                "id": 10 + k,
                "image_id": 3,
                "category_id": 1,
                "bbox": list(b),
                "area": b[2] * b[3],
                "iscrowd": 0,
            }
            for k, b in enumerate(boxes)
        ],
    }
    path = tmp / "in.json"
    path.write_text(json.dumps(doc))
    run = RunDir(tmp / "run")
    import_source(run, "coco", path, "val", images=digits_tiny / "images" / "pool", decode=False)
    export_coco(run, tmp / "out.json")
    back = json.loads((tmp / "out.json").read_text())
    assert [a["bbox"] for a in back["annotations"]] == [list(b) for b in boxes]
    assert run.read_gt().schema.field("x1").type == schema.F64


def test_export_of_revealed_labels(
    digits_tiny_run: RunDir, digits_tiny: Path, tmp_path: Path
) -> None:
    pool = PoolState.load(digits_tiny_run)
    ids = pool.ids("unlabeled")[:5]
    pool.reveal(digits_tiny_run.read_gt(), ids, iteration=1).save(digits_tiny_run)
    out = tmp_path / "labeled.json"
    counts = export_coco(digits_tiny_run, out, state="labeled", split="pool", boxes="labels")
    back = json.loads(out.read_text())
    original = json.loads((digits_tiny / "pool.json").read_text())
    wanted = {int(i.split("/")[1]) for i in ids}
    expected = [
        {k: v for k, v in a.items() if k != "mnist_index"}
        for a in original["annotations"]
        if a["image_id"] in wanted
    ]
    assert counts["images"] == 5
    assert {a.pop("detloop_source") for a in back["annotations"]} == {"oracle"}  # provenance
    assert sorted(back["annotations"], key=lambda a: a["id"]) == expected


def test_decoding_without_hashes_still_checks_images(digits_tiny: Path, tmp_path: Path) -> None:
    """``hash_pool=False`` (a loop that never prunes): sizes checked, corrupt files caught."""
    import shutil

    source, images = digits_source(digits_tiny, "pool")
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    run = RunDir(tmp_path / "run")
    report = import_source(run, "coco", source, "pool", images=copy, hash_pool=False)
    assert report.n_images == 64 and run.read_images()["phash"].null_count == 64
    victim = sorted(copy.rglob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match="cannot decode"):
        import_source(RunDir(tmp_path / "run2"), "coco", source, "pool", images=copy,
                      hash_pool=False)  # fmt: skip
