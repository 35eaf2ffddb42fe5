"""CSD, consistency-based SSL (ALGORITHMS §11.9): pin (i) — JSD and KL, the ramp, the split —
then the flip-back alignment on effdet's anchors, background elimination and the box
consistency on hand examples, the batch composition, the bench's loss, the config's refusals
and an SSL run with ``ssl.method: csd`` end to end on digits-det tiny, in-process."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F

from detloop.config import ConfigError, ExperimentConfig, ModelConfig, build_config, config_snapshot
from detloop.learners.csd import (
    CsdSettings,
    background_mask,
    box_discrepancy,
    class_divergence,
    consistency_losses,
    flip_back,
)
from detloop.learners.loss import level_sizes, make_anchors
from detloop.learners.model import resolve_spec
from detloop.learners.streams import Streams
from detloop.learners.train import train_model
from detloop.orchestrator.engine.local_workers import LocalWorkers
from detloop.orchestrator.engine.runs import create_run, stored_config, strategy_name
from detloop.orchestrator.engine.workers import TrainJob, TrainOutcome
from detloop.orchestrator.loops.semi_supervised import SemiSupervisedLoop, labeled_split
from learner_data import digits_root, split_tables
from test_loop_inprocess import ci_config, small_val
from test_ssl_loop_inprocess import Series, _interrupt

torch.set_num_threads(1)


# ---- pin (i) ------------------------------------------------------------------------------
def test_jsd_of_identical_distributions_is_zero_and_symmetric() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    assert torch.allclose(class_divergence(x, x, "jsd"), torch.zeros(6), atol=1e-7)
    assert torch.allclose(class_divergence(x + 3.0, x, "jsd"), torch.zeros(6), atol=1e-6)
    jsd = class_divergence(x, y, "jsd")
    assert torch.allclose(jsd, class_divergence(y, x, "jsd"), atol=1e-7)
    assert bool((jsd > 0).all()) and bool((jsd <= math.log(2) + 1e-6).all())
    # by definition: ½KL(p‖m) + ½KL(q‖m), m = ½(p + q)
    p, q = x.softmax(-1), y.softmax(-1)
    m = 0.5 * (p + q)
    ref = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(jsd, ref, atol=1e-6)


def test_kl_equals_torch_kl_div() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 7, generator=gen), torch.randn(4, 3, 7, generator=gen)
    ref = F.kl_div(F.log_softmax(y, -1), F.softmax(x, -1), reduction="none").sum(-1)
    assert torch.allclose(class_divergence(x, y, "kl"), ref, atol=1e-6)
    # over another axis, as a level's [B, A, C, H, W] maps use it
    ref_dim = F.kl_div(F.log_softmax(y, 1), F.softmax(x, 1), reduction="none").sum(1)
    assert torch.allclose(class_divergence(x, y, "kl", dim=1), ref_dim, atol=1e-6)


def test_ramp_weight_at_the_breakpoints() -> None:
    n = 1200  # t_up = 320, t_down = 1000
    on, off = CsdSettings(), CsdSettings(ramp=False)
    assert on.weight(0, n) == 0.0 and on.weight(320, n) == 1.0 and on.weight(1000, n) == 1.0
    assert on.weight(n, n) == pytest.approx(math.exp(-12.5))
    assert on.weight(160, n) == pytest.approx(math.exp(-5 * 0.25))
    assert {off.weight(t, n) for t in (0, 320, 1000, n)} == {1.0}


def test_reference_split_labels_1496_of_5985() -> None:
    ids = [f"pool/{i:05d}" for i in range(5985)]
    images = pa.table(
        {"image_id": ids, "file": [f"{i}.png" for i in ids], "split": ["pool"] * 5985}
    )
    chosen = labeled_split(images, 10, "random", seed=0, csd=(8, 3))
    assert len(chosen) == 1496 and len(set(chosen)) == 1496
    assert labeled_split(images, 10, "first_n", seed=0, csd=(8, 3)) == ids[:1496]
    assert len(labeled_split(images, 10, "random", seed=0)) == 598  # the portion, unchanged


# ---- flip-back alignment -------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "size"), [("tiny", None), ("d0", None), ("tiny", "256x128")])
def test_anchor_layout_is_flip_symmetric(preset: str, size: str | None) -> None:
    """Mirroring the image maps anchor a of column j onto anchor a of column W − 1 − j, so
    flipping a level's maps back along the width aligns the anchors of both views."""
    spec = resolve_spec(ModelConfig(preset=preset, image_size=size), 3)
    anchors = make_anchors(spec)
    width = spec.image_size[1]
    a = anchors.get_anchors_per_location()
    boxes = anchors.boxes.double()
    start = 0
    for level, n in zip(
        range(spec.min_level, spec.max_level + 1), level_sizes(anchors), strict=True
    ):
        h, w = anchors.feat_sizes[level]
        grid = boxes[start : start + n].reshape(h, w, a, 4)  # yxyx
        start += n
        mirrored = torch.stack(
            [grid[..., 0], width - grid[..., 3], grid[..., 2], width - grid[..., 1]], -1
        )
        assert torch.allclose(mirrored.flip(1), grid, atol=1e-3)  # float32 pixels


