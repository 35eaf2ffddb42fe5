"""The data verbs through ``detloop.cli.main`` and one real ``detloop`` process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from detloop.cli.main import main
from detloop.data.rundir import RunDir

DETLOOP = Path(sys.executable).parent / "detloop"


def _import(root: Path, run: Path, split: str, *extra: str) -> int:
    return main(
        [
            "import",
            "coco",
            str(root / f"{split}.json"),
            "--run",
            str(run),
            "--split",
            split,
            "--images",
            str(root / "images" / split),
            *extra,
        ]
    )


def test_make_dataset_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "make-dataset",
                "digits",
                "--size",
                "tiny",
                "--out",
                str(tmp_path / "d"),
                "--seed",
                "4",
                "--imbalance",
                "0.8",
                "--balanced-test",
            ]
        )
        == 0
    )
    assert "pool:" in capsys.readouterr().out
    doc = json.loads((tmp_path / "d" / "val.json").read_text())
    assert len(doc["images"]) == 32 and doc["info"]["seed"] == 4
    assert doc["info"]["imbalance"] == 0.8  # val keeps the pool's classes; test is uniform
    assert json.loads((tmp_path / "d" / "test.json").read_text())["info"]["imbalance"] == 1.0
    assert len(list((tmp_path / "d" / "images" / "test").glob("*.png"))) == 32


def test_import_and_export(
    digits_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert _import(digits_tiny, run, "pool") == 0
    assert _import(digits_tiny, run, "test") == 0
    out = capsys.readouterr().out
    assert "imported 64 images" in out and "imported 32 images" in out
    assert RunDir(run).read_images().num_rows == 96
    dest = tmp_path / "out.json"
    argv = ["export", "coco", str(run), "--out", str(dest), "--split", "test", "--boxes", "gt"]
    assert main(argv) == 0
    exported = json.loads(dest.read_text())
    original = json.loads((digits_tiny / "test.json").read_text())
    assert [(i["id"], i["file_name"]) for i in exported["images"]] == [
        (i["id"], i["file_name"]) for i in original["images"]
    ]
    strip = [{k: v for k, v in a.items() if k != "mnist_index"} for a in original["annotations"]]
    assert sorted(exported["annotations"], key=lambda a: a["id"]) == strip
    assert main(["export", "coco", str(run), "--out", str(dest), "--state", "labeled"]) == 0
    assert len(json.loads(dest.read_text())["images"]) == 32


def test_bad_input_exits_2_with_every_problem(
    digits_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "copy"
    shutil.copytree(digits_tiny, root)
    (root / "images" / "val" / "000003.png").unlink()
    (root / "images" / "val" / "000005.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    assert _import(root, run, "val") == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "000003.png" in err and "000005.png" in err
    assert "Traceback" not in err and not RunDir(run).images_file.exists()
    assert _import(root, run, "val", "--lenient") == 0
    out = capsys.readouterr().out
    assert "2 images quarantined" in out and "000003.png" in out
    states = RunDir(run).read_images()["state"].to_pylist()
    assert states.count("examine") == 2 and states.count("labeled") == 30


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["import", "coco", "x.json", "--split", "pool"])  # no --run
    assert info.value.code == 2
    assert (
        main(
            [
                "import",
                "coco",
                str(tmp_path / "none.json"),
                "--run",
                str(tmp_path / "r"),
                "--split",
                "pool",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-dataset", "digits", "--size", "huge", "--out", str(tmp_path)])


def test_real_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []')
    proc = subprocess.run(
        [
            str(DETLOOP),
            "import",
            "coco",
            str(bad),
            "--run",
            str(tmp_path / "run"),
            "--split",
            "val",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "malformed JSON" in proc.stderr and "Traceback" not in proc.stderr
