"""The semi-supervised loop in-process on fake workers (the ``Workers`` protocol as plain
classes, see test_loop_inprocess.py): its plan, the labeled split, pseudo-labels as ``labels``
rows of source ``pseudo`` per round, the teacher/student/self-training jobs, the health numbers,
and resuming after an interruption anywhere with the same pseudo-labels and labeled set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from detloop.config import ExperimentConfig
from detloop.data.io import read_json
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.runs import create_run, stored_config
from detloop.orchestrator.engine.tracking import LoopCallback
from detloop.orchestrator.engine.workers import TrainJob, TrainOutcome
from detloop.orchestrator.loops.semi_supervised import SemiSupervisedLoop, labeled_split
from test_loop_inprocess import FakeWorkers, Interrupted, ci_config, label_rows, labeled, small_val

SSL = [
    "loop=ssl",
    "ssl.portion_labeled=25",
    "ssl.selection_strategy=selftrain_score",
    "ssl.selftrain_rounds=1",
    "ssl.selftrain_epochs=2",
]


class SslWorkers(FakeWorkers):
    """Fake workers whose "model" also names the pseudo-labels it saw (so a resume that
    pseudo-labeled differently changes every later prediction) and that record each job."""

    def __init__(self, run: RunDir) -> None:
        super().__init__(run)
        self.jobs: list[TrainJob] = []

    def train(self, job: TrainJob) -> TrainOutcome:
        self.jobs.append(job)
        outcome = super().train(job)
        if job.pseudo is not None:
            model = Path(job.out_dir) / "model.pt"
            extra = sorted(job.pseudo[1]["image_id"].to_pylist())
            model.write_bytes(model.read_bytes() + json.dumps(extra).encode())
        history = [{"epoch": 0.0, "loss": 1.0, "sup_loss": 0.6, "unsup_loss": 0.4}]
        if job.online is not None:  # what the trainer records of an online teacher's labels
            counts = ("pseudo_boxes", "pseudo_gt_boxes", "pseudo_matched")
            history = [
                {**history[0], **dict(zip(counts, (10.0, 8.0, 6.0), strict=True))},
                {**history[0], "epoch": 1.0, **dict(zip(counts, (6.0, 12.0, 4.0), strict=True))},
            ]
        return TrainOutcome(outcome.checkpoint, 4, 1.0, 0.01, {}, history if job.pseudo else [])


class Series(LoopCallback):
    def __init__(self) -> None:
        self.series: dict[str, list[tuple[int, float]]] = {}
        self.tags: dict[str, str] = {}
        self.iterations: list[dict[str, float]] = []
        self.artifacts: list[list[Path]] = []

    def on_series(self, name: str, points: list[tuple[int, float]]) -> None:
        self.series[name] = points

    def on_tag(self, key: str, value: str) -> None:
        self.tags[key] = value

    def on_iteration(
        self, iteration: int, metrics: dict[str, float], artifacts: list[Path]
    ) -> None:
        self.iterations.append(metrics)
        self.artifacts.append(artifacts)


def _interrupt(point: str) -> None:
    raise Interrupted(point)


@pytest.fixture()
def cfg(digits_tiny: Path, tmp_path: Path) -> ExperimentConfig:
    val = small_val(digits_tiny, tmp_path / "val.json")
    base = ci_config(digits_tiny, val, tmp_path / "runs")
    from detloop.config import build_config, config_snapshot

    return build_config(config_snapshot(base), SSL)


def _loop(
    cfg: ExperimentConfig, cbs: list[LoopCallback] | None = None
) -> tuple[SemiSupervisedLoop, SslWorkers]:
    run = create_run(cfg)
    workers = SslWorkers(run)
    loop = SemiSupervisedLoop(run, stored_config(run), cbs or [], lambda _: workers, _interrupt)
    return loop, workers


def test_split_is_seeded_or_first_n() -> None:
    """§11 pin (b): a seeded random split of round(p·n) images, or the first ones in order."""
    images = pa.table(
        {
            "image_id": [f"pool/{i:02d}" for i in range(20)] + ["val/0"],
            "file": [f"{i:02d}.png" for i in range(20)] + ["v.png"],
            "split": ["pool"] * 20 + ["val"],
        }
    )
    a = labeled_split(images, 10, "random", seed=1)
    assert len(a) == 2 and a == labeled_split(images, 10, "random", seed=1)
    assert a != labeled_split(images, 10, "random", seed=2)
    assert labeled_split(images, 25, "first_n", seed=1) == [f"pool/{i:02d}" for i in range(5)]
    assert all(i.startswith("pool/") for i in labeled_split(images, 99, "random", 0))


def test_ssl_loop_end_to_end(cfg: ExperimentConfig) -> None:
    cb = Series()
    loop, workers = _loop(cfg, [cb])
    assert loop.execute() == "done"
    run = loop.run
    assert run.name == "ssl-selftrain_score-s0"
    steps = [(h["iteration"], h["phase"]) for h in run.read_meta()["history"] if h["ended"]]
    assert steps[:5] == [(0, "import"), (0, "split"), (0, "train"), (0, "evaluate"), (0, "log")]
    assert [p for r, p in steps if r == 1] == [
        "predict", "pseudo_label", "train", "evaluate", "log"
    ]  # fmt: skip
    assert max(r for r, _ in steps) == 2  # one self-training round
    meta = run.read_meta()
    n_pool = sum(1 for i in run.read_images()["split"].to_pylist() if i == "pool")
    assert len(meta["labeled_ids"]) == round(0.25 * n_pool) == len(labeled(run))
    labels = run.read_labels()
    pseudo = labels.filter(pc.equal(labels["source"], "pseudo"))
    assert set(pseudo["iteration"].to_pylist()) == {1, 2}
    # pseudo-labels only on unlabeled images, never on gt-labeled ones; gt rows untouched
    assert not set(pseudo["image_id"].to_pylist()) & set(meta["labeled_ids"])
    oracle = labels.filter(pc.equal(labels["source"], "oracle"))
    assert set(oracle["image_id"].to_pylist()) <= set(meta["labeled_ids"])
    assert set(pseudo["weight"].to_pylist()) == {1.0}  # no `pseudoscore`: unweighted
    # the jobs: teacher plain; student from the initial weights with its pseudo stream;
    # the self-training round from the student, for selftrain_epochs, with its own labels
    teacher, student, selftrain = workers.jobs
    assert teacher.pseudo is None and teacher.init_weights is None
    assert student.pseudo is not None and student.init_weights is None and student.epochs is None
    assert set(student.pseudo[1]["iteration"].to_pylist()) == {1}
    assert selftrain.init_weights == str(run.weights_file(1)) and selftrain.epochs == 2
    assert selftrain.pseudo is not None and set(selftrain.pseudo[1]["iteration"].to_pylist()) == {2}
    assert set(student.labels["source"].to_pylist()) == {"oracle"}
    # health: per-epoch series, pseudo-label quality against the hidden gt (fake predictions
    # are jittered gt boxes, so most pseudo-labels are right)
    assert {"student_sup_loss", "student_unsup_loss", "selftrain1_unsup_loss"} <= set(cb.series)
    m1 = read_json(run.metrics_file(1))
    assert m1["pseudo_label_pseudo_labels"] == sum(
        1 for i in pseudo["iteration"].to_pylist() if i == 1
    )
    assert (
        0.5 < m1["pseudo_label_pseudo_precision"] <= 1 and 0 < m1["pseudo_label_pseudo_recall"] <= 1
    )
    # every selection signal's ranking of the candidates; the score's, at STAC's own count,
    # is this (score-selected) run's pseudo-label recall
    for signal in ("score", "alluncert", "alluncert_and_score", "ental", "epuncert", "pcorrect"):
        assert 0 < m1[f"pseudo_label_rank_ap_{signal}"] <= 1
    assert m1["pseudo_label_rank_recall_at_k_score"] == pytest.approx(
        m1["pseudo_label_pseudo_recall"]
    )
    assert [int(m["round"]) for m in cb.iterations] == [0, 1, 2] and not cb.tags
    # per class: the labeled boxes, the round's pseudo-labels and their quality, adding up to
    # the round's totals; logged as numbers, with the table and its plot as artifacts
    rows = read_json(run.pseudo_classes_file(1))["classes"]
    names = run.class_names()
    assert [r["name"] for r in rows] == names
    oracle_classes = oracle["class_id"].to_pylist()
    assert [r["labeled"] for r in rows] == [oracle_classes.count(c) for c in range(len(names))]
    assert sum(r["pseudo"] for r in rows) == m1["pseudo_label_pseudo_labels"]
    assert sum(r["matched"] for r in rows) / sum(r["pseudo"] for r in rows) == pytest.approx(
        m1["pseudo_label_pseudo_precision"]
    )
    assert sum(r["matched"] for r in rows) / sum(r["gt"] for r in rows) == pytest.approx(
        m1["pseudo_label_pseudo_recall"]
    )
    for r in rows:
        assert m1[f"pseudo_boxes/{r['name']}"] == r["pseudo"]
        if r["pseudo"]:
            assert m1[f"pseudo_precision/{r['name']}"] == r["matched"] / r["pseudo"]
    plot = run.pseudo_classes_file(1).with_suffix(".png")
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert {run.pseudo_classes_file(1), plot} <= set(cb.artifacts[1])
    assert not run.pseudo_classes_file(0).exists()  # the teacher's round has no pseudo-labels


def test_no_pseudo_labels_warns(cfg: ExperimentConfig) -> None:
    from detloop.config import build_config, config_snapshot

    cfg = build_config(config_snapshot(cfg), ["ssl.tau=1.0", "ssl.selection_strategy=score"])
    cb = Series()
    loop, workers = _loop(cfg, [cb])
    assert loop.execute() == "done"
    assert "warning.no_pseudo_labels" in cb.tags
    assert workers.jobs[1].pseudo is None  # the student trains on the labeled part only


def _outputs(run: RunDir) -> dict[str, Any]:
    return {
        "labels": label_rows(run),
        "labeled": labeled(run),
        "models": [
            (run.checkpoint(r) / "model.pt").read_bytes()
            for r in run.iterations()
            if (run.checkpoint(r) / "model.pt").exists()
        ],
    }


@pytest.mark.parametrize(
    "point",
    [
        "0:split",
        "1:predict:mid",
        "1:pseudo_label",
        "1:train:mid",
        "2:pseudo_label",
        "2:evaluate:mid",
    ],
)
def test_resume_after_interruption(cfg: ExperimentConfig, tmp_path: Path, point: str) -> None:
    """Interrupted at a fault point, then resumed by a new loop: the same pseudo-labels, the
    same labeled set and the same models as an uninterrupted run."""
    from detloop.config import build_config, config_snapshot

    reference, _ = _loop(build_config(config_snapshot(cfg), ["runs_root=" + str(tmp_path / "ref")]))
    assert reference.execute() == "done"
    faulty = build_config(config_snapshot(cfg), [f"fault.kill_at=[{point!r}]"])
    loop, _ = _loop(faulty)
    with pytest.raises(Interrupted):
        loop.execute()
    resumed, _ = _loop(faulty)
    assert resumed.execute() == "done"
    assert _outputs(resumed.run) == _outputs(reference.run)


def test_ema_teacher_round(cfg: ExperimentConfig) -> None:
    """``ssl.teacher: ema``: one student round, started from the burn-in teacher (round 0),
    its pseudo stream the unlabeled images, labeled online with the run's selection."""
    from detloop.config import build_config, config_snapshot

    cfg = build_config(config_snapshot(cfg), ["ssl.teacher=ema", "ssl.selection_strategy=score"])
    loop, workers = _loop(cfg)
    assert loop.execute() == "done"
    assert loop.run.name == "ssl-ema_score-s0"  # not the STAC run of the same selection
    assert loop.run.iterations() == [0, 1]
    student = workers.jobs[1]
    assert student.init_weights == str(loop.run.weights_file(0))
    assert student.online is not None and student.online.spec.name == "score"
    # the simulated pool's hidden gt of exactly the unlabeled part scores the online labels
    unlabeled = set(student.pseudo[0]["image_id"].to_pylist()) if student.pseudo else set()
    assert student.online.gt is not None
    assert set(student.online.gt["image_id"].to_pylist()) <= unlabeled
    # the round's online pseudo-labels over the whole training: the epochs' counts summed
    (train,) = (
        h for h in loop.run.read_meta()["history"] if (h["iteration"], h["phase"]) == (1, "train")
    )
    assert train["online_pseudo_labels"] == 16
    assert train["online_pseudo_precision"] == 10 / 16 and train["online_pseudo_recall"] == 0.5
    assert student.pseudo is not None and student.pseudo[1].num_rows == 0
    assert sorted(student.pseudo[0]["image_id"].to_pylist()) == sorted(
        set(
            loop.run.read_images()
            .filter(pc.equal(loop.run.read_images()["split"], "pool"))["image_id"]
            .to_pylist()
        )
        - set(labeled(loop.run))
    )


