"""Fast tests of the orchestrator's parts that need neither Ray nor a model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from detloop.config import build_config
from detloop.data.rundir import RunDir, RunsRoot
from detloop.orchestrator.engine.journal import Journal, Phase, iteration_phases
from detloop.orchestrator.engine.journaled import Handler, JournaledLoop, Paused, Step
from detloop.orchestrator.engine.runs import ray_job_id
from detloop.orchestrator.engine.tracking import LoopCallback, MlflowTracker, metric_key
from detloop.orchestrator.engine.workers import PredictJob, TrainJob, TrainOutcome
from detloop.seeding import derive_seed, rng


def test_iteration_phases() -> None:
    assert iteration_phases(0, calibrate=True, threshold=True, human=False) == [
        Phase.SELECT, Phase.LABEL, Phase.TRAIN, Phase.EVALUATE, Phase.LOG,
    ]  # fmt: skip
    assert iteration_phases(2, calibrate=True, threshold=False, human=True) == [
        Phase.PREDICT, Phase.CALIBRATE, Phase.SELECT, Phase.LABEL, Phase.WAIT_FOR_LABELS,
        Phase.TRAIN, Phase.EVALUATE, Phase.LOG,
    ]  # fmt: skip
    assert iteration_phases(1, calibrate=False, threshold=False, human=False, predict=False) == [
        Phase.SELECT, Phase.LABEL, Phase.TRAIN, Phase.EVALUATE, Phase.LOG,
    ]  # fmt: skip


def test_only_random_selects_without_predictions() -> None:
    from detloop.selectors.strategy import parse_strategy

    needs = {s: parse_strategy(s).needs_predictions
             for s in ("random", "perc_random", "entropy", "combo", "calib_albox")}  # fmt: skip
    assert needs == {"random": False, "perc_random": True, "entropy": True, "combo": True,
                     "calib_albox": True}  # fmt: skip


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


class _Workers:
    """Workers that only count their lifecycle (the toy loop computes nothing)."""

    def __init__(self) -> None:
        self.started = self.stopped = 0

    def start(self) -> None:
        self.started += 1

    def shutdown(self) -> None:
        self.stopped += 1

    def train(self, job: TrainJob) -> TrainOutcome:
        raise NotImplementedError

    def predict(self, job: PredictJob, *args: object, **kwargs: object) -> float:
        raise NotImplementedError


class _Calls(LoopCallback):
    def __init__(self) -> None:
        self.seen: list[object] = []

    def on_iteration(
        self, iteration: int, metrics: dict[str, float], artifacts: list[Path]
    ) -> None:
        self.seen.append((iteration, metrics))

    def on_end(self, status: str) -> None:
        self.seen.append(status)


class _Killed(Exception):
    pass


class _Toy(JournaledLoop):
    """The smallest loop on the base: two rounds of train → evaluate; ``pause`` makes round
    1's evaluation wait for the outside world."""

    pause = False

    def plan(self) -> list[Step]:
        return [Step(r, p) for r in range(2) for p in (Phase.TRAIN, Phase.EVALUATE)]

    def handlers(self) -> dict[Phase, Handler]:
        return {Phase.TRAIN: self._train, Phase.EVALUATE: self._evaluate}

    def _train(self, r: int) -> dict[str, object]:
        return {"seed": self.seed(r, "train")}

    def _evaluate(self, r: int) -> None:
        if r == 1 and self.pause:
            raise Paused
        self.notify_iteration(r, {"round": float(r)}, [])


def _toy(run: RunDir, workers: _Workers, calls: _Calls, pause: bool = False) -> _Toy:
    def kill(point: str) -> None:
        raise _Killed(point)

    cfg = build_config({"name": "x", "fault": {"kill_at": ["0:evaluate"]}})
    loop = _Toy(run, cfg, [calls], workers_factory=lambda c: workers, fault_action=kill)
    loop.pause = pause
    return loop


def test_journaled_loop_runs_its_plan_resumes_and_pauses(tmp_path: Path) -> None:
    run, workers, calls = _run(tmp_path), _Workers(), _Calls()
    with pytest.raises(_Killed, match="0:evaluate"):  # the fault fires once, at its point
        _toy(run, workers, calls).execute()
    assert (run.path / ".fault_0_evaluate").exists()
    assert calls.seen == [(0, {"round": 0.0}), "FAILED"]
    assert _toy(run, workers, calls, pause=True).execute() == "paused"
    assert calls.seen[2:] == ["SCHEDULED"]
    assert _toy(run, workers, calls).execute() == "done"
    assert calls.seen[3:] == [(1, {"round": 1.0}), "FINISHED"]
    assert (workers.started, workers.stopped) == (3, 3)
    meta = Journal(run).meta
    done = [(h["iteration"], h["phase"]) for h in meta["history"] if h["ended"]]
    assert done == [(0, "train"), (0, "evaluate"), (1, "train"), (1, "evaluate"), (1, "done")]
    assert meta["seeds"] == {f"{r}/train": derive_seed(0, r, "train") for r in (0, 1)}
    assert [h["seed"] for h in meta["history"] if h["phase"] == "train"] == [
        derive_seed(0, r, "train") for r in (0, 1)
    ]
    # a finished run starts no workers
    assert _toy(run, workers, calls).execute() == "done" and workers.started == 3
    assert _toy(run, workers, calls).resume_command == f"detloop resume {run.path}"


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
    metrics = {"map": 0.5, "labeled_images": 10, "test_ap/bag & purse": 0.25}
    first.on_iteration(0, metrics, [tmp_path / "sel.txt"])
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
    # a class name MLflow would refuse in a key is logged under the key it accepts
    hist = client.get_metric_history(runs[0].info.run_id, "test_ap/bag _ purse")
    assert [(m.step, m.value) for m in hist] == [(0, 0.25)]
    assert runs[0].data.params["al.strategy"] == "entropy"
    assert runs[0].info.status == "FINISHED"
    arts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "iter_0000")]
    assert arts == ["iter_0000/sel.txt"]


