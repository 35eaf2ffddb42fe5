"""The SSL loop's teacher building blocks in-process (fake workers, see
test_ssl_loop_inprocess.py): ``rcc`` collages join the labeled part once after the split and
the teacher trains on them; ``imscore`` weighs each labeled object by its RCF class weight;
generated images are never predicted or pseudo-labeled; a resume adds no second set of
collages; misspelt blocks and `curr` with an online teacher are refused."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest

from detloop.config import ConfigError, ExperimentConfig, build_config, config_snapshot
from detloop.data import schema
from detloop.data.collage import is_generated
from detloop.data.errors import DataError
from detloop.data.io import read_table
from detloop.data.rundir import RunDir, RunsRoot
from detloop.orchestrator.engine.runs import create_run, stored_config
from detloop.orchestrator.loops import ssl_blocks
from detloop.orchestrator.loops.semi_supervised import SemiSupervisedLoop
from detloop.selectors.ssl_rcf import class_counts, class_weights
from test_loop_inprocess import Interrupted, ci_config, label_rows, labeled, small_val
from test_ssl_loop_inprocess import Series, SslWorkers

BLOCKS = [
    "loop=ssl",
    "ssl.portion_labeled=25",
    "ssl.selection_strategy=score",
    "ssl.teacher_strategy=rcc_imscore",
]


@pytest.fixture()
def cfg(digits_tiny: Path, tmp_path: Path) -> ExperimentConfig:
    val = small_val(digits_tiny, tmp_path / "val.json")
    base = ci_config(digits_tiny, val, tmp_path / "runs")
    return build_config(config_snapshot(base), BLOCKS)


def _interrupt(point: str) -> None:
    raise Interrupted(point)


def _loop(
    cfg: ExperimentConfig, cbs: list[Series] | None = None
) -> tuple[SemiSupervisedLoop, SslWorkers]:
    run = create_run(cfg)
    workers = SslWorkers(run)
    loop = SemiSupervisedLoop(
        run, stored_config(run), list(cbs or []), lambda _: workers, _interrupt
    )
    return loop, workers


def _generated(run: RunDir) -> list[str]:
    ids = run.read_images()["image_id"]
    return sorted(ids.filter(is_generated(ids)).to_pylist())


def test_rcc_imscore_end_to_end(cfg: ExperimentConfig) -> None:
    cb = Series()
    loop, workers = _loop(cfg, [cb])
    assert loop.execute() == "done"
    run = loop.run
    assert run.name == "ssl-rcc_imscore+score-s0"  # not the plain STAC run's directory
    # the collages: labeled pool images under the loop's tag, their boxes gt and gt labels
    collages = _generated(run)
    assert collages and all(i.startswith("pool/rcc/ssl-s42/") for i in collages)
    images = run.read_images().filter(is_generated(run.read_images()["image_id"]))
    assert set(images["state"].to_pylist()) == {"labeled"} and set(
        images["iteration"].to_pylist()
    ) == {0}
    gt = run.read_gt().filter(is_generated(run.read_gt()["image_id"]))
    labels = run.read_labels()
    rcc_labels = labels.filter(is_generated(labels["image_id"]))
    assert gt.num_rows == rcc_labels.num_rows > 0 and set(rcc_labels["source"].to_pylist()) == {
        "gt"
    }
    # num_labeled grows by the collages; the split itself is unchanged
    split = run.read_meta()["labeled_ids"]
    assert not set(split) & set(collages)
    assert labeled(run) == sorted([*split, *collages])
    m0 = cb.iterations[0]
    assert m0["labeled_images"] == len(split) + len(collages)
    assert m0["split_rcc_images"] == len(collages) and m0["split_labeled"] == len(split)
    # the teacher trained on them, each labeled object weighted by its class (imscore)
    teacher, student = workers.jobs
    assert set(collages) <= set(teacher.images["image_id"].to_pylist())
    assert set(collages) <= set(teacher.labels["image_id"].to_pylist())
    weights = class_weights(class_counts(teacher.labels, range(10)), 1.0, 10.0)
    expected = [weights[c] for c in teacher.labels["class_id"].to_pylist()]
    assert teacher.labels["weight"].to_pylist() == pytest.approx(expected)
    assert len(set(teacher.labels["weight"].to_pylist())) > 1
    assert min(expected) == 1.0 and max(expected) == 10.0
    # the student's labeled part likewise; its pseudo-labels keep weight 1 (no pseudoscore)
    assert student.labels["weight"].to_pylist() == teacher.labels["weight"].to_pylist()
    assert student.pseudo is not None and set(student.pseudo[1]["weight"].to_pylist()) == {1.0}
    # generated images are never predicted nor pseudo-labeled
    preds = read_table(schema.PREDICTIONS, run.predictions_file(1))
    assert preds.num_rows > 0 and not pc.any(is_generated(preds["image_id"])).as_py()
    pseudo = labels.filter(pc.equal(labels["source"], "pseudo"))
    assert pseudo.num_rows > 0 and not pc.any(is_generated(pseudo["image_id"])).as_py()
    # a second pass of the block adds nothing
    again = ssl_blocks.add_collages(run, loop.cfg, loop.categories)
    assert again == {"rcc_images": len(collages), "rcc_reused": 1}
    assert _generated(run) == collages and run.read_gt().num_rows == len(
        run.read_gt()["box_id"].unique()
    )


@pytest.mark.parametrize("point", ["0:split:mid", "0:split", "0:train:mid"])
def test_resume_adds_no_second_set(cfg: ExperimentConfig, tmp_path: Path, point: str) -> None:
    reference, _ = _loop(build_config(config_snapshot(cfg), ["runs_root=" + str(tmp_path / "ref")]))
    assert reference.execute() == "done"
    faulty = build_config(config_snapshot(cfg), [f"fault.kill_at=[{point!r}]"])
    loop, _ = _loop(faulty)
    with pytest.raises(Interrupted):
        loop.execute()
    resumed, _ = _loop(faulty)
    assert resumed.execute() == "done"
    run = resumed.run
    assert _generated(run) == _generated(reference.run)
    assert label_rows(run) == label_rows(reference.run)
    assert run.read_gt().num_rows == reference.run.read_gt().num_rows
    splits = [h for h in run.read_meta()["history"] if h["phase"] == "split" and h["ended"]]
    assert [h.get("rcc_reused") for h in splits] == [1 if point == "0:split:mid" else None]
    # the teacher cache key does not move when the collages appear: one complete entry
    warm = RunsRoot(cfg.runs_root).warmup(cfg.name, "x").parent
    assert [p.name for p in warm.iterdir() if p.is_dir() and (p / "complete").exists()]
    assert len([p for p in warm.iterdir() if p.is_dir()]) == 1


def test_teacher_cache_is_per_teacher_strategy(cfg: ExperimentConfig) -> None:
    """A plain STAC run of the same seed does not reuse the RCC teacher (nor the reverse)."""
    first, _ = _loop(cfg)
    assert first.execute() == "done"
    plain = build_config(config_snapshot(cfg), ["ssl.teacher_strategy="])
    second, workers = _loop(plain)
    assert second.execute() == "done"
    assert second.run.name == "ssl-score-s0" and not _generated(second.run)
    assert workers.jobs[0].pseudo is None  # the plain teacher was trained, not copied
    assert set(workers.jobs[0].labels["weight"].to_pylist()) == {1.0}
    # another selection with the same blocks copies the RCC teacher, and its run gets the
    # same collages (generated again, deterministically) so its labeled part is the teacher's
    other = build_config(config_snapshot(cfg), ["ssl.selection_strategy=pseudoscore_epuncert"])
    third, workers = _loop(other)
    assert third.execute() == "done"
    assert all(job.pseudo is not None for job in workers.jobs)  # no teacher training
    assert third.run.weights_file(0).read_bytes() == first.run.weights_file(0).read_bytes()
    assert _generated(third.run) == _generated(first.run) and labeled(third.run) == labeled(
        first.run
    )
    rows = [first.run.read_gt(), third.run.read_gt()]
    a, b = (t.filter(is_generated(t["image_id"])).drop_columns(["box_id"]) for t in rows)
    assert a.equals(b)


def test_rcc_classes_by_name(cfg: ExperimentConfig) -> None:
    named = build_config(
        config_snapshot(cfg), ["ssl.teacher_strategy=rcc", "ssl.rcc_classes=['3']"]
    )
    loop, workers = _loop(named)
    assert loop.execute() == "done"
    run = loop.run
    gt = run.read_gt()
    rcc = gt.filter(is_generated(gt["image_id"]))
    assert rcc.num_rows > 0
    cats = run.read_categories()
    three = cats.filter(pc.equal(cats["name"], "3"))["class_id"][0].as_py()
    assert three in rcc["class_id"].to_pylist()  # crops of class '3' (with their neighbours)
    assert set(workers.jobs[0].labels["weight"].to_pylist()) == {1.0}  # no imscore


def test_unknown_rcc_class_is_refused(cfg: ExperimentConfig) -> None:
    bad = build_config(config_snapshot(cfg), ["ssl.teacher_strategy=rcc", "ssl.rcc_classes=['33']"])
    loop, _ = _loop(bad)
    with pytest.raises(DataError, match="no category of the run \\(did you mean '3'"):
        loop.execute()
    assert not _generated(loop.run)


def test_misspelt_blocks_and_curr_with_ema_are_refused() -> None:
    with pytest.raises(ConfigError, match="did you mean 'imscore'"):
        build_config({"loop": "ssl", "ssl": {"teacher_strategy": "rcc_imscroe"}})
    for name in ("curriculum_learning", "rcc_curriculum_learning_aug", "imscore_curr"):
        assert build_config({"ssl": {"teacher_strategy": name}}).ssl.teacher_strategy.blocks
    with pytest.raises(ConfigError, match="`curr` orders the pseudo-labeled"):
        build_config({"ssl": {"teacher_strategy": "curr", "teacher": "ema"}})
    with pytest.raises(ConfigError, match="rcf_lowest"):
        build_config({"loop": "ssl", "ssl": {"rcf_lowest": 5, "rcf_highest": 2}})
    spec = build_config({"ssl": {"teacher_strategy": "rcc_scale_full_im_imscore"}})
    assert spec.ssl.teacher_strategy.name == "rcc_scale_full_im_imscore"


def test_dry_run_shows_the_blocks(
    cfg: ExperimentConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from detloop.cli.main import main

    path = tmp_path / "ssl.yaml"
    path.write_text(yaml.safe_dump(config_snapshot(cfg)))
    assert (
        main(["run", str(path), "--dry-run", "--set", "ssl.teacher_strategy=rcc_scale_imscore"])
        == 0
    )
    out = capsys.readouterr().out
    assert "# teacher strategy: rcc_scale_imscore" in out
    assert "#   rcc: rare-class collages of the 2 rarest classes (seed 42; options: scale)" in out
    assert "#   imscore: each labeled object weighs its RCF class weight [1, 10]" in out


def test_teacher_only_trains_and_evaluates_round_0_only(cfg: ExperimentConfig) -> None:
    """``ssl.teacher_only`` (comparing teacher strategies): the split, the teacher, its
    evaluation and log; no prediction, pseudo-labels or student."""
    only = build_config(config_snapshot(cfg), ["ssl.teacher_only=true"])
    loop, workers = _loop(only)
    assert loop.run.path.name == "ssl-rcc_imscore+teacher-s0"  # never a student's directory
    assert {s.iteration for s in loop.plan()} == {0}
    loop.execute()
    assert len(workers.jobs) == 1  # the teacher's training only
    assert loop.run.metrics_file(0).exists() and not loop.run.predictions_file(1).exists()