def test_student_from_the_teacher_with_its_own_budget(cfg: ExperimentConfig) -> None:
    """``ssl.student_init: teacher`` starts the first student from round 0's weights (a run
    of its own, marked ``from_teacher``); ``student_epochs`` / ``student_max_steps`` are the
    student's budget only: the teacher keeps ``train``'s and self-training its own epochs (capped
    at ``selftrain_max_steps``)."""
    from detloop.config import ConfigError, build_config, config_snapshot
    from detloop.orchestrator.engine.workers import job_config

    sets = ["ssl.student_init=teacher", "ssl.student_epochs=7", "ssl.student_max_steps=30"]
    sets.append("ssl.selftrain_max_steps=40")  # a self-training round's own cap
    sets += ["ssl.student_eval_steps=50", "train.early_stopping=true", "train.lr_schedule=plateau"]
    sets.append("ssl.student_patience=9")
    sets.append("ssl.student_lr_schedule=cosine")
    cfg = build_config(config_snapshot(cfg), sets)
    loop, workers = _loop(cfg)
    assert loop.execute() == "done"
    assert loop.run.name == "ssl-selftrain_score+from_teacher-s0"
    teacher, student, selftrain = workers.jobs
    assert teacher.init_weights is None and (teacher.epochs, teacher.max_steps) == (None, None)
    assert student.init_weights == str(loop.run.weights_file(0))
    assert (student.epochs, student.max_steps) == (7, 30)
    assert selftrain.init_weights == str(loop.run.weights_file(1))
    assert (selftrain.epochs, selftrain.max_steps) == (2, 40)
    # students and self-training rounds evaluate val in steps; the teacher as any training
    assert (teacher.eval_steps, student.eval_steps, selftrain.eval_steps) == (None, 50, 50)
    assert (teacher.patience, student.patience, selftrain.patience) == (None, 9, 9)
    # what the train worker trains with: the job's budget in place of train's
    trained = job_config(cfg, student).train
    assert (trained.epochs, trained.max_steps, trained.lr_schedule) == (7, 30, "cosine")
    assert (trained.eval_steps, trained.patience) == (50, 9)
    assert job_config(cfg, teacher) is cfg and cfg.train.lr_schedule == "plateau"
    # a teacher to a plateau, students (and self-training) cosine over their own budget
    assert [j.lr_schedule for j in (teacher, student, selftrain)] == [None, "cosine", "cosine"]
    with pytest.raises(ConfigError, match=r"needs train\.early_stopping"):
        build_config(config_snapshot(cfg), ["train.early_stopping=false",
                                            "train.lr_schedule=cosine",
                                            "ssl.student_lr_schedule=plateau"])  # fmt: skip


