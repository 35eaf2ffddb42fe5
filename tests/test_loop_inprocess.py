"""The active-learning loop in-process, without Ray or a model: fake workers (the ``Workers``
protocol as plain classes) drive a run shaped like configs/ci.yaml through the ``JournaledLoop``
state machine on digits-det tiny. Then, for every step of the plan and every way that step can
be interrupted (half-way at its fault point, in a worker, after its work but before the journal
records it, after it completed), a new loop resumes the run from the state the uninterrupted run
had before the step, and must leave it as the uninterrupted run did: the same selections,
labels, image states, predictions, models and metrics.

The fakes are deterministic functions of what the loop hands them: training writes a
checkpoint directory whose ``model.pt`` names the labeled images and the seed, and prediction
turns each image's ground truth into detections jittered by a hash of (weights, image id), so a
resume that labeled or selected anything differently changes every later prediction.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import ci_overrides
from detloop.config import ExperimentConfig, load_config
from detloop.data import schema
from detloop.data.digits import digits_source
from detloop.data.io import read_json, read_table
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.journal import Phase
from detloop.orchestrator.engine.journaled import Handler, Step
from detloop.orchestrator.engine.runs import create_run, stored_config
from detloop.orchestrator.engine.tracking import LoopCallback
from detloop.orchestrator.engine.workers import (
    PredictJob,
    ShardResult,
    TrainJob,
    TrainOutcome,
    Workers,
)
from detloop.orchestrator.loops.active_learning import ActiveLearningLoop

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"


class Interrupted(Exception):
    """What the tests raise where a real run would be killed."""


# ---- fakes -----------------------------------------------------------------------------------
class FakeWorkers:
    """``Workers`` in-process. ``fail`` holds ``train`` and/or ``predict``: that method raises
    once, half-way (a checkpoint without metadata; after the first shard was handed over), as
    a crashed worker would."""

    def __init__(self, run: RunDir, fail: set[str] | None = None) -> None:
        self.run = run
        self.fail = fail if fail is not None else set()
        self.started = 0
        self.stopped = 0
        self.calls: list[str] = []
        self._gt: pa.Table | None = None

    def _maybe_fail(self, what: str) -> None:
        if what in self.fail:
            self.fail.discard(what)
            raise Interrupted(f"{what} worker died")

    def start(self) -> None:
        self.started += 1

    def shutdown(self) -> None:
        self.stopped += 1

    def train(self, job: TrainJob) -> TrainOutcome:
        self.calls.append("train")
        images, labels, num_classes, seed = job.images, job.labels, job.num_classes, job.seed
        ckpt = Path(job.out_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        model = {
            "images": sorted(images["image_id"].to_pylist()),
            "boxes": labels.num_rows,
            "num_classes": num_classes,
            "seed": seed,
        }
        (ckpt / "model.pt").write_bytes(json.dumps(model, sort_keys=True).encode())
        self._maybe_fail("train")
        meta = {"format": "detloop-checkpoint", "version": 1, "steps": 4, "num_classes": 10}
        (ckpt / "metadata.json").write_text(json.dumps(meta))
        return TrainOutcome(ckpt, steps=4, final_loss=1.5, seconds=0.01, monitors={"box_rmse": 2.0})

    def _shard(self, digest: bytes, ids: list[str]) -> pa.Table:
        """One detection per ground-truth box (jittered by up to 2 px, the right class 4 times
        in 5) and one false positive per image; a function of the model and the images."""
        if self._gt is None:
            self._gt = self.run.read_gt()
        gt = self._gt.filter(pc.is_in(self._gt["image_id"], value_set=pa.array(ids)))
        rng = np.random.default_rng(zlib.crc32(digest + "\n".join(ids).encode()))
        n_box, n = gt.num_rows, gt.num_rows + len(ids)
        true_cls = gt["class_id"].to_numpy()
        cls = np.where(rng.random(n_box) < 0.8, true_cls, rng.integers(0, 10, n_box))
        xy = rng.uniform(0, 100, (len(ids), 2))
        corners = np.concatenate(
            [
                np.stack([gt[c].to_numpy() for c in schema.COORDS], 1)
                + rng.uniform(-2, 2, (n_box, 4)),
                np.concatenate([xy, xy + 12.0], 1),
            ]
        )
        image_ids = np.array(gt["image_id"].to_pylist() + ids, dtype=object)
        order = np.argsort(image_ids, kind="stable")
        image_ids = image_ids[order]
        starts = np.searchsorted(image_ids, image_ids, side="left")
        f32 = np.float32
        cols: dict[str, Any] = {
            "image_id": pa.array(image_ids, pa.string()),
            "det_id": pa.array((np.arange(n) - starts).astype(np.int32)),
            "class_id": pa.array(np.concatenate([cls, rng.integers(0, 10, len(ids))])[order]),
            "score": pa.array(
                np.concatenate([rng.uniform(0.3, 1, n_box), rng.uniform(0.05, 0.5, len(ids))])[
                    order
                ].astype(f32)
            ),
            **{c: pa.array(corners[order, k].astype(f32)) for k, c in enumerate(schema.COORDS)},
            "entropy": pa.array(rng.uniform(0, 3, n).astype(f32)),
            "mc_class": pa.array(rng.uniform(0, 0.2, n).astype(f32)),
            **{c: pa.array(rng.gamma(2.0, 2.0, n).astype(f32)) for c in schema.AL_COLS},
            **{c: pa.array(rng.gamma(2.0, 1.0, n).astype(f32)) for c in schema.MC_COLS},
            "logits": pa.nulls(n, pa.list_(pa.float32())),
            "mc_class_vec": pa.nulls(n, pa.list_(pa.float32())),
        }
        cols["class_id"] = cols["class_id"].cast(pa.int32())
        return schema.validate_table(pa.table(cols), schema.PREDICTIONS)

    def predict(
        self,
        job: PredictJob,
        on_result: Callable[[ShardResult], None],
        fault_marker: Callable[[int], str | None] | None = None,
    ) -> float:
        self.calls.append("predict")
        digest = hashlib.sha256(job.weights).digest()
        for sid, images, _seed in job.shards:
            table = self._shard(digest, images["image_id"].to_pylist())
            on_result(ShardResult(job.key, sid, table, 0.01, {"dropped_boxes": 0}))
            self._maybe_fail("predict")
        return 0.01 * len(job.shards)


def _conforms(workers: FakeWorkers) -> Workers:
    return workers  # mypy: the fake satisfies the protocol


class Recorder(LoopCallback):
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def on_start(self, run: RunDir, meta: dict[str, Any]) -> None:
        self.events.append(("start", run.name))

    def on_iteration(
        self, iteration: int, metrics: dict[str, float], artifacts: list[Path]
    ) -> None:
        self.events.append(("iteration", iteration))

    def on_end(self, status: str) -> None:
        self.events.append(("end", status))


# ---- loops under test ------------------------------------------------------------------------
class Stopped(Exception):
    """Raised where a test stops a loop on purpose."""


class TestLoop(ActiveLearningLoop):
    """The AL loop with test instrumentation: ``snapshots`` copies the run directory before
    each step (what a run killed there leaves on disk); ``crash_after`` raises after that
    step's handler did its work but before the journal records it (the worst moment: every
    output written, the step not completed); ``stop_at`` stops the loop before that step."""

    __test__ = False

    def __init__(
        self,
        run: RunDir,
        cfg: ExperimentConfig,
        workers: FakeWorkers,
        callbacks: list[LoopCallback] | None = None,
        *,
        snapshots: Path | None = None,
        crash_after: Step | None = None,
        stop_at: Step | None = None,
    ) -> None:
        super().__init__(run, cfg, callbacks or [], lambda _: workers, fault_action=_interrupt)
        self.snapshots = snapshots
        self.crash_after = crash_after
        self.stop_at = stop_at

    def run_step(self, step: Step) -> None:
        if step == self.stop_at:
            raise Stopped(f"{step.iteration}:{step.phase}")
        if self.snapshots is not None:
            shutil.copytree(self.run.path, self.snapshots / f"{step.iteration}_{step.phase}")
        super().run_step(step)

    def handlers(self) -> Mapping[Phase, Handler]:
        out = dict(super().handlers())
        if self.crash_after is not None:
            phase = self.crash_after.phase
            out[phase] = self._crashing(self.crash_after, out[phase])
        return out

    @staticmethod
    def _crashing(step: Step, handler: Handler) -> Handler:
        def run(iteration: int) -> dict[str, Any] | None:
            info = handler(iteration)
            if iteration == step.iteration:
                raise Interrupted(f"crash after the work of {step.iteration}:{step.phase}")
            return info

        return run


def _interrupt(point: str) -> None:
    raise Interrupted(point)


#: The plan of configs/ci.yaml (entropy, two iterations), import first.
PLAN = [
    Step(0, Phase.IMPORT),
    *(Step(0, p) for p in (Phase.SELECT, Phase.LABEL, Phase.TRAIN, Phase.EVALUATE, Phase.LOG)),
    Step(1, Phase.PREDICT),
    *(Step(1, p) for p in (Phase.SELECT, Phase.LABEL, Phase.TRAIN, Phase.EVALUATE, Phase.LOG)),
]
#: Phases that inject a fault half-way (``ITERATION:PHASE:mid``) and those that use workers.
MID = {Phase.LABEL, Phase.PREDICT, Phase.EVALUATE}
WORKER = {Phase.TRAIN: "train", Phase.PREDICT: "predict", Phase.EVALUATE: "predict"}
#: Validation images: two shards of configs/ci.yaml's 16, so a worker can fail after the first.
VAL_IMAGES = 20


def ci_config(digits_tiny: Path, val: Path, runs_root: Path) -> ExperimentConfig:
    """configs/ci.yaml on ``digits_tiny`` (validation: the COCO file ``val``) under
    ``runs_root``, without MLflow."""
    args = ci_overrides(digits_tiny, runs_root, "tracking.enabled=false", f"data.val.source={val}")
    return load_config(CI_CONFIG, args[1::2])


def small_val(digits_tiny: Path, out: Path, n_images: int = VAL_IMAGES) -> Path:
    """The first ``n_images`` of digits_tiny's validation split as a COCO file (evaluation
    with pycocotools is most of a fake run's time)."""
    doc = read_json(digits_source(digits_tiny, "val")[0])
    images = doc["images"][:n_images]
    ids = {im["id"] for im in images}
    anns = [a for a in doc["annotations"] if a["image_id"] in ids]
    out.write_text(json.dumps({**doc, "images": images, "annotations": anns}))
    return out