def test_a_dead_ray_address_fails_in_seconds_and_names_it() -> None:
    import socket
    import time

    from detloop.orchestrator.engine.actors import check_reachable

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 5
    with socket.socket() as server:  # a listening port passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")
    for left_to_ray in (None, "auto", "ray://10.0.0.1:10001"):
        check_reachable(left_to_ray)


@pytest.mark.timeout(60)  # the bug this guards against blocks the second copier forever
def test_loops_that_copy_the_warmup_never_hold_up_the_next(
    digits_tiny_run: RunDir, tmp_path: Path
) -> None:
    """The first loop computes iteration 0 under the lock; every later one copies from the
    complete cache and lets go of the lock at once (one that kept it to its end serialised a
    grid's third strategy behind the second's whole run)."""
    import fcntl

    from detloop.orchestrator.loops.warmup import WarmupCache

    run = digits_tiny_run
    cfg = build_config({"runs_root": str(tmp_path / "runs")})
    src = tmp_path / "outputs"
    (src / "checkpoint").mkdir(parents=True)
    (src / "checkpoint" / "model.pt").write_bytes(b"weights")
    (src / "selection.parquet").write_bytes(b"selection")
    run.metrics_file(0).parent.mkdir(parents=True, exist_ok=True)
    run.metrics_file(0).write_text("{}")
    run.val_predictions_file(0).write_bytes(b"predictions")

    first = WarmupCache.for_run(run, cfg, {"budget": 5})
    assert not first.restore_selection(tmp_path / "nothing")  # computes: holds the lock
    first.store_selection(src / "selection.parquet")
    first.store_checkpoint(src / "checkpoint")
    first.store_evaluation(run, 0)
    assert first.complete

    copiers = [WarmupCache.for_run(run, cfg, {"budget": 5}) for _ in range(3)]
    for i, cache in enumerate(copiers):  # none closed: each still alive when the next comes
        assert cache.restore_selection(tmp_path / f"sel{i}.parquet")
        assert cache.restore_checkpoint(tmp_path / f"ckpt{i}")
        assert (tmp_path / f"ckpt{i}" / "model.pt").read_bytes() == b"weights"
    path = copiers[0]._dir()
    assert path is not None
    with open(path.parent / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a copier still held it


def test_warmup_key_follows_the_ground_truth_boxes(digits_tiny_run: RunDir) -> None:
    """Same images, same number of boxes, one box moved (e.g. a corrected label set): another
    key, so a teacher trained on other labels is never reused."""
    import pyarrow as pa

    from detloop.orchestrator.loops.warmup import warmup_key

    run = digits_tiny_run
    cfg = build_config({})
    key = warmup_key(run, cfg, {})
    assert warmup_key(run, cfg, {}) == key  # deterministic
    gt = run.read_gt()
    x1 = gt["x1"].to_numpy().copy()
    x1[0] += 1.0
    run.write_gt(gt.set_column(gt.schema.get_field_index("x1"), "x1", pa.array(x1, gt["x1"].type)))
    assert run.read_gt().num_rows == gt.num_rows
    assert warmup_key(run, cfg, {}) != key


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("test_ap/person", "test_ap/person"),
        ("test_ap/traffic light", "test_ap/traffic light"),
        ("test_ap/café-au_lait.v2", "test_ap/café-au_lait.v2"),
        ("test_ap/bag & purse (leather)", "test_ap/bag _ purse _leather_"),
        ("pseudo_precision/it's:odd", "pseudo_precision/it_s_odd"),
        ("test_ap/..", "test_ap_.."),
        ("test_ap/a//b", "test_ap_a__b"),
        ("test_ap/", "test_ap_"),
    ],
)
def test_metric_keys_are_ones_mlflow_accepts(name: str, key: str) -> None:
    """Per-class metrics carry the dataset's class names; MLflow refuses most punctuation and
    path tricks in a key: each becomes ``_``, the key MLflow's own validator accepts."""
    from mlflow.utils.validation import _validate_metric_name

    assert metric_key(name) == key
    _validate_metric_name(metric_key(name))
