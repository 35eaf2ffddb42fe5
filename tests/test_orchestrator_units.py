"""Fast tests of the orchestrator's parts that need neither Ray nor a model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from detloop.config import build_config
from detloop.data.rundir import RunDir, RunsRoot
from detloop.orchestrator.engine.journal import Journal, Phase, iteration_phases
from detloop.orchestrator.engine.runs import ray_job_id
from detloop.orchestrator.engine.tracking import MlflowTracker
from detloop.seeding import derive_seed, rng


def test_iteration_phases() -> None:
    assert iteration_phases(0, calibrate=True, threshold=True, human=False) == [
        Phase.SELECT, Phase.LABEL, Phase.TRAIN, Phase.EVALUATE, Phase.LOG,
    ]  # fmt: skip
    assert iteration_phases(2, calibrate=True, threshold=False, human=True) == [
        Phase.PREDICT, Phase.CALIBRATE, Phase.SELECT, Phase.LABEL, Phase.WAIT_FOR_LABELS,
        Phase.TRAIN, Phase.EVALUATE, Phase.LOG,
    ]  # fmt: skip


def _run(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_meta({"name": "x"})
    return run


def test_journal_records_and_survives_a_reload(tmp_path: Path) -> None:
    run = _run(tmp_path)
    j = Journal(run)
    j.start(0, Phase.SELECT)
    assert not j.is_completed(0, Phase.SELECT)
    j.complete(0, Phase.SELECT, selected=3)
    j.start(0, Phase.LABEL)  # interrupted here
    again = Journal(run)
    assert again.is_completed(0, Phase.SELECT)
    assert not again.is_completed(0, Phase.LABEL)
    assert again.position is not None and again.position.phase == Phase.LABEL
    assert again.position.status == "started"
    assert [h["selected"] for h in again.history if h.get("ended")] == [3]


def test_iteration_overhead_uses_the_last_attempt_of_each_phase(tmp_path: Path) -> None:
    j = Journal(_run(tmp_path))
    j.meta["history"] = [
        {"iteration": 1, "phase": "train", "started": 0.0, "ended": 5.0, "compute": 4.0},
        {"iteration": 1, "phase": "train", "started": 6.0, "ended": 16.0, "compute": 9.5},
        {"iteration": 1, "phase": "log", "started": 16.0, "ended": 17.0},
        {"iteration": 2, "phase": "train", "started": 20.0, "ended": None},
    ]
    o = j.iteration_overhead(1)
    assert o == {"wall": 17.0, "compute": 9.5, "overhead": 7.5}
    assert j.iteration_overhead(2) == {"wall": 0.0, "compute": 0.0, "overhead": 0.0}


def test_derived_seeds_depend_on_every_part() -> None:
    base = derive_seed(0, 1, "select")
    assert base == derive_seed(0, 1, "select")
    assert len({base, derive_seed(1, 1, "select"), derive_seed(0, 2, "select"),
                derive_seed(0, 1, "train")}) == 4  # fmt: skip
    assert rng(0, 1, "x").integers(1 << 30) == rng(0, 1, "x").integers(1 << 30)


def test_ray_job_id_reads_the_job_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_job_id() is None
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_1"}}'
    )
    assert ray_job_id() == "raysubmit_1"


def test_mlflow_tracker_reattaches_to_one_run(tmp_path: Path) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    cfg = build_config({"name": "exp", "runs_root": str(tmp_path)})
    run = RunsRoot(tmp_path).run("exp", "entropy-s0")
    run.path.mkdir(parents=True)
    meta: dict[str, object] = {}
    first = MlflowTracker(cfg, {"strategy": "entropy"})
    first.on_start(run, meta)
    (tmp_path / "sel.txt").write_text("x")
    first.on_iteration(0, {"map": 0.5, "labeled_images": 10}, [tmp_path / "sel.txt"])
    # A crash before run.json recorded the id: the tag on the MLflow run finds it again.
    second = MlflowTracker(cfg, {"strategy": "entropy"})
    second.on_start(run, {})
    second.on_iteration(1, {"map": 0.6, "labeled_images": 20}, [])
    second.on_end("FINISHED")
    assert second.run_id == first.run_id == meta["mlflow_run_id"]
    client = MlflowClient(tracking_uri=RunsRoot(tmp_path).tracking_uri)
    exp = client.get_experiment_by_name("exp")
    assert exp is not None and exp.artifact_location.startswith("file://")
    assert str(tmp_path / "mlartifacts") in exp.artifact_location
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    hist = client.get_metric_history(runs[0].info.run_id, "map")
    assert [(m.step, m.value) for m in hist] == [(0, 0.5), (1, 0.6)]
    assert runs[0].data.params["al.strategy"] == "entropy"
    assert runs[0].info.status == "FINISHED"
    arts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "iter_0000")]
    assert arts == ["iter_0000/sel.txt"]