def selections(run: RunDir) -> list[list[str]]:
    out = []
    for it in run.iterations():
        if run.selection_file(it).exists():
            sel = read_table(schema.SELECTION, run.selection_file(it))
            out.append(sorted(sel.filter(sel["selected"])["image_id"].to_pylist()))
    return out


def labeled(run: RunDir) -> list[str]:
    images = run.read_images()
    mask = pc.and_(pc.equal(images["state"], "labeled"), pc.equal(images["split"], "pool"))
    return sorted(images.filter(mask)["image_id"].to_pylist())


def label_rows(run: RunDir) -> list[tuple[str, int, str, int]]:
    t = run.read_labels()
    cols = [t[c].to_pylist() for c in ("image_id", "box_id", "source", "iteration")]
    return sorted(zip(*cols, strict=True))


def maps(run: RunDir) -> list[float]:
    return [read_json(run.metrics_file(it))["map"] for it in run.iterations()]


def _rows(path: Path, spec: schema.TableSpec, columns: list[str]) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    t = read_table(spec, path)
    return list(zip(*(t[c].to_pylist() for c in columns), strict=True))


def state(run: RunDir) -> dict[str, Any]:
    """What a run has produced: the steps it completed and every output a later step reads
    (the loop is a function of these, so equal states continue identically)."""
    meta = run.read_meta()
    images = run.read_images()
    out: dict[str, Any] = {
        "steps": sorted(
            (h["iteration"], h["phase"])
            for h in meta.get("history", [])
            if h["ended"] and h["phase"] != "done"
        ),
        "images": sorted(
            zip(*(images[c].to_pylist() for c in ("image_id", "state", "iteration")), strict=True)
        ),
        "labels": label_rows(run),
    }
    for it in run.iterations():
        ckpt = run.checkpoint(it) / "model.pt"
        metrics = run.metrics_file(it)
        out[f"iteration {it}"] = {
            "selection": _rows(
                run.selection_file(it), schema.SELECTION, ["image_id", "score", "rank", "selected"]
            ),
            "predictions": _rows(
                run.predictions_file(it), schema.PREDICTIONS, ["image_id", "det_id", "score"]
            ),
            "val_predictions": _rows(
                run.val_predictions_file(it), schema.PREDICTIONS, ["image_id", "det_id", "score"]
            ),
            "model": ckpt.read_bytes() if ckpt.exists() else None,
            "map": read_json(metrics).get("map") if metrics.exists() else None,
        }
    return out


