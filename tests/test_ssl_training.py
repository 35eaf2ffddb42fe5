"""The STAC student's training (ALGORITHMS §11.1, §11.2): batch arithmetic, both streams
traversed, image weights applied once, the two-part loss."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from effdet.anchors import AnchorLabeler
from torchvision.ops import box_iou as torchvision_iou

from detloop.config import ExperimentConfig
from detloop.learners.checkpoint import load_state_dict, read_metadata
from detloop.learners.loss import (
    LossSettings,
    detection_loss,
    label_batch,
    level_sizes,
    make_anchors,
)
from detloop.learners.mean_teacher import MeanTeacher, OnlineSelection
from detloop.learners.model import (
    UncertainEfficientDet,
    flatten_levels,
    resolve_spec,
    split_box_maps,
)
from detloop.learners.streams import Streams
from detloop.learners.train import image_weights, train_model
from detloop.orchestrator.engine.workers import TrainJob, job_config
from detloop.selectors.pseudo import parse_pseudo_strategy
from learner_data import digits_root, split_tables

torch.set_num_threads(1)


def test_batch_arithmetic_pin() -> None:
    """§11 pin (a): B = 8, n_l = 598, n_u = 5 387 → L = 1, U = 7, 770 steps per epoch."""
    s = Streams.of(8, 598, 5387)
    assert (s.labeled, s.pseudo, s.steps_per_epoch, s.batch_size) == (1, 7, 770, 8)
    # the other rounding direction: L rounds up, U down, each at least 1
    assert (Streams.of(8, 5387, 598).labeled, Streams.of(8, 5387, 598).pseudo) == (8, 1)
    assert Streams.of(8, 1, 1000).labeled == 1 and Streams.of(8, 1, 1000).pseudo == 7
    assert Streams.of(8, 10).steps_per_epoch == 2 and Streams.of(8, 10).pseudo == 0
    with pytest.raises(ValueError):
        Streams.of(8, 0, 5)


@pytest.mark.parametrize(("n_l", "n_u", "b"), [(598, 5387, 8), (13, 5, 4), (7, 40, 3)])
def test_both_streams_are_traversed_each_epoch(n_l: int, n_u: int, b: int) -> None:
    s = Streams.of(b, n_l, n_u)
    for epoch in (0, 1):
        batches = s.epoch_batches(seed=3, epoch=epoch)
        assert len(batches) == s.steps_per_epoch
        lab = np.array([i for bt in batches for i in bt[: s.labeled]])
        pse = np.array([i for bt in batches for i in bt[s.labeled :]])
        assert all(len(bt) == s.batch_size for bt in batches)
        assert set(lab) == set(range(n_l)) and set(pse) == set(range(n_l, n_l + n_u))
        # the shorter stream cycles: no index repeats before every index appeared once
        for stream, n in ((lab, n_l), (pse, n_u)):
            assert len(set(stream[:n])) == min(n, len(stream))
    assert s.epoch_batches(3, 0) == s.epoch_batches(3, 0) != s.epoch_batches(3, 1)


def test_labeled_per_batch_overrides_the_arithmetic() -> None:
    """``ssl.labeled_per_batch`` k: k labeled + B − k pseudo-labeled images a step, both
    streams still traversed each epoch; refused when it leaves no pseudo-labeled image."""
    from detloop.config import ConfigError, build_config

    s = Streams.of(8, 598, 5387, labeled=4)
    assert (s.labeled, s.pseudo, s.steps_per_epoch) == (4, 4, 1347)  # ceil(5387 / 4)
    s = Streams.of(8, 200, 20, labeled=4)
    assert s.steps_per_epoch == 50  # the labeled stream is the longer one now
    assert Streams.of(8, 200, 0, labeled=4).labeled == 8  # no pseudo stream: supervised
    with pytest.raises(ValueError, match=r"outside 1\.\.7"):
        Streams.of(8, 598, 5387, labeled=8)
    with pytest.raises(ConfigError, match="leaves no pseudo-labeled image"):
        build_config({"loop": "ssl", "ssl": {"labeled_per_batch": 8}})
    with pytest.raises(ConfigError, match="CSD's batch"):
        build_config({"loop": "ssl", "ssl": {"labeled_per_batch": 2, "method": "csd"}})


def test_one_stream_order_is_the_supervised_one() -> None:
    """Without pseudo-labels the batches are the seeded permutation cut every B (unchanged)."""
    perm = np.random.default_rng([5, 2, 7]).permutation(10).tolist()
    assert Streams.of(4, 10).epoch_batches(5, 2) == [perm[0:4], perm[4:8], perm[8:10]]


def test_image_weights_scale_each_image_and_nothing_else() -> None:
    """§11 pin (d): image weights {2, 0.5} scale each image's anchor losses; an empty image
    weighs 1.0; the loss is the weighted sum of the per-image losses with the batch's
    normaliser."""
    cfg = ExperimentConfig.model_validate({"model": {"uncertainty": "lossatt"}})
    spec = resolve_spec(cfg.model, 3)
    anchors = make_anchors(spec)
    labeler = AnchorLabeler(anchors, 3, match_threshold=0.5)
    settings = LossSettings.from_config(cfg.model, spec)
    torch.manual_seed(0)
    model = UncertainEfficientDet(spec).eval()
    h, w = spec.image_size
    images = torch.randn(3, 3, h, w)
    boxes = torch.tensor(
        [[[4, 4, 30, 20], [10, 30, 40, 60]], [[8, 8, 40, 40], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 2],
        dtype=torch.float32,
    )
    classes = torch.tensor([[1, 2], [3, -1], [-1, -1]])
    with torch.no_grad():
        cls_maps, box_maps = model(images)
    mu, s = split_box_maps(model, box_maps)
    cls = flatten_levels(cls_maps, 3)
    sizes = level_sizes(anchors)

    def loss(weights: list[list[float]], empty: float) -> torch.Tensor:
        t = label_batch(labeler, boxes, classes, torch.tensor(weights), empty_weight=empty)
        return detection_loss(cls, mu, s, t, sizes, settings)[0]

    weights = [[2.0, 2.0], [0.5, 0.0], [0.0, 0.0]]  # a_0 = 2, a_1 = 0.5, a_2 = empty → 1
    t = label_batch(labeler, boxes, classes, torch.tensor(weights), empty_weight=1.0)
    assert float(t.weight[2].min()) == float(t.weight[2].max()) == 1.0
    assert float(t.weight[0].max()) == float(t.weight[0].min()) == 2.0
    assert float(t.weight[1].max()) == float(t.weight[1].min()) == 0.5
    # each image alone with weight 1 (the others 0; the positives' normaliser is the batch's)
    alone = [
        loss([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]], 0.0),
        loss([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], 0.0),
        loss([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], 1.0),
    ]
    expected = 2.0 * alone[0] + 0.5 * alone[1] + 1.0 * alone[2]
    assert float(loss(weights, 1.0)) == pytest.approx(float(expected), rel=1e-5)
    assert float(alone[2]) > 0  # the empty image's background anchors do count
    a = image_weights(classes, torch.tensor(weights), empty=1.0)
    assert a.tolist() == [2.0, 0.5, 1.0]


def test_ignore_regions_silence_the_anchors_they_cover_and_nothing_else() -> None:
    """``ssl.rejected: ignore``: an anchor matched to no object that an ignore region (class
    0) would be matched to (IoU ≥ 0.5, or its best anchor) gets class -2 (no class loss);
    anchors matched to an object keep their class even inside a region; positives, their
    count and the image weight a_i (the region is no object) are those of the image without
    the region."""
    cfg = ExperimentConfig.model_validate({"model": {"uncertainty": "lossatt"}})
    spec = resolve_spec(cfg.model, 3)
    anchors = make_anchors(spec)
    labeler = AnchorLabeler(anchors, 3, match_threshold=0.5)
    obj, region = [4.0, 4.0, 30.0, 20.0], [40.0, 40.0, 60.0, 64.0]
    plain = label_batch(
        labeler, torch.tensor([[obj, [0.0] * 4]]), torch.tensor([[1, -1]]),
        torch.tensor([[2.0, 0.0]]),
    )  # fmt: skip
    # the region twice: once apart, once over the object (the object's anchors stay positive)
    with_regions = label_batch(
        labeler, torch.tensor([[obj, region, obj]]), torch.tensor([[1, 0, 0]]),
        torch.tensor([[2.0, 1.0, 1.0]]),
    )  # fmt: skip
    iou = torchvision_iou(anchors.boxes, torch.tensor([region])).squeeze(1)
    would_match = iou >= 0.5
    would_match[iou.argmax()] = True  # the forced match of a region as small as the anchors
    expected = plain.cls[0].clone()
    expected[would_match & (plain.cls[0] == -1)] = -2
    assert int((expected == -2).sum()) > 0  # the region does cover background anchors
    assert torch.equal(with_regions.cls[0], expected)
    assert torch.equal(with_regions.num_pos, plain.num_pos)
    assert torch.equal(with_regions.box, plain.box) and torch.equal(
        with_regions.weight, plain.weight
    )
    a = image_weights(torch.tensor([[1, 0, -1]]), torch.tensor([[2.0, 9.0, 9.0]]), empty=1.0)
    assert a.tolist() == [2.0]  # a region is not an object: a_i = 2, not the mean with 9
    only = image_weights(torch.tensor([[0, -1]]), torch.tensor([[9.0, 9.0]]), empty=1.0)
    assert only.tolist() == [1.0]  # an image with regions only weighs as an empty image


@pytest.fixture(scope="module")
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[pa.Table, pa.Table]:
    return split_tables(digits_root(request, tmp_path_factory), "pool")


def test_student_trains_on_both_streams(pool: tuple[pa.Table, pa.Table], tmp_path: Path) -> None:
    images, labels = pool
    lab_imgs, pse_imgs = images.slice(0, 6), images.slice(6, 18)
    pseudo_labels = labels.filter(
        pa.compute.is_in(labels["image_id"], value_set=pse_imgs["image_id"])
    )
    cfg = ExperimentConfig.model_validate(
        {"train": {"device": "cpu", "epochs": 2, "batch_size": 4}, "ssl": {"stac_lambda": 0.5}}
    )
    result = train_model(
        cfg, lab_imgs, labels, 10, tmp_path / "ck", seed=0, progress=False,
        pseudo=(pse_imgs, pseudo_labels),
    )  # fmt: skip
    # L = ceil(4·6/18) = 2, U = floor(4·12/18) = 2, steps = ceil(max(6/2, 12/2)) = 6 per epoch
    assert result.steps == 12
    for h in result.history:
        assert h["sup_loss"] > 0 and h["unsup_loss"] > 0 and h["pseudo_per_image"] > 0
        # loss = L_l + λ·L_u, averaged over the same steps
        assert h["loss"] == pytest.approx(h["sup_loss"] + 0.5 * h["unsup_loss"], rel=1e-5)


def test_eval_steps_set_a_students_val_evaluations_in_steps(
    pool: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    """``TrainJob.eval_steps`` (``ssl.student_eval_steps``): early stopping evaluates val every
    round(eval_steps / steps per epoch) epochs; without it every ``train.eval_steps`` steps
    (the same rounding) or, that unset too, every ``train.map_freq`` epochs (here 100: never)."""
    images, labels = pool
    lab_imgs, pse_imgs = images.slice(0, 6), images.slice(6, 18)
    pseudo_labels = labels.filter(pc.is_in(labels["image_id"], value_set=pse_imgs["image_id"]))
    val_imgs = images.slice(18, 2)
    val = (val_imgs, labels.filter(pc.is_in(labels["image_id"], value_set=val_imgs["image_id"])))
    train = {"device": "cpu", "epochs": 3, "batch_size": 4, "early_stopping": True}
    cfg = ExperimentConfig.model_validate({"train": {**train, "map_freq": 100}})

    def evaluated(out: str, eval_steps: int | None) -> list[float]:
        # a train worker's config: the job's interval (a student's) in place of train's
        job = TrainJob(lab_imgs, labels, 10, str(tmp_path / out), 0, eval_steps=eval_steps)
        result = train_model(
            job_config(cfg, job), lab_imgs, labels, 10, tmp_path / out, seed=0, progress=False,
            pseudo=(pse_imgs, pseudo_labels), val=val,
        )  # fmt: skip
        return [h["epoch"] for h in result.history if "val_map50" in h]

    # 6 steps per epoch (test_student_trains_on_both_streams): 12 steps = every 2nd epoch
    assert evaluated("steps", 12) == [1.0]
    assert evaluated("steps_small", 1) == [0.0, 1.0, 2.0]  # at least every epoch
    assert evaluated("epochs", None) == []
    # train.eval_steps is the same interval for any training; the job's (a student's own,
    # ssl.student_eval_steps) takes its place
    cfg = ExperimentConfig.model_validate({"train": {**train, "map_freq": 100, "eval_steps": 12}})
    assert evaluated("train_steps", None) == [1.0]
    assert evaluated("train_steps_student", 1) == [0.0, 1.0, 2.0]


def test_pseudo_box_weight_scales_the_pseudo_part_box_loss_only(
    pool: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    """``ssl.pseudo_box_weight`` w: loss = L_l + λ·(cls_u + w_box·w·box_u); w = 0 leaves the
    pseudo-labels a class target only (the labeled part's box loss stays)."""
    images, labels = pool
    lab_imgs, pse_imgs = images.slice(0, 6), images.slice(6, 18)
    on = pa.compute.is_in(labels["image_id"], value_set=pse_imgs["image_id"])
    lab_labels = labels.filter(pa.compute.is_in(labels["image_id"], value_set=lab_imgs["image_id"]))

    def step(weight: float) -> dict[str, float]:
        cfg = ExperimentConfig.model_validate(
            {
                "train": {"device": "cpu", "epochs": 1, "batch_size": 4, "max_steps": 1},
                "ssl": {"stac_lambda": 0.5, "pseudo_box_weight": weight},
            }
        )
        result = train_model(
            cfg, lab_imgs, lab_labels, 10, tmp_path / f"w{weight}", seed=0, progress=False,
            pseudo=(pse_imgs, labels.filter(on)),
        )  # fmt: skip
        return result.history[-1]

    one, none = step(1.0), step(0.0)
    # the first step's forward pass is the same (same weights, same batch): only the sum differs
    assert none["sup_loss"] == pytest.approx(one["sup_loss"], rel=1e-6)
    assert none["unsup_loss"] == pytest.approx(one["unsup_loss"], rel=1e-6)
    assert none["cls_loss"] == pytest.approx(one["cls_loss"], rel=1e-6)
    assert none["box_loss"] < one["box_loss"] and none["loss"] < one["loss"]
    # loss = cls + w_box·box in both (w_box: the model's box weight, 100 with LA)
    for h in (one, none):
        assert h["loss"] == pytest.approx(h["cls_loss"] + 100.0 * h["box_loss"], rel=1e-5)


def test_student_trains_with_ignore_regions(
    pool: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    """A pseudo stream with ignore regions (``with_ignore_regions``) trains; a region is no
    pseudo-label in the health numbers."""
    from detloop.selectors.pseudo import with_ignore_regions

    images, labels = pool
    lab_imgs, pse_imgs = images.slice(0, 6), images.slice(6, 18)
    on = pa.compute.is_in(labels["image_id"], value_set=pse_imgs["image_id"])
    pseudo_labels = labels.filter(on)
    preds = pseudo_labels.select(["image_id", "x1", "y1", "x2", "y2"]).append_column(
        "score", pa.array(np.full(pseudo_labels.num_rows, 0.5), pa.float32())
    )
    stream = with_ignore_regions(pseudo_labels.slice(0, 0), preds, 0.1)
    assert stream.num_rows == 0  # no pseudo-labeled image: no region either
    # one pseudo-label per image (its first box): the image's other boxes become regions
    ids = pseudo_labels["image_id"].to_pylist()
    first = [k for k, i in enumerate(ids) if k == 0 or ids[k - 1] != i]
    half = pseudo_labels.take(pa.array(first))
    assert half.num_rows < pseudo_labels.num_rows
    stream = with_ignore_regions(half, preds, 0.1)
    cfg = ExperimentConfig.model_validate(
        {"train": {"device": "cpu", "epochs": 1, "batch_size": 4}}
    )

    lab_labels = labels.filter(pa.compute.is_in(labels["image_id"], value_set=lab_imgs["image_id"]))

    def train(rows: pa.Table, out: str) -> list[dict[str, float]]:
        result = train_model(
            cfg, lab_imgs, lab_labels, 10, tmp_path / out, seed=0, progress=False,
            pseudo=(pse_imgs, rows),
        )  # fmt: skip
        assert result.steps == 6 and np.isfinite(result.final_loss)
        return result.history

    with_regions, without = train(stream, "regions"), train(half, "plain")
    # the same pseudo-labels per image (objects only, never regions), another loss
    assert with_regions[-1]["pseudo_per_image"] == without[-1]["pseudo_per_image"] > 0
    assert with_regions[-1]["unsup_loss"] != without[-1]["unsup_loss"]


def _selection(decay: float = 0.9) -> OnlineSelection:
    spec = parse_pseudo_strategy("score")
    return OnlineSelection(spec, tau=0.0, min_score=0.0, max_per_image=3, decay=decay)


def test_mean_teacher_update_is_the_ema_formula() -> None:
    """θ_t ← α·θ_t + (1 − α)·θ_s on float entries (BatchNorm statistics too); counters copied."""
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    teacher = MeanTeacher(student, _selection(0.9), ExperimentConfig())  # type: ignore[arg-type]
    t0 = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        student[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        student[1].running_mean.copy_(torch.tensor([10.0, -10.0]))
        student[1].num_batches_tracked.fill_(7)
    teacher.update(student)
    got = teacher.model.state_dict()
    expected_w = 0.9 * t0["0.weight"] + 0.1 * torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(got["0.weight"], expected_w)
    torch.testing.assert_close(got["1.running_mean"], torch.tensor([1.0, -1.0]))
    assert int(got["1.num_batches_tracked"]) == 7 and teacher.updates == 1
    assert not any(p.requires_grad for p in teacher.model.parameters())
    restored = MeanTeacher(student, _selection(0.9), ExperimentConfig())  # type: ignore[arg-type]
    restored.load_state_dict(teacher.state_dict())
    torch.testing.assert_close(restored.model.state_dict()["0.weight"], expected_w)


def test_online_teacher_trains_and_resumes_exactly(
    pool: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    """The student of an online mean teacher: pseudo-labels every step; stopped half-way and
    resumed from its partial checkpoint (teacher state included) it ends with the same
    weights; the checkpoint is the teacher's."""
    images, labels = pool
    lab_imgs, unl_imgs = images.slice(0, 4), images.slice(4, 12)
    cfg = ExperimentConfig.model_validate(
        {"train": {"device": "cpu", "epochs": 1, "batch_size": 4, "save_freq": 100}}
    )
    empty = labels.slice(0, 0)

    # the unlabeled images' hidden gt: scores the online pseudo-labels, selects none
    gt = labels.filter(pc.is_in(labels["image_id"], value_set=unl_imgs["image_id"]))
    online = replace(_selection(0.5), gt=gt)

    def run(out: str, stop: int | None = None) -> Path:
        result = train_model(
            cfg, lab_imgs, labels, 10, tmp_path / out, seed=1, progress=False,
            pseudo=(unl_imgs, empty), online=online, stop_at_step=stop,
        )  # fmt: skip
        return Path(result.checkpoint)

    whole = run("a")
    assert run("b", stop=2).name == "b.partial"
    resumed = run("b")
    a, b = load_state_dict(whole), load_state_dict(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist = read_metadata(whole)["history"]
    # L = ceil(4·4/12) = 2, U = floor(4·8/12) = 2: 4 steps; τ = 0 keeps 3 per image
    assert read_metadata(whole)["steps"] == 4
    # (strong augmentation may push a box out of the image)
    assert 1.0 <= hist[-1]["pseudo_per_image"] <= 3.0 and hist[-1]["unsup_loss"] > 0
    # the epoch's online pseudo-labels scored: each unlabeled image labeled once with 3 boxes
    # (τ = 0, cap 3), against all of its gt boxes; a resumed run records the epoch's two
    # parts, whose counts add up to the whole's
    q, n = hist[-1], 3 * unl_imgs.num_rows
    assert q["pseudo_boxes"] == n and q["pseudo_gt_boxes"] == gt.num_rows
    assert q["pseudo_precision"] == q["pseudo_matched"] / n
    assert q["pseudo_recall"] == q["pseudo_matched"] / gt.num_rows
    parts = read_metadata(resumed)["history"]
    assert [h["step"] for h in parts] == [2, 4]
    for key in ("pseudo_boxes", "pseudo_gt_boxes", "pseudo_matched"):
        assert sum(h[key] for h in parts) == q[key]


def test_init_weights_load_whole_even_when_the_config_starts_from_a_backbone(
    pool: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    """A previous model (a teacher, a previous student) is loaded whole; ``weights_kind:
    backbone`` applies to ``model.weights`` only (it once cut an EMA student's start down to
    the backbone, leaving the heads random)."""
    from detloop.learners.checkpoint import write_checkpoint
    from detloop.learners.model import build_model

    images, labels = pool
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"weights_kind": "backbone"},
            "train": {"device": "cpu", "max_steps": 1, "batch_size": 2, "lr": 0.0,
                      "warmup_lr": 0.0, "optimizer": "adamw"},
        }
    )  # fmt: skip
    torch.manual_seed(123)
    init = build_model(cfg.model, 10)
    write_checkpoint(tmp_path / "init", init.state_dict(), {"model_spec": init.spec.to_json()})
    result = train_model(
        cfg, images.slice(0, 2), labels, 10, tmp_path / "out", seed=0, progress=False,
        init_weights=tmp_path / "init",
    )  # fmt: skip
    got, start = load_state_dict(result.checkpoint), load_state_dict(tmp_path / "init")
    heads = [k for k in start if not k.startswith("backbone.") and start[k].is_floating_point()]
    assert heads and all(torch.equal(got[k], start[k]) for k in heads if "running" not in k)