def test_rejected_detections_become_ignore_regions(cfg: ExperimentConfig) -> None:
    """``ssl.rejected: ignore``: the student's stream is the stored pseudo-labels followed by
    the teacher's detections (score ≥ teacher_min_score) of those images as ignore regions;
    the stored labels never hold a region; refused with the online teacher."""
    from detloop.config import ConfigError, build_config, config_snapshot
    from detloop.data import schema
    from detloop.data.io import read_table
    from detloop.data.labels import IGNORE_CLASS_ID

    cfg = build_config(
        config_snapshot(cfg), ["ssl.rejected=ignore", "ssl.selection_strategy=score"]
    )
    loop, workers = _loop(cfg)
    assert loop.execute() == "done"
    assert loop.run.name == "ssl-score+ignore-s0"
    stream = workers.jobs[1].pseudo[1]
    kept = stream.filter(pc.not_equal(stream["class_id"], IGNORE_CLASS_ID))
    regions = stream.filter(pc.equal(stream["class_id"], IGNORE_CLASS_ID))
    stored = loop.run.read_labels()
    pseudo = stored.filter(pc.equal(stored["source"], "pseudo"))
    assert kept.num_rows == pseudo.num_rows > 0 and stream.slice(0, kept.num_rows).equals(kept)
    preds = read_table(schema.PREDICTIONS, loop.run.predictions_file(1))
    on = pc.is_in(preds["image_id"], value_set=pseudo["image_id"])
    expected = preds.filter(pc.and_(on, pc.greater_equal(preds["score"], 0.1)))
    assert regions.num_rows == expected.num_rows > kept.num_rows  # rejected ones too
    assert IGNORE_CLASS_ID not in stored["class_id"].to_pylist()
    with pytest.raises(ConfigError, match="rejected: ignore"):
        build_config(config_snapshot(cfg), ["ssl.teacher=ema"])


