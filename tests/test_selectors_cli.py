"""Selector verbs: strategies, explain-strategy, select (on a real run directory) and oss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detloop.cli.main import main
from detloop.data import schema
from detloop.data.io import write_json, write_table
from detloop.data.rundir import RunDir
from detloop.data.synthetic import predictions_from_rows, synthetic_images


def test_strategies_lists_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for word in ("entropy", "sota", "highep_lowal", "perc", "full_prune", "nee"):
        assert word in out
    assert main(["strategies", "--filter", "*box"]) == 0
    out = capsys.readouterr().out
    assert "albox" in out and "mcbox" in out and "entropy" not in out
    assert main(["strategies", "--filter", "nothing*"]) == 1


def test_explain_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain-strategy", "perc_calib_norm_bottomk_mean_albox"]) == 0
    out = capsys.readouterr().out
    assert "calibrated" in out and "bottom-k" in out and "al_x1" in out
    assert main(["explain-strategy", "perc_entrpy"]) == 2
    assert "'entropy'" in capsys.readouterr().err
    assert (
        main(["explain-strategy", "rcc_scale_curriculum_learning_aug_curr", "--kind", "teacher"])
        == 0
    )
    out = capsys.readouterr().out
    assert "2x2 of copies" in out and "B - 1 common + 1 rare + 2 RandAugment" in out
    assert "curr:" in out and "imscore" not in out
    assert main(["explain-strategy", "pseudoscore_selftrain_combo", "--kind", "selection"]) == 0
    out = capsys.readouterr().out
    assert "u < δ̄" in out and "weighs its certainty" in out and "self-training" in out
    assert main(["explain-strategy", "rcc_curriculm", "--kind", "teacher"]) == 2
    assert "'curriculum_learning'" in capsys.readouterr().err
    assert main(["explain-strategy", "rcc_imscore"]) == 2  # an AL name by default
    assert "add --kind teacher" in capsys.readouterr().err


def _run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    ids = ["pool/a", "pool/b", "pool/c", "pool/d"]
    run.write_images(synthetic_images(pa.array(ids)))
    rows = [
        {"image_id": "pool/a", "entropy": 0.2},
        {"image_id": "pool/b", "entropy": 0.9},
        {"image_id": "pool/c", "entropy": 0.5},
    ]
    write_table(predictions_from_rows(rows), schema.PREDICTIONS, run.predictions_file(1))
    return run


def test_select_writes_the_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path)
    args = ["select", str(run.path), "--iteration", "1", "--strategy", "entropy", "--budget", "2"]
    assert main(args) == 0
    table = pq.read_table(run.selection_file(1))
    chosen = table.filter(table["selected"])["image_id"].to_pylist()
    assert sorted(chosen) == ["pool/b", "pool/c"]
    assert "selected 2 of 4" in capsys.readouterr().out


def test_select_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path)
    base = ["select", str(run.path), "--budget", "2"]
    assert main([*base, "--iteration", "1", "--strategy", "entropyy"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main([*base, "--iteration", "5", "--strategy", "entropy"]) == 2
    assert "no predictions" in capsys.readouterr().err
    assert main([*base, "--iteration", "1", "--strategy", "combo"]) == 2
    assert "thresholding result" in capsys.readouterr().err
    assert main([*base, "--iteration", "1", "--strategy", "calib_entropy"]) == 2
    assert "entropy_cal" in capsys.readouterr().err


def _oss_run(root: Path, name: str, labeled: list[str], rng: np.random.Generator) -> None:
    run = RunDir(root / "exp" / name)
    ids = [f"pool/{k}" for k in range(8)] + [f"val/{k}" for k in range(6)]
    files, boxes = [], []
    for k, image_id in enumerate(ids):
        path = root / "img" / f"{image_id.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
        for b in range(4):
            x, y, w, h = (
                rng.uniform(0, 30),
                rng.uniform(0, 20),
                rng.uniform(6, 40),
                rng.uniform(6, 30),
            )
            boxes.append((image_id, len(boxes), (k + b) % 2, x, y, x + w, y + h))
    images = synthetic_images(pa.array(ids))
    split = ["pool"] * 8 + ["val"] * 6
    state = ["labeled" if i in labeled else "unlabeled" for i in ids[:8]] + ["unlabeled"] * 6
    iteration = [1 if i in labeled else None for i in ids[:8]] + [None] * 6
    for col, values in (("file", files), ("split", split), ("state", state)):
        images = images.set_column(images.schema.get_field_index(col), col, pa.array(values))
    images = images.set_column(
        images.schema.get_field_index("iteration"), "iteration", pa.array(iteration, pa.int32())
    )
    run.write_images(images)
    cols = list(zip(*boxes, strict=True))
    n = len(boxes)
    gt = {
        "image_id": list(cols[0]),
        "box_id": list(cols[1]),
        "class_id": pa.array(cols[2], pa.int32()),
        **{c: list(v) for c, v in zip(schema.COORDS, cols[3:], strict=True)},
        "area": [1.0] * n,
        "iscrowd": pa.array([0] * n, pa.int8()),
        "occluded": pa.array([-1] * n, pa.int8()),
        "truncated": pa.array([-1] * n, pa.int8()),
        "source_id": pa.nulls(n, pa.int64()),
    }
    run.write_gt(pa.table(gt))
    run.write_categories(
        pa.table(
            {"class_id": pa.array([0, 1], pa.int32()), "name": ["car", "tram"], "source_id": [1, 2]}
        )
    )
    write_json({"seed": 0}, run.run_json)
    write_json(
        {"map": float(len(labeled)) / 10, "ap/car": 0.5, "ap/tram": 0.2}, run.metrics_file(1)
    )


def test_oss_over_the_runs_of_an_experiment(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _oss_run(
        tmp_path / "runs", "entropy-s0", ["pool/0", "pool/1", "pool/2", "pool/3", "pool/4"], rng
    )
    _oss_run(tmp_path / "runs", "random-s0", ["pool/5", "pool/6", "pool/7"], rng)
    config = tmp_path / "exp.yaml"
    config.write_text("name: exp\nruns_root: runs\n")
    assert main(["oss", str(config), "--iterations", "1", "--n-resample", "500"]) == 0
    out = tmp_path / "runs" / "exp" / "oss"
    table = pq.read_table(out / "oss.parquet")
    assert set(table["set_id"].to_pylist()) == {"entropy-s0/iter1", "random-s0/iter1"}
    assert set(table["class"].to_pylist()) == {"car", "tram"}
    assert pc.all(pc.is_finite(table["oss"])).as_py()
    assert pc.all(pc.greater(table["similarity"], 0)).as_py()
    summary = json.loads((out / "oss_summary.json").read_text())
    assert summary["sets"]["entropy-s0/iter1"]["map"] == pytest.approx(0.5)
    assert summary["oss_vs_map"]["n"] == 2


def test_oss_reliability_ranks_models_on_validation_subsets(
    digits_tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four models whose boxes are shifted 0, 1, 3 and 6 px from the truth: on every subset
    of the validation images the better model scores higher, so each subset's ranking agrees
    with the test ranking (τ = 1), and so does the full validation set."""
    import shutil

    from detloop.data.digits import digits_source
    from detloop.data.importer import import_source

    base = RunDir(tmp_path / "base")
    for split in ("pool", "val", "test"):
        source, images = digits_source(digits_tiny, split)
        import_source(base, "coco", source, split, images=images)
    images = base.read_images()
    val_ids = set(pc.filter(images["image_id"], pc.equal(images["split"], "val")).to_pylist())
    gt = [g for g in base.read_gt().to_pylist() if g["image_id"] in val_ids]
    for k, shift in enumerate((0.0, 1.0, 3.0, 6.0)):
        run = RunDir(tmp_path / "runs" / "exp" / f"m{k}-s0")
        shutil.copytree(base.path, run.path)
        rows = [
            {"image_id": g["image_id"], "class_id": g["class_id"], "score": 0.9,
             "x1": g["x1"] + shift, "y1": g["y1"], "x2": g["x2"] + shift, "y2": g["y2"]}
            for g in gt
        ]  # fmt: skip
        run.metrics_file(1).parent.mkdir(parents=True, exist_ok=True)
        write_table(predictions_from_rows(rows), schema.PREDICTIONS, run.val_predictions_file(1))
        write_json({"map": 0.9 - 0.1 * k, "test_map": 0.8 - 0.1 * k}, run.metrics_file(1))
        write_json({"seed": 0}, run.run_json)
    config = tmp_path / "exp.yaml"
    config.write_text("name: exp\nruns_root: runs\n")
    argv = ["oss", str(config), "--mode", "reliability", "--iterations", "1", "--n-resample", "300"]
    assert main([*argv, "--subsets", "3", "--subset-seeds", "2", "--fraction", "0.75"]) == 0
    out = tmp_path / "runs" / "exp" / "oss"
    table = pq.read_table(out / "reliability.parquet")
    assert table.num_rows == 6 and set(table["n_images"].to_pylist()) == {24}  # 75 % of 32
    assert table["tau"].to_pylist() == pytest.approx([1.0] * 6)
    assert pc.all(pc.is_finite(table["oss"])).as_py()
    summary = json.loads((out / "reliability_summary.json").read_text())
    assert summary["ranked_by"].startswith("test") and len(summary["models"]) == 4
    assert summary["tau_full_val"] == pytest.approx(1.0) and len(summary["tau_top_s"]) == 2
    assert (out / "reliability.png").stat().st_size > 0
    assert "OSS vs tau" in capsys.readouterr().out
    again = tmp_path / "again"
    assert main([*argv, "--subsets", "3", "--subset-seeds", "2", "--fraction", "0.75",
                 "--out", str(again)]) == 0  # fmt: skip
    assert pq.read_table(again / "reliability.parquet").equals(table)  # seeded