def test_flip_back_reverses_the_columns_of_every_level() -> None:
    level = torch.arange(5.0).view(1, 1, 1, 5).expand(2, 3, 2, 5)  # value = column index
    back = flip_back([level, level[..., :2]])
    assert back[0][0, 0, 0].tolist() == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert back[1][1, 2, 1].tolist() == [1.0, 0.0]


def _mirror(
    cls_maps: list[torch.Tensor], box_maps: list[torch.Tensor], a: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The maps a perfectly flip-equivariant model gives for the mirrored images: every map
    mirrored along the width, t_x negated."""
    boxes = []
    for m in box_maps:
        b, _, h, w = m.shape
        sign = torch.ones(1, a, 4, 1, 1)
        sign[:, :, 1] = -1.0
        boxes.append((m.view(b, a, 4, h, w) * sign).view(b, 4 * a, h, w).flip(-1))
    return [m.flip(-1) for m in cls_maps], boxes


def test_consistency_of_an_equivariant_model_is_zero() -> None:
    gen = torch.Generator().manual_seed(2)
    a, c = 3, 4
    cls_maps = [torch.randn(2, a * c, s, s, generator=gen) for s in (4, 2)]
    box_maps = [torch.randn(2, 4 * a, s, s, generator=gen) for s in (4, 2)]
    flipped = _mirror(cls_maps, box_maps, a)
    for kind in ("jsd", "kl"):
        l_cls, l_box = consistency_losses(
            (cls_maps, box_maps), flipped, a, CsdSettings(consistency=kind)
        )
        assert float(l_cls) == pytest.approx(0.0, abs=1e-6) and float(l_box) == 0.0
    # without flipping back (or with t_x not negated) the views disagree
    l_cls, l_box = consistency_losses(
        (cls_maps, box_maps), (cls_maps, box_maps), a, CsdSettings(be=False)
    )
    assert float(l_cls) > 0 and float(l_box) > 0
    # LA models: only the mean half enters (the uncertainty channels differ freely)
    la_maps = [torch.cat([m, torch.randn(m.shape, generator=gen)], 1) for m in box_maps]
    la_flip = [torch.cat([m, torch.randn(m.shape, generator=gen)], 1) for m in flipped[1]]
    _, l_box = consistency_losses((cls_maps, la_maps), (flipped[0], la_flip), a, CsdSettings())
    assert float(l_box) == 0.0


# ---- hand examples ---------------------------------------------------------------------------
def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_background_elimination_per_image_or_over_the_batch() -> None:
    # [B=2, A=1, C=2, H=1, W=2]; each anchor's max score: image 0 (0.9, 0.3), image 1 (0.2, 0.1)
    scores = [[[0.9, 0.3], [0.5, 0.1]], [[0.2, 0.05], [0.1, 0.1]]]  # [image][class][column]
    logits = torch.tensor([[_logit(p) for p in row] for img in scores for row in img])
    logits = logits.view(2, 1, 2, 1, 2)
    image = background_mask(logits, "image_level")  # thresholds 0.36 and 0.08
    assert image.view(2, 2).tolist() == [[1.0, 0.0], [1.0, 1.0]]
    batch = background_mask(logits, "batch")  # one threshold, 0.36
    assert batch.view(2, 2).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    # around the boundary 0.4 × 0.5 = 0.2 (anchors A = 3, one class)
    edge = torch.tensor([_logit(0.5), _logit(0.21), _logit(0.19)]).view(1, 3, 1, 1, 1)
    assert background_mask(edge, "image_level").flatten().tolist() == [1.0, 1.0, 0.0]


def test_box_consistency_flips_the_sign_of_t_x() -> None:
    box = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 1, 4, 1, 1)
    consistent = torch.tensor([0.1, -0.2, 0.3, 0.4]).view(1, 1, 4, 1, 1)
    assert float(box_discrepancy(box, consistent)) == pytest.approx(0.0)
    # t_x not mirrored: (0.2 + 0.2)² = 0.16 over 4 components; t_w off by 0.2 adds 0.04 / 4
    assert float(box_discrepancy(box, box)) == pytest.approx(0.04)
    other = torch.tensor([0.1, -0.2, 0.3, 0.6]).view(1, 1, 4, 1, 1)
    assert float(box_discrepancy(box, other)) == pytest.approx(0.01)


def test_losses_sum_over_anchors_per_image_and_average_levels() -> None:
    """Class: Σ over anchors / B; box: mean over anchors (eliminated ones count 0); both
    averaged over levels. A hand level with one disagreeing anchor of two in a batch of 2."""
    a, c = 1, 2
    same = torch.zeros(2, a * c, 1, 2)
    off = same.clone()
    off[0, 0, 0, 1] = math.log(3.0)  # image 0, column 1 (after flipping back): p_f = (3/4, 1/4)
    box = torch.zeros(2, 4, 1, 2)
    box_off = box.clone()
    box_off[1, 3, 0, 0] = 0.4  # image 1, t_w, column 0 after flipping back
    flipped = ([off.flip(-1)], [box_off.flip(-1)])
    l_cls, l_box = consistency_losses(
        ([same], [box]), flipped, a, CsdSettings(consistency="kl", be=False)
    )
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(l_cls) == pytest.approx(kl / 2)  # one anchor's KL over a batch of 2
    assert float(l_box) == pytest.approx(0.16 / 4 / 4)  # one of 4 anchors, one of 4 entries
    two = consistency_losses(
        ([same, same], [box, box]),
        ([off.flip(-1)] * 2, [box.flip(-1)] * 2),
        a,
        CsdSettings(consistency="kl", be=False),
    )
    assert float(two[0]) == pytest.approx(kl / 2) and float(two[1]) == 0.0


# ---- batch composition -------------------------------------------------------------------------
def test_csd_batches_take_b_over_ratio_plus_one_labeled_images() -> None:
    s = Streams.csd(8, 1496, 4489, 3)
    assert (s.labeled, s.pseudo, s.batch_size) == (2, 6, 8)
    assert s.steps_per_epoch == max(math.ceil(1496 / 2), math.ceil(4489 / 6)) == 749
    assert (Streams.csd(8, 10, 10, 1).labeled, Streams.csd(8, 10, 10, 1).pseudo) == (4, 4)
    assert Streams.of(8, 598, 5387).labeled == 1  # STAC's arithmetic untouched
    small = Streams.csd(4, 5, 11, 3)  # L = 1, U = 3
    for epoch in (0, 1):
        batches = small.epoch_batches(seed=0, epoch=epoch)
        assert len(batches) == small.steps_per_epoch == 5
        assert all(b[0] < 5 and all(i >= 5 for i in b[1:]) and len(b) == 4 for b in batches)
        assert {b[0] for b in batches} == set(range(5))
        assert {i for b in batches for i in b[1:]} == set(range(5, 16))
    for bad in ((3, 5, 5, 3), (8, 0, 5, 3), (8, 5, 0, 3)):
        with pytest.raises(ValueError, match="no CSD batches"):
            Streams.csd(*bad)


# ---- config --------------------------------------------------------------------------------
def _cfg(*overrides: str) -> ExperimentConfig:
    return build_config({"loop": "ssl"}, ["ssl.method=csd", *overrides])


def test_config_refuses_what_csd_cannot_take() -> None:
    cases = {
        "ssl.teacher=ema": "teacher: ema need method: stac",
        "ssl.selection_strategy=selftrain_score": "selftrain",
        "ssl.pls=top": "pls: top",
        "train.workers=2": "trains on one worker",
        "train.batch_size=3": "batch_size 3 < csd_ratio",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            _cfg(override)
    with pytest.raises(ConfigError, match="method of loop: ssl"):
        build_config({"loop": "al"}, ["ssl.method=csd", "al.ssl=true"])
    with pytest.raises(ConfigError, match="csd_ratio"):
        _cfg("ssl.csd_ratio=0")
    cfg = _cfg("train.batch_size=4")
    assert (cfg.ssl.csd_consistency, cfg.ssl.csd_be, cfg.ssl.csd_be_scope) == (
        "jsd",
        True,
        "image_level",
    )
    assert cfg.ssl.csd_ramp and cfg.ssl.csd_split == "portion" and cfg.ssl.csd_ratio == 3


def test_run_names_say_csd_and_its_options() -> None:
    assert strategy_name(_cfg()) == "csd"
    named = _cfg("ssl.csd_consistency=kl", "ssl.csd_be_scope=batch", "ssl.csd_ratio=1")
    assert strategy_name(named) == "csd_r1_kl_bebatch"
    assert strategy_name(_cfg("ssl.csd_be=false", "ssl.csd_ramp=false")) == "csd_nobe_noramp"
    assert strategy_name(_cfg("ssl.teacher_strategy=imscore")) == "imscore+csd"
    assert strategy_name(build_config({"loop": "ssl"}, [])) == "score"  # STAC: unchanged


# ---- the train bench -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[pa.Table, pa.Table]:
    return split_tables(digits_root(request, tmp_path_factory), "pool")


def _one_step(pool: tuple[pa.Table, pa.Table], out: Path, **ssl: Any) -> dict[str, float]:
    images, labels = pool
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"preset": "tiny", "uncertainty": "lossatt"},
            "train": {"device": "cpu", "batch_size": 4, "epochs": 1, "max_steps": 1},
            "ssl": {"method": "csd", **ssl},
        }
    )
    lab = images.slice(0, 4)
    lab_labels = labels.filter(pc.is_in(labels["image_id"], lab["image_id"]))
    result = train_model(
        cfg, lab, lab_labels, 10, out, seed=0, progress=False, unlabeled=images.slice(4, 12)
    )
    assert result.steps == 1
    return result.history[0]


@pytest.mark.slow
def test_csd_loss_is_the_supervised_loss_plus_the_weighted_consistency(
    pool: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    ramped = _one_step(pool, tmp_path / "ramp")  # w(0) = 0: the supervised loss alone
    assert ramped["loss"] == ramped["sup_loss"] and ramped["unsup_loss"] > 0
    assert "pseudo_per_image" not in ramped and ramped["box_rmse"] > 0
    flat = _one_step(pool, tmp_path / "flat", csd_ramp=False)  # w = 1
    assert flat["loss"] == pytest.approx(flat["sup_loss"] + flat["unsup_loss"], rel=1e-6)
    assert flat["sup_loss"] == ramped["sup_loss"]  # the same first pass, seeded
    kl = _one_step(pool, tmp_path / "kl", csd_ramp=False, csd_consistency="kl", csd_be=False)
    assert kl["sup_loss"] == flat["sup_loss"] and kl["unsup_loss"] != flat["unsup_loss"]


def test_train_model_refuses_pseudo_labels_with_unlabeled_images(
    pool: tuple[pa.Table, pa.Table], tmp_path: Path
) -> None:
    images, labels = pool
    cfg = ExperimentConfig.model_validate({"model": {"preset": "tiny"}, "ssl": {"method": "csd"}})
    with pytest.raises(ValueError, match="not pseudo-labels"):
        train_model(
            cfg, images.slice(0, 4), labels, 10, tmp_path, seed=0, progress=False,
            pseudo=(images.slice(4, 4), labels), unlabeled=images.slice(8, 4),
        )  # fmt: skip


# ---- the SSL loop end to end ---------------------------------------------------------------------
class RecordingWorkers(LocalWorkers):
    """In-process workers that keep every train job."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.jobs: list[TrainJob] = []

    def train(self, job: TrainJob) -> TrainOutcome:
        self.jobs.append(job)
        return super().train(job)


@pytest.mark.slow
def test_ssl_run_with_csd_end_to_end(digits_tiny: Path, tmp_path: Path) -> None:
    val = small_val(digits_tiny, tmp_path / "val.json", n_images=8)
    base = ci_config(digits_tiny, val, tmp_path / "runs")
    extra = ["loop=ssl", "ssl.method=csd", "ssl.portion_labeled=25", "ray.in_process=true",
             "model.mc_dropoutsamp=2", "train.max_steps=3"]  # fmt: skip
    cfg = build_config(config_snapshot(base), extra)
    run = create_run(cfg)
    assert run.name == "ssl-csd-s0"
    stored = stored_config(run)
    workers = RecordingWorkers(stored)
    series = Series()
    loop = SemiSupervisedLoop(run, stored, [series], lambda _: workers, _interrupt)
    assert loop.execute() == "done"
    steps = [(h["iteration"], h["phase"]) for h in run.read_meta()["history"] if h["ended"]]
    assert [p for r, p in steps if r == 0] == ["import", "split", "train", "evaluate", "log"]
    assert [p for r, p in steps if r == 1] == ["train", "evaluate", "log", "done"]  # no predict
    teacher, csd = workers.jobs
    assert teacher.unlabeled is None and teacher.pseudo is None
    labeled_ids = set(run.read_meta()["labeled_ids"])
    assert csd.pseudo is None and csd.init_weights is None and csd.unlabeled is not None
    assert set(csd.images["image_id"].to_pylist()) == labeled_ids
    unlabeled = set(csd.unlabeled["image_id"].to_pylist())
    assert len(unlabeled) == 64 - len(labeled_ids) and not unlabeled & labeled_ids
    labels = run.read_labels()
    assert "pseudo" not in set(labels["source"].to_pylist())  # no pseudo-labels at all
    assert {"csd_loss", "csd_sup_loss", "csd_unsup_loss", "teacher_loss"} <= set(series.series)
    assert all(np.isfinite(v) and v > 0 for _, v in series.series["csd_unsup_loss"])
    assert run.read_meta()["journal"]["phase"] == "done"
    assert {"map", "round"} <= set(series.iterations[-1]) and series.iterations[-1]["round"] == 1