def test_run_names_mark_tau_off_its_default(cfg: ExperimentConfig) -> None:
    """Two thresholds are two runs (a grid over ``ssl.tau`` never shares a directory)."""
    from detloop.config import build_config, config_snapshot
    from detloop.orchestrator.engine.runs import strategy_name

    def name(*sets: str) -> str:
        return strategy_name(build_config(config_snapshot(cfg), list(sets)))

    assert name("ssl.tau=0.4") == "selftrain_score"
    assert name("ssl.tau=0.9") == "selftrain_score+tau0.9"
    assert name("ssl.tau=1", "ssl.student_init=teacher") == "selftrain_score+tau1+from_teacher"
    assert name("ssl.tau=0.9", "ssl.teacher_only=true") == "teacher"
    assert name("ssl.rejected=ignore", "ssl.labeled_per_batch=2") == "selftrain_score+ignore+L2"
    assert name("ssl.stac_randaug=false") == "selftrain_score+weakaug"
    assert name("ssl.stac_lambda=0.5", "ssl.pseudo_box_weight=0") == "selftrain_score+lam0.5+box0"
    assert name("ssl.randaug_magnitude=5") == "selftrain_score+mag5"
    # pcorrect's notion of right off IoU 0.5; no mark where pcorrect does not select
    assert name("ssl.selection_strategy=pcorrect", "ssl.pcorrect_iou=0.75") == "pcorrect+pciou0.75"
    assert name("ssl.selection_strategy=pcorrect", "ssl.pcorrect_iou=coco") == "pcorrect+pcioucoco"
    assert name("ssl.pcorrect_iou=0.75") == "selftrain_score"
    # the magnitude of an augmentation that is off changes nothing: no mark
    assert name("ssl.randaug_magnitude=5", "ssl.stac_randaug=false") == "selftrain_score+weakaug"


