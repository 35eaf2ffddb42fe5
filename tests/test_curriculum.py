"""RCF curriculum batches in the train bench (ALGORITHMS §11.4): the rare/common split from the
labeled class weights, exactly one rare image per batch (B − 1 common), two RandAugment-ed rare
copies with ``aug``, the student's labeled part and (``curr``) pseudo part, and an SSL run with
``rcc_curriculum_learning`` end to end on digits-det tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import ci_overrides
from detloop.cli.main import main
from detloop.data.dataset import Augment
from detloop.data.io import read_json
from detloop.data.rundir import RunsRoot
from detloop.learners.checkpoint import read_metadata
from detloop.learners.curriculum import (
    CurriculumStreams,
    copy_range,
    curriculum_streams,
    with_copies,
)
from detloop.learners.streams import Streams
from detloop.selectors.pseudo import parse_teacher_strategy

REPO = Path(__file__).resolve().parents[1]


def _tables(classes_per_image: list[list[int]], prefix: str = "l") -> tuple[pa.Table, pa.Table]:
    ids = [f"{prefix}{k:02d}" for k in range(len(classes_per_image))]
    images = pa.table({"image_id": ids, "file": [f"{i}.png" for i in ids]})
    rows = [(ids[k], c) for k, cs in enumerate(classes_per_image) for c in cs]
    labels = pa.table(
        {
            "image_id": pa.array([r[0] for r in rows], pa.string()),
            "class_id": pa.array([r[1] for r in rows], pa.int32()),
        }
    )
    return images, labels


#: 10 labeled images: class 0 is common (many objects), class 2 is rare (one object, in l07),
#: class 1 in between (l03, l05)
LABELED = [[0, 0], [0], [0, 0, 0], [1, 0], [0], [1], [0, 0], [2], [0], [0, 0]]


def test_split_and_one_rare_image_per_batch() -> None:
    images, labels = _tables(LABELED)
    spec = parse_teacher_strategy("curriculum_learning")
    streams = curriculum_streams(spec, Streams.of(4, 10), images, labels, 3, (1.0, 10.0))
    assert isinstance(streams, CurriculumStreams)
    # counts {0: 12, 1: 2, 2: 1} → weights {0: 1, 1: 10, 2: 10}; image scores: l05, l07 = 10,
    # l03 = 5.5, the rest 1; ⌊10/4⌋ = 2 rare images (ties by image_id)
    assert streams.rare == ("l05", "l07")
    assert set(streams.common) == {f"l{k:02d}" for k in range(10)} - {"l05", "l07"}
    # max(2 rare, ceil(8 common / 3)) = 3 steps per epoch
    assert streams.steps_per_epoch == 3 and streams.batch_size == 4
    rare_rows = {5, 7}
    for epoch in (0, 1):
        batches = streams.epoch_batches(seed=1, epoch=epoch)
        assert len(batches) == 3
        for batch in batches:
            assert len(batch) == 4 and len(set(batch) & rare_rows) == 1
            assert batch[-1] in rare_rows  # the common images first, then the rare one
        commons = [i for b in batches for i in b[:3]]
        assert set(commons) == set(range(10)) - rare_rows  # every common image in the epoch
    assert streams.epoch_batches(1, 0) == streams.epoch_batches(1, 0) != streams.epoch_batches(1, 1)


def test_aug_adds_two_strongly_augmented_rare_copies() -> None:
    images, labels = _tables(LABELED)
    spec = parse_teacher_strategy("curriculum_learning_aug")
    streams = curriculum_streams(spec, Streams.of(4, 10), images, labels, 3, (1.0, 10.0))
    assert isinstance(streams, CurriculumStreams)
    assert streams.batch_size == 6 and streams.n_labeled == 12 and streams.n_copies == 2
    lo, hi = copy_range(streams)
    assert (lo, hi) == (10, 12)
    table = with_copies(images, streams)
    # the copies repeat the rare images, right after the labeled ones
    assert table["image_id"].to_pylist()[10:] == ["l05", "l07"]
    for batch in streams.epoch_batches(seed=2, epoch=0):
        assert len(batch) == 6
        copies = [i for i in batch if lo <= i < hi]
        assert len(copies) == 2 and len(set(batch[:4]) & {5, 7}) == 1
    aug = Augment(strong=lambda im, b, r: (im, b, np.arange(len(b))), strong_between=(lo, hi))
    aug = Augment(strong=aug.strong, strong_from=2**62, strong_between=(lo, hi))
    assert [aug.is_strong(i) for i in (9, 10, 11, 12)] == [False, True, True, False]


def test_student_parts_and_curr() -> None:
    lab_images, lab_labels = _tables(LABELED[:4])  # counts {0: 7, 1: 1}: class 1 rare
    p_images, p_labels = _tables([[0], [1], [0], [0, 1], [], [0], [0], [0]], prefix="p")
    images = pa.concat_tables([lab_images, p_images])
    labels = pa.concat_tables([lab_labels, p_labels])
    base = Streams.of(4, 4, 8)  # L = ceil(16/12) = 2, U = floor(32/12) = 2, 4 steps
    assert (base.labeled, base.pseudo, base.steps_per_epoch) == (2, 2, 4)
    spec = parse_teacher_strategy("curriculum_learning_curr")
    streams = curriculum_streams(spec, base, images, labels, 2, (1.0, 10.0))
    assert isinstance(streams, CurriculumStreams)
    # rare: the top ⌊4/2⌋ = 2; l03 holds the rare class 1, then l00..l02 tie (by image_id)
    assert streams.rare == ("l03", "l00") and streams.common == ("l01", "l02")
    assert streams.pseudo_rare[:2] == ("p01", "p03")  # top ⌊8/2⌋ = 4, class-1 images first
    assert len(streams.pseudo_rare) == 4
    assert streams.steps_per_epoch == 4  # the STAC count
    rare_l = {0, 3} & {int(i[1:]) for i in streams.rare}
    rare_p = {4 + int(i[1:]) for i in streams.pseudo_rare}
    for batch in streams.epoch_batches(seed=0, epoch=0):
        assert len(batch) == 4
        assert all(i < 4 for i in batch[:2]) and all(i >= 4 for i in batch[2:])
        assert len(set(batch[:2]) & rare_l) == 1 and batch[1] in rare_l
        assert len(set(batch[2:]) & rare_p) == 1 and batch[3] in rare_p
    # without curr the pseudo part is the plain STAC order
    plain = curriculum_streams(
        parse_teacher_strategy("curriculum_learning"), base, images, labels, 2, (1.0, 10.0)
    )
    assert isinstance(plain, CurriculumStreams) and not plain.pseudo_curriculum
    assert [b[2:] for b in plain.epoch_batches(0, 0)] == [b[2:] for b in base.epoch_batches(0, 0)]
    # no curriculum block: the plain streams themselves
    none = curriculum_streams(parse_teacher_strategy("imscore"), base, images, labels, 2, (1, 10))
    assert none is base


@pytest.mark.slow
def test_ssl_run_with_rcc_curriculum_learning(digits_tiny: Path, tmp_path: Path) -> None:
    args = ci_overrides(
        digits_tiny,
        tmp_path,
        "ray.in_process=true",
        "loop=ssl",
        "ssl.portion_labeled=25",
        "ssl.selection_strategy=score",
        "ssl.tau=0.0",
        "ssl.teacher_min_score=0.0",
        "ssl.max_per_image=3",
        "ssl.teacher_strategy=rcc_curriculum_learning_aug",
        "model.mc_dropoutsamp=2",
    )
    assert main(["run", str(REPO / "configs" / "ci.yaml"), *args]) == 0
    run = RunsRoot(tmp_path).run("ci", "ssl-rcc_curriculum_learning_aug+score+tau0-s0")
    assert "map" in read_json(run.metrics_file(0)) and "map" in read_json(run.metrics_file(1))
    teacher, student = (read_metadata(run.checkpoint(r))["curriculum"] for r in (0, 1))
    # 4 steps of B = 4: 3 common + 1 rare + 2 augmented rare copies; the collages are labeled
    assert teacher["batch_labeled"] == 6 and teacher["rare"] >= 1 and teacher["copies"] >= 1
    split = next(h for h in run.read_meta()["history"] if h["phase"] == "split")
    assert teacher["rare"] + teacher["common"] == split["labeled_with_rcc"] > split["labeled"]
    assert student["batch_labeled"] >= 1 and student["pseudo_rare"] == 0  # no `curr`
