"""``detloop glc`` (ALGORITHMS §11.5) end to end on digits-det tiny: a run with 8 labeled pool
images and a teacher checkpoint of iteration 0 (an untrained tiny model whose class prior is
raised so that it detects with scores above 0.1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from detloop.cli.main import main
from detloop.config import build_config
from detloop.data import schema
from detloop.data.io import read_json, read_table
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir
from detloop.learners.checkpoint import write_checkpoint
from detloop.learners.model import _predict_conv, build_model
from detloop.orchestrator.evaluation.glc import run_glc
from detloop.selectors.ssl_glc_stress import KINDS, glc_recovery

torch.set_num_threads(1)
CONFIG = "model: {preset: tiny, uncertainty: baseline}\npredict: {batch_size: 8}\n"


@pytest.fixture
def glc_run(digits_tiny_run: RunDir, tmp_path: Path) -> tuple[RunDir, Path]:
    """(run with labeled images and a teacher, config file)."""
    run = digits_tiny_run
    pool = PoolState.load(run)
    pool.reveal(run.read_gt(), pool.ids("unlabeled")[:8], iteration=0).save(run)
    cfg = build_config({"model": {"preset": "tiny", "uncertainty": "baseline"}})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10)
    with torch.no_grad():
        _predict_conv(model.class_net).bias.fill_(-1.5)  # type: ignore[union-attr]  # p ≈ 0.18
    write_checkpoint(run.checkpoint(0), model.state_dict(), {"model_spec": model.spec.to_json()})
    config = tmp_path / "glc.yaml"
    config.write_text(CONFIG)
    return run, config


def _pool_tables(run: RunDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.pool_dir.glob("*.parquet"))}


def test_glc_writes_a_new_corrected_label_set_and_refuses_a_used_tag(
    glc_run: tuple[RunDir, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = glc_run
    before = _pool_tables(run)
    assert main(["glc", str(config), "--run", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "glc i0: 8 labeled images" in out
    folder = run.glc_dir("i0")
    assert sorted(p.name for p in folder.iterdir()) == [
        "labels.parquet", "predictions.parquet", "provenance.parquet", "removed.parquet",
        "report.json",
    ]  # fmt: skip
    assert _pool_tables(run) == before  # the run's own tables are never touched
    doc = read_json(folder / "report.json")
    labels = read_table(schema.LABELS, folder / "labels.parquet")
    preds = read_table(schema.PREDICTIONS, folder / "predictions.parquet")
    c = doc["counts"]
    assert doc["n_images"] == 8 and doc["iteration"] == 0 and doc["min_score"] == 0.1
    assert doc["checkpoint"] == "iter_0000/checkpoint"  # relative: no machine path
    assert doc["n_input_boxes"] == run.read_labels().num_rows
    assert c["kept"] + c["noisy"] + c["md"] == labels.num_rows == doc["n_labels"]
    assert c["kept"] + c["noisy"] + c["mistakes"] == doc["n_input_boxes"]
    assert c["md"] > 0 and preds.num_rows == doc["n_predictions"] > 0
    assert float(pc.min(preds["score"]).as_py()) >= np.float32(0.1)
    assert preds["cons_iou"].null_count == 0 and preds["cons_cls"].null_count == 0
    old_ids = set(run.read_labels()["box_id"].to_pylist()) | set(
        run.read_gt()["box_id"].to_pylist()
    )
    new_ids = labels["box_id"].to_pylist()
    assert len(set(new_ids)) == len(new_ids) and not old_ids & set(new_ids)
    # a used tag is refused, whole and without a traceback; the first set stays as it was
    report = (folder / "report.json").read_bytes()
    assert main(["glc", str(config), "--run", str(run.path), "--tag", "i0"]) == 2
    err = capsys.readouterr().err
    assert "exists already" in err and "Traceback" not in err
    assert (folder / "report.json").read_bytes() == report
    assert [p.name for p in run.glc_dir("x").parent.iterdir()] == ["i0"]  # no temp folder left


def test_glc_stress_corrupts_then_measures_the_recovery(
    glc_run: tuple[RunDir, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = glc_run
    n = run.read_labels().num_rows
    assert main(["glc", str(config), "--run", str(run.path), "--stress", "3"]) == 0
    out = capsys.readouterr().out
    assert "stress seed 3: md_precision" in out and "noisy_recall" in out
    folder = run.glc_dir("i0-stress3")
    doc = read_json(folder / "report.json")
    corrupted = read_table(schema.GT, folder / "corrupted_gt.parquet")
    changes = pq.read_table(folder / "stress_changes.parquet")
    count = {d["values"]: d["counts"] for d in pc.value_counts(changes["kind"]).to_pylist()}
    assert set(count) <= set(KINDS) and count["dropped"] == round(0.2 * n)
    assert corrupted.num_rows == n - count["dropped"] + count.get("added", 0)
    stress = doc["stress"]
    assert stress["seed"] == 3 and stress["n_original_boxes"] == n
    assert doc["n_input_boxes"] == corrupted.num_rows
    assert set(stress["recovery"]) == {
        "md_precision", "md_recall", "mistakes_precision", "mistakes_recall",
        "noisy_precision", "noisy_recall", "noisy_iou_before", "noisy_iou_after",
        "n_dropped", "n_moved", "n_added",
    }  # fmt: skip
    assert stress["recovery"]["n_dropped"] == count["dropped"]
    # the library call (what a bench uses) is deterministic: same seed, same corrected set
    cfg = build_config({"model": {"preset": "tiny", "uncertainty": "baseline"}})
    again = run_glc(run, cfg, stress_seed=3, tag="again")
    assert again.result.labels.equals(read_table(schema.LABELS, folder / "labels.parquet"))
    assert again.doc["stress"]["recovery"] == stress["recovery"]
    recovery = glc_recovery(again.result, changes)
    assert recovery["n_moved"] == stress["recovery"]["n_moved"]


def test_glc_rules_and_thresholds_from_the_command_line(
    glc_run: tuple[RunDir, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = glc_run
    args = ["--rules", "md,mistakes", "--min-score", "0.15", "--iou-consist", "0.8", "--tag", "t"]
    assert main(["glc", str(config), "--run", str(run.path), *args]) == 0
    doc = read_json(run.glc_dir("t") / "report.json")
    preds = read_table(schema.PREDICTIONS, run.glc_dir("t") / "predictions.parquet")
    assert doc["min_score"] == 0.15 and doc["params"]["iou_consist"] == 0.8
    assert doc["params"]["md"] and doc["params"]["mistakes"] and not doc["params"]["noisy"]
    assert doc["params"]["correct_score"] == 0.4  # not given: §11.5's
    assert doc["counts"]["noisy"] == 0 and doc["counts"]["md"] > 0
    assert preds.num_rows > 0 and float(pc.min(preds["score"]).as_py()) >= np.float32(0.15)


def test_glc_bad_input_exits_2_without_a_traceback(
    glc_run: tuple[RunDir, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, config = glc_run
    cases = [
        (["--run", str(tmp_path / "nowhere")], "does not exist"),
        (["--run", str(run.path), "--iteration", "5"], "iteration 5 has no checkpoint"),
        (["--run", str(run.path), "--tag", "../up"], "must match"),
        (["--run", str(run.path), "--iteration", "-1"], "must be >= 0"),
        (["--run", str(run.path), "--rules", "md,nosy"], "did you mean 'noisy'"),
        (["--run", str(run.path), "--rules", ","], "name at least one of md, mistakes, noisy"),
        (["--run", str(run.path), "--min-score", "1.5"], "--min-score must be in [0, 1]"),
        (["--run", str(run.path), "--correct-score", "-0.1"], "--correct-score must be in"),
    ]
    for args, message in cases:
        assert main(["glc", str(config), *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    empty = RunDir(tmp_path / "empty")
    empty.path.mkdir()
    assert main(["glc", str(config), "--run", str(empty.path)]) == 2
    assert "no imported data" in capsys.readouterr().err
    assert not (run.path / "glc").exists()
