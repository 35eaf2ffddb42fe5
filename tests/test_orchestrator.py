"""The active-learning loop end to end: real Ray on loopback, real MLflow (SQLite), the tiny
model on digits-det tiny. Driver kills are real SIGKILLs of a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import ci_overrides
from detloop.cli.main import main
from detloop.data import schema
from detloop.data.io import read_table
from detloop.data.rundir import RunDir, RunsRoot

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"


def labeled_ids(run: RunDir) -> list[str]:
    images = run.read_images()
    mask = pc.and_(pc.equal(images["state"], "labeled"), pc.equal(images["split"], "pool"))
    return sorted(images.filter(mask)["image_id"].to_pylist())


def selected_per_iteration(run: RunDir) -> list[list[str]]:
    out = []
    for it in run.iterations():
        sel = read_table(schema.SELECTION, run.selection_file(it))
        out.append(sorted(sel.filter(sel["selected"])["image_id"].to_pylist()))
    return out


def mlflow_runs(runs_root: Path, experiment: str = "ci") -> list[object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=RunsRoot(runs_root).tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return list(client.search_runs([exp.experiment_id]))


@pytest.fixture(scope="module")
def reference_run(
    digits_tiny: Path, local_ray: str, tmp_path_factory: pytest.TempPathFactory
) -> RunDir:
    """An uninterrupted run of configs/ci.yaml, the baseline for the fault tests."""
    root = tmp_path_factory.mktemp("runs_ref")
    assert main(["run", str(CI_CONFIG), *ci_overrides(digits_tiny, root)]) == 0
    return RunsRoot(root).run("ci", "entropy-s0")


def test_run_end_to_end(reference_run: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    run = reference_run
    meta = run.read_meta()
    sizes = meta["budget_sizes"]
    n_iter = 2
    assert meta["journal"]["phase"] == "done"
    # The labeled set grows by the budget of each iteration, nothing is selected twice.
    picks = selected_per_iteration(run)
    assert [len(p) for p in picks] == sizes[:n_iter]
    flat = [i for p in picks for i in p]
    assert len(flat) == len(set(flat))
    assert labeled_ids(run) == sorted(flat)
    labels = run.read_labels()
    assert set(labels["image_id"].to_pylist()) <= set(flat)
    # Predictions of iteration 1 cover the unlabeled pool only.
    preds = read_table(schema.PREDICTIONS, run.predictions_file(1))
    assert not set(preds["image_id"].to_pylist()) & set(picks[0])
    # MLflow: one run for the loop, metrics at each step.
    runs = mlflow_runs(run.path.parents[1])
    assert len(runs) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=RunsRoot(run.path.parents[1]).tracking_uri)
    hist = client.get_metric_history(runs[0].info.run_id, "labeled_images")  # type: ignore[attr-defined]
    assert [m.step for m in hist] == [0, 1]
    assert [m.value for m in hist] == [sizes[0], sizes[0] + sizes[1]]
    for key in ("map", "map50", "labeled_fraction", "selected"):
        assert len(client.get_metric_history(runs[0].info.run_id, key)) == 2  # type: ignore[attr-defined]
    # what the decoding bounds changed is logged per iteration, never silently (pool prediction
    # from iteration 1, evaluation at every iteration)
    for key in ("predict_capped_al_std", "predict_capped_mc_std", "predict_dropped_boxes"):
        hist = client.get_metric_history(runs[0].info.run_id, key)  # type: ignore[attr-defined]
        assert [m.step for m in hist] == [1] and hist[0].value >= 0
    for key in ("evaluate_capped_al_std", "evaluate_dropped_boxes"):
        assert len(client.get_metric_history(runs[0].info.run_id, key)) == 2  # type: ignore[attr-defined]

    capsys.readouterr()
    assert main(["status", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "phase: done" in out
    assert f"labeled {sum(sizes[:n_iter])}" in out
    assert main(["report", str(run.path), "--out", str(run.path / "report")]) == 0
    assert (run.path / "report" / "al_curves.png").stat().st_size > 1000


def test_rerun_resumes_and_selects_nothing_twice(
    reference_run: RunDir, digits_tiny: Path, local_ray: str, tmp_path: Path
) -> None:
    """`detloop run` SIGKILLed mid-iteration — iteration 1's labels written, its images table
    not yet — then the same command again: it resumes the run, labels nothing twice and ends
    with the reference run's selections; a third `run` of the finished run changes nothing."""
    args = ci_overrides(
        digits_tiny, tmp_path, f"ray.address={local_ray}", "fault.kill_at=[1:label:mid]"
    )
    command = ["run", str(CI_CONFIG), *args]
    killed = _driver(command, local_ray)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = RunsRoot(tmp_path).run("ci", "entropy-s0")
    assert (run.path / ".fault_1_label_mid").exists()
    journal = run.read_meta()["journal"]
    assert journal == {"iteration": 1, "phase": "label", "status": "started"}
    assert labeled_ids(run) == selected_per_iteration(reference_run)[0]
    rerun = _driver(command, local_ray)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert run.read_meta()["journal"]["phase"] == "done"
    picks = selected_per_iteration(run)
    assert picks == selected_per_iteration(reference_run)
    flat = [i for p in picks for i in p]
    assert len(flat) == len(set(flat)) and labeled_ids(run) == sorted(flat)
    labels = run.read_labels()
    keys = list(zip(labels["image_id"].to_pylist(), labels["box_id"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == reference_run.read_labels().num_rows
    assert len(mlflow_runs(tmp_path)) == 1
    again = _driver(command, local_ray)
    assert again.returncode == 0, again.stderr[-3000:]
    assert selected_per_iteration(run) == picks and run.read_labels().equals(labels)
    assert len(mlflow_runs(tmp_path)) == 1


def test_predict_worker_killed_mid_shard(
    reference_run: RunDir, digits_tiny: Path, tmp_path: Path
) -> None:
    args = ci_overrides(digits_tiny, tmp_path, "fault.kill_worker_at_shard=1")
    assert main(["run", str(CI_CONFIG), *args]) == 0
    run = RunsRoot(tmp_path).run("ci", "entropy-s0")
    assert list(run.path.glob(".fault_worker_*")), "the worker fault did not fire"
    preds = read_table(schema.PREDICTIONS, run.predictions_file(1))
    keys = list(zip(preds["image_id"].to_pylist(), preds["det_id"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys))
    ref = read_table(schema.PREDICTIONS, reference_run.predictions_file(1))
    assert preds.select(["image_id", "det_id", "class_id"]).equals(
        ref.select(["image_id", "det_id", "class_id"])
    )
    for col in ("score", "x1", "y2", "entropy", "al_x1", "mc_y2"):  # float32 noise at most
        np.testing.assert_allclose(preds[col].to_numpy(), ref[col].to_numpy(), rtol=1e-4)
    assert labeled_ids(run) == labeled_ids(reference_run)


def _driver(args: list[str], local_ray: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "detloop.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_driver_sigkill_and_resume(
    reference_run: RunDir, digits_tiny: Path, local_ray: str, tmp_path: Path
) -> None:
    """Killed after phases and once mid-phase; each resume continues where it stopped."""
    kills = ["0:train", "1:select", "1:label:mid"]
    args = ci_overrides(
        digits_tiny,
        tmp_path,
        f"ray.address={local_ray}",
        "fault.kill_at=[" + ",".join(kills) + "]",
    )
    first = _driver(["run", str(CI_CONFIG), *args], local_ray)
    assert first.returncode == -9, first.stderr[-2000:]
    run = RunsRoot(tmp_path).run("ci", "entropy-s0")
    for _ in kills[1:]:
        res = _driver(["resume", str(run.path)], local_ray)
        assert res.returncode == -9, res.stderr[-2000:]
    final = _driver(["resume", str(run.path)], local_ray)
    assert final.returncode == 0, final.stderr[-3000:]
    assert sorted(p.name for p in run.path.glob(".fault_*")) == sorted(
        ".fault_" + k.replace(":", "_") for k in kills
    )
    assert labeled_ids(run) == labeled_ids(reference_run)
    assert selected_per_iteration(run) == selected_per_iteration(reference_run)
    labels = run.read_labels()
    keys = list(zip(labels["image_id"].to_pylist(), labels["box_id"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys))
    assert labels.num_rows == reference_run.read_labels().num_rows
    assert len(mlflow_runs(tmp_path)) == 1


def test_write_failure_keeps_state_and_resumes(
    reference_run: RunDir,
    digits_tiny: Path,
    local_ray: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failing write of the images table in iteration 1's label phase."""
    from detloop.data import io

    real = pq.write_table
    first_budget = reference_run.read_meta()["budget_sizes"][0]

    def flaky(table: pa.Table, where: object, *a: object, **k: object) -> None:
        if "state" in table.column_names:
            labeled = pc.and_(pc.equal(table["state"], "labeled"), pc.equal(table["split"], "pool"))
            if pc.sum(labeled).as_py() > first_budget:  # iteration 1's label phase
                real(table, where, *a, **k)  # the temp file is complete...
                raise OSError(28, "No space left on device")  # ...but the replace never comes
        real(table, where, *a, **k)

    monkeypatch.setattr(io.pq, "write_table", flaky)
    assert main(["run", str(CI_CONFIG), *ci_overrides(digits_tiny, tmp_path)]) == 1
    run = RunsRoot(tmp_path).run("ci", "entropy-s0")
    assert labeled_ids(run) == selected_per_iteration(reference_run)[0]  # the previous file
    assert not list(run.pool_dir.glob(".*.tmp"))
    monkeypatch.setattr(io.pq, "write_table", real)
    assert main(["resume", str(run.path)]) == 0
    assert labeled_ids(run) == labeled_ids(reference_run)
    assert len(mlflow_runs(tmp_path)) == 1