@dataclass
class Reference:
    """The uninterrupted run, what its fakes and callbacks saw, and its states by step."""

    run: RunDir
    snapshots: Path
    workers: FakeWorkers
    events: list[tuple[str, object]]
    _states: dict[Step | None, dict[str, Any]] = field(default_factory=dict)

    def state_before(self, step: Step | None) -> dict[str, Any]:
        """``state`` of the run before ``step`` (None: at the end)."""
        if step not in self._states:
            where = self.snapshots / f"{step.iteration}_{step.phase}" if step else self.run.path
            self._states[step] = state(RunDir(where))
        return self._states[step]


@pytest.fixture(scope="module", autouse=True)
def _no_fsync() -> Iterator[None]:
    """Durability is not under test here, and fsync is a third of a fake run's time."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(scope="module")
def reference(digits_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """An uninterrupted run, with a copy of its run directory before each step."""
    root = tmp_path_factory.mktemp("inprocess")
    cfg = ci_config(digits_tiny, small_val(digits_tiny, root / "val.json"), root / "runs")
    run = create_run(cfg)
    workers, recorder = FakeWorkers(run), Recorder()
    snapshots = root / "snapshots"
    loop = TestLoop(run, stored_config(run), workers, [recorder], snapshots=snapshots)
    assert loop.execute() == "done"
    return Reference(run, snapshots, workers, recorder.events)


# ---- tests -----------------------------------------------------------------------------------
def test_whole_run_through_the_state_machine(reference: Reference) -> None:
    run = reference.run
    meta = run.read_meta()
    sizes = meta["budget_sizes"]
    history = [(h["iteration"], h["phase"]) for h in meta["history"]]
    assert history == [*PLAN, (1, "done")]
    assert all(h["ended"] is not None for h in meta["history"])
    assert meta["journal"] == {"iteration": 1, "phase": "done", "status": "completed"}
    # nothing selected twice, each selection its iteration's budget, the labels theirs
    picks = selections(run)
    assert [len(p) for p in picks] == sizes[:2]
    flat = [i for p in picks for i in p]
    assert len(flat) == len(set(flat))
    assert labeled(run) == sorted(flat)
    gt = run.read_gt().to_pylist()
    revealed = [
        (g["image_id"], g["box_id"], "oracle", it) for it, p in enumerate(picks)
        for g in gt if g["image_id"] in p
    ]  # fmt: skip
    assert label_rows(run) == sorted(revealed)
    # iteration 1 predicted the unlabeled pool with M0; M(i) learned from iterations 0..i
    preds = read_table(schema.PREDICTIONS, run.predictions_file(1))
    assert not set(preds["image_id"].to_pylist()) & set(picks[0])
    for it in (0, 1):
        model = json.loads((run.checkpoint(it) / "model.pt").read_bytes())
        assert model["images"] == sorted(flat[: sum(sizes[: it + 1])])
    # the numbers each phase journaled, the seeds, the callbacks and the workers' lifecycle
    train = [h for h in meta["history"] if h["phase"] == "train"]
    assert [(h["steps"], h["loss"], h["box_rmse"]) for h in train] == [(4, 1.5, 2.0)] * 2
    assert {"0/select", "0/train", "1/predict", "1/select", "1/train"} <= set(meta["seeds"])
    assert all(0.0 < m <= 1.0 for m in maps(run))
    assert reference.events == [
        ("start", run.name), ("iteration", 0), ("iteration", 1), ("end", "FINISHED"),
    ]  # fmt: skip
    assert (reference.workers.started, reference.workers.stopped) == (1, 1)


def test_rerunning_a_finished_run_does_nothing(reference: Reference, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    shutil.copytree(reference.run.path, run.path)
    workers = FakeWorkers(run)
    cfg = stored_config(run).model_copy(update={"runs_root": tmp_path})
    assert TestLoop(run, cfg, workers).execute() == "done"
    assert workers.started == 0 and not workers.calls
    assert selections(run) == selections(reference.run)


def _kinds(step: Step) -> list[str]:
    """How ``step`` can be interrupted: half-way at its fault point, in a worker, after its
    work but before the journal records it, after it completed."""
    mid = ["mid"] if step.phase in MID else []
    worker = ["worker"] if step.phase in WORKER else []
    return [*mid, *worker, "crash", "end"]


SCENARIOS = [(step, kind) for step in PLAN for kind in _kinds(step)]


@pytest.mark.parametrize(
    ("step", "kind"), SCENARIOS, ids=[f"{s.iteration}-{s.phase}-{k}" for s, k in SCENARIOS]
)
def test_interrupted_at_each_step_resumes_to_the_same_run(
    reference: Reference, step: Step, kind: str, tmp_path: Path
) -> None:
    """From the state the reference left before ``step``, the step is interrupted (``kind``),
    a new loop resumes, and the run ends up where the uninterrupted one was after ``step``.

    Compared right after the step rather than at the end: the loop is a function of the run
    directory, so from equal states the rest of the run is the reference's rest (this keeps
    the file's thirty-odd resumed runs within a few seconds).
    """
    it, phase = step
    run = RunDir(tmp_path / "run")
    shutil.copytree(reference.snapshots / f"{it}_{phase}", run.path)
    stored = stored_config(run)
    points = {"mid": [f"{it}:{phase}:mid"], "end": [f"{it}:{phase}"]}.get(kind, [])
    fault = stored.fault.model_copy(update={"kill_at": points})
    # a warm-up cache of its own: the reference's would hand iteration 0 over
    cfg = stored.model_copy(update={"runs_root": tmp_path / "runs", "fault": fault})
    workers = FakeWorkers(run, fail={WORKER[phase]} if kind == "worker" else set())
    after = PLAN.index(step) + 1
    stop = PLAN[after] if after < len(PLAN) else None
    message = {
        "mid": f"{it}:{phase}:mid",
        "worker": f"{WORKER.get(phase)} worker died",
        "crash": f"crash after the work of {it}:{phase}",
        "end": f"{it}:{phase}",
    }[kind]
    with pytest.raises(Interrupted, match=f"^{message}$"):
        TestLoop(run, cfg, workers, crash_after=step if kind == "crash" else None).execute()
    assert run.read_meta()["journal"]["status"] == ("completed" if kind == "end" else "started")
    resumed = TestLoop(run, cfg, workers, stop_at=stop)
    if stop is None:
        assert resumed.execute() == "done"
    else:
        with pytest.raises(Stopped):
            resumed.execute()
    assert state(run) == reference.state_before(stop)
    picks = selections(run)
    assert picks == selections(reference.run)[: len(picks)]


def test_human_oracle_pauses_for_labels(
    reference: Reference, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With people as the oracle the loop exports the query and stops (``WaitingForLabels``),
    telling how to continue; a resume before the labels arrive stops there again."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(reference.snapshots / "0_select", run.path)
    stored = stored_config(run)
    al = stored.al.model_copy(update={"oracle": "human"})
    root = Path(stored.data.pool.source).parent if stored.data.pool else tmp_path  # the images
    labeling = stored.labeling.model_copy(update={"document_root": root})
    cfg = stored.model_copy(update={"runs_root": tmp_path / "runs", "al": al, "labeling": labeling})
    workers, recorder = FakeWorkers(run), Recorder()
    assert TestLoop(run, cfg, workers, [recorder]).execute() == "wait_for_labels"
    assert recorder.events == [("start", run.name), ("end", "SCHEDULED")]
    assert (workers.started, workers.stopped, workers.calls) == (1, 1, [])
    assert run.read_meta()["journal"] == {
        "iteration": 0, "phase": "wait_for_labels", "status": "started",
    }  # fmt: skip
    images = run.read_images()
    queried = images.filter(pc.equal(images["state"], "queried"))["image_id"].to_pylist()
    assert sorted(queried) == selections(reference.run)[0]
    waiting = [r for r in caplog.records if r.levelname == "WARNING" and "waiting" in r.message]
    assert len(waiting) == 1 and f"detloop resume {run.path}" in waiting[0].getMessage()
    for suffix in (".coco.json", ".label_studio.json"):  # the files that exist, by name
        named = Path(f"{run.query_stem(0)}{suffix}")
        assert named.exists() and str(named) in waiting[0].getMessage()
    tasks = read_json(Path(f"{run.query_stem(0)}.label_studio.json"))  # labeling.document_root
    files = dict(zip(images["image_id"].to_pylist(), images["file"].to_pylist(), strict=True))
    for task in tasks:
        url = task["data"]["image"]
        assert url.startswith("/data/local-files/?d=") and (root / url.split("?d=")[1]).is_file()
    assert len(tasks) == len(queried) and all(files[q].startswith(str(root)) for q in queried)
    assert TestLoop(run, cfg, workers).execute() == "wait_for_labels"


def test_a_test_split_is_evaluated_every_iteration(digits_tiny: Path, tmp_path: Path) -> None:
    """With ``data.test`` the loop reports test mAP beside val mAP (val picks early-stopping
    weights and thresholds, so only test is an unbiased curve)."""
    val = small_val(digits_tiny, tmp_path / "val.json")
    test = small_val(digits_tiny, tmp_path / "test.json", n_images=VAL_IMAGES // 2)
    args = ci_overrides(digits_tiny, tmp_path / "runs", "tracking.enabled=false")
    args += ["--set", f"data.val.source={val}", "--set", f"data.test.source={test}"]
    args += ["--set", f"data.test.images={digits_source(digits_tiny, 'val')[1]}"]
    run = create_run(load_config(CI_CONFIG, args[1::2]))
    assert TestLoop(run, stored_config(run), FakeWorkers(run)).execute() == "done"
    for it in run.iterations():
        metrics = read_json(run.metrics_file(it))
        assert 0.0 < metrics["test_map50"] <= 1.0 and "test_map" in metrics
        preds = read_table(schema.PREDICTIONS, run.split_predictions_file(it, "test"))
        images = run.read_images()
        split = {
            i
            for i, sp in zip(
                images["image_id"].to_pylist(), images["split"].to_pylist(), strict=True
            )
            if sp == "test"
        }
        assert split and preds.num_rows and set(preds["image_id"].to_pylist()) <= split
