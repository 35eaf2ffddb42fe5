"""End to end on digits-det tiny: validate → calibrate → threshold via ``main`` (auto-labeling:
test_autolabel_run.py)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
import yaml

from detloop.cli.main import main
from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.digits import digits_source
from detloop.data.importer import import_source
from detloop.data.io import read_json, read_table
from detloop.data.rundir import RunDir
from detloop.learners.calibration import CalibrationSet
from detloop.orchestrator.evaluation.common import log_artifacts
from detloop.selectors.threshold import load_thresholds

torch.set_num_threads(1)
SCHEMA = json.loads((Path(__file__).parent / "fixtures/label_studio_tasks.schema.json").read_text())
SETTINGS = {
    "name": "e2e",
    "model": {"preset": "tiny", "uncertainty": "mcdropout_lossatt", "mc_dropoutsamp": 2},
    "train": {"device": "cpu", "max_steps": 6, "batch_size": 4, "epochs": 1},
    "predict": {"batch_size": 8},
    "thresholding": {"n_trials": 12, "patience": 6},
}


@pytest.fixture(scope="module")
def trained(digits_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunDir]:
    """A run with pool/val/test imported and a tiny model trained for a few steps (iter 0)."""
    from detloop.learners.train import train_model

    base = tmp_path_factory.mktemp("e2e")
    run = RunDir(base / "run")
    for split in ("pool", "val", "test"):
        source, images = digits_source(digits_tiny, split)
        import_source(run, "coco", source, split, images=images)
    cfg_path = base / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(SETTINGS))
    cfg = ExperimentConfig.model_validate(SETTINGS)
    images = run.read_images()
    pool = images.filter(pc.equal(images["split"], "pool"))
    gt = run.read_gt()
    labels = gt.filter(pc.is_in(gt["image_id"], value_set=pool["image_id"].combine_chunks()))
    labels = labels.append_column("weight", pc.cast(pc.add(labels["iscrowd"], 1), "float32"))
    train_model(cfg, pool, labels, 10, run.checkpoint(0), seed=0, progress=False)
    return cfg_path, run


def cli(*argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(list(argv))


@pytest.mark.slow
def test_validate_calibrate_threshold(trained: tuple[Path, RunDir], digits_tiny: Path) -> None:
    cfg, run = trained
    common = [str(cfg), "--run", str(run.path), "--iteration", "0"]
    assert cli("validate", *common) == 0
    m = read_json(run.metrics_file(0))["validation"]
    assert set(m["decoding"]) == {"l-norm", "n-flow", "sample", "falsedec"}
    assert m["runtime_ms"]["n"] == m["n_images"] - 5 and m["runtime_ms"]["p95"] > 0
    assert {"al_uncalibrated", "mc_uncalibrated"} <= set(m["uncertainty_quality"]["box"])
    assert read_table(schema.MATCHES, run.matches_file(0)).num_rows > 0
    assert (run.iteration_dir(0) / "validation/reliability_uncalibrated.png").exists()

    assert cli("calibrate", *common) == 0
    cal = CalibrationSet.load(run.calibration_dir(0))
    assert set(cal.calibrators) == {"class", "class_mc", "box_al", "box_mc"}
    val = read_table(schema.PREDICTIONS, run.val_predictions_file(0))
    assert {"entropy_cal", "al_x1_cal", "mc_class_cal"} <= set(val.column_names)
    report = read_json(run.calibration_dir(0) / "report.json")
    assert "iso_perclscoo" in report["methods"]["box"]
    assert report["box"]["al_calibrated"]["pooled"]["ece"] is not None

    assert cli("threshold", *common, "--diagnostics") == 0
    res = load_thresholds(run.thresholds_file(0))
    assert res.uncertainties == ["entropy", "albox_rel"] and len(res.thresholds) == 6
    assert res.calibrated and res.objective <= min(
        s["objective"] for s in res.metrics["single"].values()
    )
    assert (run.iteration_dir(0) / "thresholding/heatmaps.png").exists()
    # another setting is kept beside the first, and asking for the first again reuses it
    first = run.thresholds_variant_file(0, res.variant)
    assert load_thresholds(first).thresholds == res.thresholds
    assert cli("threshold", *common, "--set", "thresholding.thr_fpr_tpr=0.8") == 0
    other = load_thresholds(run.thresholds_file(0))
    assert other.thr_fpr_tpr == 0.8 and other.variant != res.variant
    assert sorted(p.name for p in run.thresholding_dir(0).glob("thresholds_*.json")) == sorted(
        f"thresholds_{v}.json" for v in (res.variant, other.variant)
    )
    assert res.variant == "cd_b0.95_iou0.5-0.75_detection_cal_entropy+albox_rel"


def test_bad_input_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x"}))
    (tmp_path / "run").mkdir()
    assert cli("validate", str(cfg), "--run", str(tmp_path / "run"), "--iteration", "3") == 2
    assert cli("calibrate", str(cfg), "--run", str(tmp_path / "nope")) == 2
    cfg.write_text(yaml.safe_dump({"name": "x", "calibration": {"calib_split": 2}}))
    assert cli("threshold", str(cfg), "--run", str(tmp_path / "run")) == 2


@pytest.mark.slow
def test_log_artifacts_to_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(exp).info.run_id
    (tmp_path / "a.json").write_text('{"k": 1}')
    (tmp_path / "d/e").mkdir(parents=True)
    (tmp_path / "d/b.txt").write_text("b")
    (tmp_path / "d/e/c.txt").write_text("c")
    assert log_artifacts(None, uri, [tmp_path / "a.json"], "x") == 0  # no run: nothing logged
    assert log_artifacts(run_id, None, [tmp_path / "a.json"], "x") == 0
    assert client.list_artifacts(run_id) == []
    paths = [tmp_path / "a.json", tmp_path / "d", tmp_path / "no"]
    assert log_artifacts(run_id, uri, paths, "x") == 2  # the missing path is skipped
    names = sorted(a.path for a in client.list_artifacts(run_id, "x"))
    assert names == ["x/a.json", "x/d"]
    # a directory goes up whole, under its own name; every file keeps its content
    back = Path(client.download_artifacts(run_id, "x", str(tmp_path / "back")))
    files = {p.relative_to(back).as_posix(): p.read_text() for p in back.rglob("*") if p.is_file()}
    assert files == {"a.json": '{"k": 1}', "d/b.txt": "b", "d/e/c.txt": "c"}


@pytest.mark.slow
def test_loop_hooks_calibrate_and_threshold_next_iteration(trained: tuple[Path, RunDir]) -> None:
    """The AL loop's hooks: M(i−1)'s validation → calibration/ and thresholds.json of i."""
    from detloop.config import load_config
    from detloop.data.io import write_table
    from detloop.orchestrator.loops.steps import calibrate, threshold

    cfg_path, run = trained
    cfg = load_config(cfg_path)
    if not run.val_predictions_file(0).exists():
        assert cli("validate", str(cfg_path), "--run", str(run.path), "--no-compare") == 0
    pool = read_table(schema.PREDICTIONS, run.val_predictions_file(0))
    pool = pool.drop_columns([c for c in schema.CAL_COLS if c in pool.column_names])
    write_table(pool, schema.PREDICTIONS, run.predictions_file(1))
    info = calibrate(run, cfg, 1, seed=3)
    assert info["n_pairs"] > 0 and (run.calibration_dir(1) / "calibrators.json").exists()
    filled = read_table(schema.PREDICTIONS, run.predictions_file(1))
    assert filled["entropy_cal"].null_count == 0
    out = threshold(run, cfg, 1, seed=3)
    assert len(out["weights"]) == 2
    assert load_thresholds(run.thresholds_file(1)).seed == 3


@pytest.mark.slow
def test_thresholding_honours_checkpoint(trained: tuple[Path, RunDir], tmp_path: Path) -> None:
    """--checkpoint X: the validation predictions are X's (made anew when the stored ones came
    from another model), and a later call without it goes back to the run's own model."""
    import shutil

    from detloop.learners.train import train_model

    cfg, source = trained
    run = RunDir(tmp_path / "run")
    shutil.copytree(source.path, run.path)
    for it in run.iterations()[1:]:  # what other tests added: --checkpoint writes to the latest
        shutil.rmtree(run.iteration_dir(it))
    own = run.checkpoint(0)
    images = run.read_images()
    pool = images.filter(pc.equal(images["split"], "pool"))
    gt = run.read_gt()
    labels = gt.filter(pc.is_in(gt["image_id"], value_set=pool["image_id"].combine_chunks()))
    labels = labels.append_column("weight", pc.cast(pc.add(labels["iscrowd"], 1), "float32"))
    other = tmp_path / "other"
    settings = ExperimentConfig.model_validate(SETTINGS)
    train_model(settings, pool, labels, 10, other, seed=5, progress=False)

    def validated_by() -> str:
        return str(read_json(run.metrics_file(0))["validation"]["checkpoint"])

    assert (
        cli("validate", str(cfg), "--run", str(run.path), "--iteration", "0", "--no-compare") == 0
    )
    mine = read_table(schema.PREDICTIONS, run.val_predictions_file(0))
    assert validated_by() == str(own)
    plain = ["--set", "calibration.calibrate_classification=false"]  # thresholds, uncalibrated
    argv = ["threshold", str(cfg), "--run", str(run.path), *plain]
    assert cli(*argv, "--checkpoint", str(other)) == 0
    assert validated_by() == str(other)
    theirs = read_table(schema.PREDICTIONS, run.val_predictions_file(0))
    assert not theirs.select(["score", "x1"]).equals(mine.select(["score", "x1"]))
    before = run.val_predictions_file(0).stat().st_mtime_ns
    assert cli(*argv, "--checkpoint", str(other)) == 0
    assert validated_by() == str(other)  # X's predictions were current: not made again
    assert run.val_predictions_file(0).stat().st_mtime_ns == before
    assert cli(*argv, "--iteration", "0") == 0
    assert validated_by() == str(own)  # the run's own model again, not X's leftovers

    # calibrate: two checkpoints, two different calibrators (each fitted on its own validation)
    def fitted() -> dict[str, bytes]:  # every calibrator's file but the manifest and report
        files = sorted(run.calibration_dir(0).glob("*"))
        return {p.name: p.read_bytes() for p in files if p.is_file() and p.suffix != ".json"}

    cal_argv = ["calibrate", str(cfg), "--run", str(run.path)]
    assert cli(*cal_argv, "--iteration", "0") == 0
    ours = fitted()
    assert cli(*cal_argv, "--checkpoint", str(other)) == 0
    assert validated_by() == str(other)
    theirs = fitted()
    assert ours.keys() == theirs.keys() and ours != theirs