def test_ema_teacher_refuses_selftrain() -> None:
    from detloop.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="selftrain"):
        build_config(
            {"loop": "ssl", "ssl": {"teacher": "ema", "selection_strategy": "selftrain_score"}}
        )


def test_teacher_is_shared_by_the_strategies_of_a_seed(cfg: ExperimentConfig) -> None:
    """Like the AL warm-up: the second selection strategy of a seed copies the teacher (its
    split, model and evaluation) instead of training it again."""
    from detloop.config import build_config, config_snapshot

    first, _ = _loop(cfg)
    assert first.execute() == "done"
    other = build_config(config_snapshot(cfg), ["ssl.selection_strategy=pseudoscore_epuncert"])
    second, workers = _loop(other)
    assert second.execute() == "done"
    assert second.run.name == "ssl-pseudoscore_epuncert-s0"
    history = second.run.read_meta()["history"]
    cached = {h["phase"] for h in history if h["iteration"] == 0 and h.get("warmup_cache")}
    assert cached == {"train", "evaluate"}
    assert labeled(second.run) == labeled(first.run)
    assert (second.run.weights_file(0)).read_bytes() == (first.run.weights_file(0)).read_bytes()
    assert all(job.pseudo is not None for job in workers.jobs)  # no teacher training


def test_dry_run_names_the_loop_and_its_strategies(
    cfg: ExperimentConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from detloop.cli.main import main
    from detloop.config import config_snapshot

    path = tmp_path / "ssl.yaml"
    path.write_text(yaml.safe_dump(config_snapshot(cfg)))
    assert main(["run", str(path), "--dry-run", "--set", "ssl.selection_strategy=calib_combo"]) == 0
    out = capsys.readouterr().out
    assert "# loop: semi-supervised" in out and "# selection strategy: calib_combo" in out
    assert "teacher strategy: (plain STAC)" in out
    assert "# teacher: stac; tau 0.4; lambda 1.0; pseudo box weight 1" in out
    assert (
        "# student: from model.weights; rejected teacher detections are background; "
        "lr schedule cosine" in out
    )
    sets = ["--set", "ssl.student_init=teacher", "--set", "ssl.rejected=ignore"]
    sets += ["--set", "ssl.target_precision=0.9", "--set", "train.early_stopping=true"]
    sets += ["--set", "ssl.student_lr_schedule=plateau"]
    assert main(["run", str(path), "--dry-run", *sets]) == 0
    out = capsys.readouterr().out
    assert (
        "# student: from the teacher's weights; rejected teacher detections are ignore "
        "regions; lr schedule plateau" in out
    )
    assert "# teacher: stac; tau fitted on validation for precision 0.9; lambda 1.0" in out
    assert main(["run", str(path), "--dry-run", "--set", "ssl.selection_strategy=alluncrt"]) == 2
    assert "did you mean 'alluncert'" in capsys.readouterr().err


def test_precision_target_fits_tau_on_the_teachers_validation(cfg: ExperimentConfig) -> None:
    """``ssl.target_precision``: τ fitted on model 0's validation predictions against the val
    gt, then the pseudo-labels are the pool detections above it; run marked ``+p0.9``."""
    import numpy as np

    from detloop.config import ConfigError, build_config, config_snapshot
    from detloop.data import schema
    from detloop.data.io import read_table
    from detloop.selectors.pseudo import select_pseudo_labels

    sets = ["ssl.target_precision=0.9", "ssl.selection_strategy=score", "ssl.selftrain_rounds=0"]
    loop, _ = _loop(build_config(config_snapshot(cfg), sets))
    assert loop.execute() == "done"
    run = loop.run
    assert run.path.name == "ssl-score+p0.9-s0"
    m1 = read_json(run.metrics_file(1))
    assert m1["pseudo_label_pseudo_tau_reached"] == 1.0
    assert m1["pseudo_label_pseudo_tau_val_precision"] >= 0.9
    tau = m1["pseudo_label_pseudo_tau"]
    preds = read_table(schema.PREDICTIONS, run.predictions_file(1))
    unlabeled = pa.array(sorted(set(preds["image_id"].to_pylist()) - set(labeled(run))))
    preds = preds.filter(pc.is_in(preds["image_id"], value_set=unlabeled))
    preds = preds.filter(pc.greater_equal(preds["score"], 0.1))
    expected = select_pseudo_labels(preds, "score", tau)
    assert m1["pseudo_label_pseudo_labels"] == expected.num_rows > 0
    assert np.float32(tau) == tau  # a float32 value, as the scores it is compared with
    with pytest.raises(ConfigError, match="target_precision"):  # the mean teacher is online
        build_config(config_snapshot(cfg), [*sets, "ssl.teacher=ema"])


def test_pcorrect_fits_its_model_on_validation_and_selects_by_it(cfg: ExperimentConfig) -> None:
    """``pcorrect``: the round's model fitted on model 0's validation detections is stored
    beside the round and its coefficients logged; the pseudo-labels are the pool detections
    with P(right) above the τ fitted for the precision target."""
    import numpy as np

    from detloop.config import ConfigError, build_config, config_snapshot
    from detloop.data import schema
    from detloop.data.errors import DataError
    from detloop.data.io import read_table
    from detloop.orchestrator.loops.steps import CORRECTNESS_FILE, fit_selection_rule
    from detloop.selectors.pseudo import select_pseudo_labels
    from detloop.selectors.pseudo_correctness import CorrectnessModel

    sets = ["ssl.selection_strategy=pcorrect", "ssl.selftrain_rounds=0"]
    loop, _ = _loop(build_config(config_snapshot(cfg), [*sets, "ssl.target_precision=0.8"]))
    assert loop.execute() == "done"
    run = loop.run
    assert run.path.name == "ssl-pcorrect+p0.8-s0"
    model = CorrectnessModel.from_dict(read_json(run.iteration_dir(1) / CORRECTNESS_FILE))
    m1 = read_json(run.metrics_file(1))
    assert m1["pseudo_label_pcorrect_coef_logit_score"] == model.coef[0]
    assert m1["pseudo_label_pcorrect_n_fit"] == model.n_fit > 0
    preds = read_table(schema.PREDICTIONS, run.predictions_file(1))
    unlabeled = pa.array(sorted(set(preds["image_id"].to_pylist()) - set(labeled(run))))
    preds = preds.filter(pc.is_in(preds["image_id"], value_set=unlabeled))
    preds = preds.filter(pc.greater_equal(preds["score"], 0.1))
    tau = m1["pseudo_label_pseudo_tau"]
    expected = select_pseudo_labels(preds, "pcorrect", tau, correctness=model)
    assert m1["pseudo_label_pseudo_labels"] == expected.num_rows > 0
    assert np.isfinite(m1["pseudo_label_rank_ap_pcorrect"])
    # a labeling model without validation predictions: a data error naming the file
    with pytest.raises(DataError, match=r"val_predictions.*validation predictions"):
        fit_selection_rule(run, loop.cfg, 1, None, preds, None)
    with pytest.raises(ConfigError, match="pcorrect"):  # the mean teacher is online
        build_config(config_snapshot(cfg), [*sets, "ssl.teacher=ema"])


def test_whole_pool_is_labeled_only_for_a_teacher(cfg: ExperimentConfig) -> None:
    """``portion_labeled: 100`` labels every pool image: a supervised teacher (``teacher_only``,
    e.g. one fold's teacher of an out-of-fold GLC); a run that would pseudo-label is refused."""
    from detloop.config import ConfigError, build_config, config_snapshot

    with pytest.raises(ConfigError, match="teacher_only"):
        build_config(config_snapshot(cfg), ["ssl.portion_labeled=100"])
    whole = build_config(config_snapshot(cfg), ["ssl.portion_labeled=100", "ssl.teacher_only=true"])
    loop, workers = _loop(whole)
    assert loop.execute() == "done"
    images = loop.run.read_images()
    pool = pc.equal(images["split"], "pool")
    assert sorted(labeled(loop.run)) == sorted(images.filter(pool)["image_id"].to_pylist())
    assert [job.pseudo for job in workers.jobs] == [None]  # the teacher alone
