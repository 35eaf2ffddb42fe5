"""The one inference path (ALGORITHMS §3) on real digits-det images with tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.learners.checkpoint import state_bytes
from detloop.learners.decode import decode_boxes
from detloop.learners.model import TW, build_model
from detloop.learners.predict import Predictor, PredictStats, _to_original
from learner_data import digits_root, split_tables

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    root = digits_root(request, tmp_path_factory)
    return split_tables(root, "val", limit=4)[0]


def predictor(setup: str = "mcdropout_lossatt", **kw: object) -> Predictor:
    cfg = ExperimentConfig.model_validate({"model": {"uncertainty": setup, **kw}})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10)
    return Predictor(model, cfg, device="cpu")


def col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


@pytest.mark.parametrize(
    ("setup", "la", "mc"),
    [
        ("baseline", False, False),
        ("lossatt", True, False),
        ("mcdropout", False, True),
        ("mcdropout_lossatt", True, True),
    ],
)
def test_table_validates_and_absent_heads_are_null(
    images: pa.Table, setup: str, la: bool, mc: bool
) -> None:
    table = predictor(setup).predict(images, seed=0, batch_size=3)
    schema.validate_table(table, schema.PREDICTIONS)
    assert table.num_rows > 0 and set(col(table, "image_id")) <= set(
        images.column("image_id").to_pylist()
    )
    for names, on in ((schema.AL_COLS, la), ((*schema.MC_COLS, "mc_class", "mc_class_vec"), mc)):
        for name in names:
            nulls = table.column(name).null_count
            if on:
                assert nulls == 0, name
                if name != "mc_class_vec":
                    assert (col(table, name) > 0).mean() > 0.9, name
            else:
                assert nulls == table.num_rows, name
    assert table.column("entropy").null_count == 0 and table.column("logits").null_count == 0
    assert len(table.column("logits")[0].as_py()) == 10
    for image_id in set(col(table, "image_id")):
        rows = table.filter(pc.equal(table.column("image_id"), image_id))
        assert list(col(rows, "det_id")) == list(range(rows.num_rows))  # det_id = rank by score
        assert np.all(np.diff(col(rows, "score")) <= 0)
    w = dict(
        zip(images.column("image_id").to_pylist(), images.column("width").to_pylist(), strict=True)
    )
    assert all(x2 <= w[i] for i, x2 in zip(col(table, "image_id"), col(table, "x2"), strict=True))


def test_seeded_and_independent_of_batching(images: pa.Table) -> None:
    p = predictor()
    full = p.predict(images, seed=3, batch_size=4)
    assert full.equals(p.predict(images, seed=3, batch_size=4))
    ids = images.column("image_id").to_pylist()
    masks = p._image_masks(ids, seed=3)
    sub = p._image_masks(ids[2:], seed=3)
    t, b = p.mc_samples, len(ids)
    for k in range(2):  # image i's masks do not depend on the batch it is in
        whole = masks[k].unflatten(2, (t, b))[:, :, :, 2:]
        assert torch.equal(whole, sub[k].unflatten(2, (t, b - 2)))
    other = p.predict(images, seed=4, batch_size=4)
    assert not np.allclose(col(other, "mc_x1")[:5], col(full, "mc_x1")[:5])
    assert p.seconds > 0


def test_rate_zero_mc_prediction_equals_the_deterministic_one(images: pa.Table) -> None:
    """Head-only MC at rate 0 through the whole inference path: every sample is the
    deterministic pass, so boxes, scores and logits agree and every MC std is exactly 0."""
    mc = predictor(mc_classheadrate=0.0, mc_boxheadrate=0.0)
    det = predictor("lossatt")
    det.model.load_state_dict(mc.model.state_dict())
    a, b = mc.predict(images, seed=0, batch_size=4), det.predict(images, seed=0, batch_size=4)
    assert a.num_rows == b.num_rows > 0
    for name in ("score", "x1", "y1", "x2", "y2", "al_x1", "entropy"):
        np.testing.assert_allclose(col(a, name), col(b, name), rtol=1e-5, atol=1e-5)
    for name in (*schema.MC_COLS, "mc_class"):
        assert float(np.abs(col(a, name)).max()) == 0.0, name


@pytest.mark.parametrize("nms", ["hard", "gaussian"])
def test_kept_rows_carry_their_anchor_uncertainties(images: pa.Table, nms: str) -> None:
    """Gather identity (§3 a): every kept row equals the pre-NMS values of its own anchor."""
    p = predictor()
    p.cfg.predict.nms_method = nms
    batch = torch.stack([p_image(images, p, i) for i in range(2)])
    out = p.forward(batch, images.column("image_id").to_pylist()[:2], seed=0)
    det = p.postprocess(out, 0, 1.0, (1e4, 1e4), seed=0)
    # pre-NMS values of every anchor, computed independently of the NMS path
    t, v = p.decode_inputs(out, 0, torch.arange(p.anchors_xyxy.shape[0]))
    means, stds = decode_boxes(t, v, p.anchors_xyxy)
    box = means.mean(0)
    mc = ((means - box) ** 2).mean(0).sqrt()
    al = stds.mean(0)
    logits = out["cls"][:, 0].mean(0)
    for r in range(len(det["score"])):
        anchor = int(torch.argmin((box - torch.from_numpy(det["box"][r])).abs().sum(1)))
        assert np.allclose(box[anchor].numpy(), det["box"][r], atol=1e-4)
        assert np.allclose(al[anchor].numpy(), det["al"][r], rtol=1e-4)
        assert np.allclose(mc[anchor].numpy(), det["mc"][r], rtol=1e-3, atol=1e-4)
        assert np.allclose(logits[anchor].numpy(), det["logits"][r], atol=1e-5)
    if nms == "gaussian":
        raw = torch.sigmoid(logits.max(-1).values)
        rescored = [
            float(raw[int(torch.argmin((box - torch.from_numpy(b)).abs().sum(1)))])
            for b in det["box"]
        ]
        assert np.all(det["score"] <= np.array(rescored) + 1e-6)


def p_image(images: pa.Table, p: Predictor, i: int) -> torch.Tensor:
    from detloop.data.dataset import DetectionDataset

    return DetectionDataset(images, None, p.model.spec.image_size)[i]["image"]


def test_doubling_the_image_doubles_boxes_and_stds(images: pa.Table) -> None:
    p = predictor()
    batch = torch.stack([p_image(images, p, 0)])
    out = p.forward(batch, ["x"], seed=0)
    det = p.postprocess(out, 0, 1.0, (1e4, 1e4), seed=0)
    a = _to_original(
        {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in det.items()}, 1.0, (1e4, 1e4)
    )
    b = _to_original(
        {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in det.items()}, 0.5, (2e4, 2e4)
    )
    for key in ("box", "al", "mc"):
        assert np.allclose(b[key], 2 * a[key], rtol=1e-6)
    small = p.postprocess(out, 0, 1.0, (20.0, 20.0), seed=0)  # stds capped at 20 px here
    clipped = _to_original(dict(small), 1.0, (20.0, 20.0))
    assert clipped["box"].max() <= 20.0 and np.array_equal(clipped["al"], small["al"])


def test_from_state_and_from_checkpoint_agree(images: pa.Table, tmp_path: Path) -> None:
    from detloop.learners.checkpoint import write_checkpoint

    p = predictor()
    table = p.predict(images, seed=0)
    q = Predictor.from_state(state_bytes(p.model), p.cfg, num_classes=10, device="cpu")
    assert q.predict(images, seed=0).equals(table)
    meta = {"model_spec": p.model.spec.to_json()}
    write_checkpoint(tmp_path / "ck", p.model.state_dict(), meta)
    r = Predictor.from_checkpoint(tmp_path / "ck", p.cfg, device="cpu")
    assert r.predict(images, seed=0).equals(table)


def test_full_mc_mode_predicts_independent_of_batching(images: pa.Table) -> None:
    p = predictor(mc_mode="full", mc_dropoutsamp=3)
    table = p.predict(images.slice(0, 3), seed=0, batch_size=3)
    assert table.num_rows > 0 and (col(table, "mc_x1") > 0).all()
    single = pa.concat_tables(p.predict(images.slice(i, 1), seed=0) for i in range(3))
    for name in ("score", "x1", "mc_x1", "mc_class"):  # masks are drawn per image
        np.testing.assert_allclose(col(single, name), col(table, name), rtol=1e-4, atol=1e-4)


def test_head_mode_runs_the_backbone_once_per_batch(images: pa.Table) -> None:
    p = predictor()
    calls: list[int] = []
    p.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    p.predict(images, seed=0, batch_size=2)
    assert len(calls) == 2 and p.mc_samples == 10


def test_degenerate_boxes_are_dropped_before_nms_and_counted() -> None:
    """Hand case: two confident anchors, the higher-scoring one decoded to a box 2e-9 anchors
    wide. With one output slot, the degenerate box would take it; dropped before NMS
    (``min_box_size``), the real box is the detection and the drop is counted."""
    p = predictor("lossatt")
    p.cfg.predict.max_output_size = 1
    anchors = p.anchors_xyxy
    n, c = anchors.shape[0], p.model.spec.num_classes
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    size = anchors[:, 2:] - anchors[:, :2]
    inside = torch.nonzero((centre > 40).all(1) & (centre < 80).all(1) & (size < 40).all(1))
    i, j = int(inside[0]), int(inside[-1])
    cls = torch.full((1, 1, n, c), -20.0)
    cls[0, 0, i, 3], cls[0, 0, j, 5] = 5.0, 4.0
    mu = torch.zeros(1, 1, n, 4)
    mu[0, 0, i, TW] = -20.0
    out = {"cls": cls, "mu": mu, "s": torch.full((1, 1, n, 4), -10.0)}
    det = p.postprocess(out, 0, 1.0, (128.0, 128.0), seed=0)
    assert det["class_id"].tolist() == [5] and p.last_stats.dropped_boxes == 1
    np.testing.assert_allclose(det["box"][0], anchors[j].numpy(), rtol=1e-3, atol=1e-2)
    p.cfg.predict.min_box_size = 0.0
    p.last_stats = PredictStats()
    det = p.postprocess(out, 0, 1.0, (128.0, 128.0), seed=0)
    assert det["class_id"].tolist() == [3] and p.last_stats.dropped_boxes == 0


def test_stds_are_capped_at_the_larger_image_side_and_counted() -> None:
    """σ² at the training bound σ_max² = 1024² for every anchor: every aleatoric std is capped
    at the image's larger side (in original pixels after the letterbox scale) and counted."""
    p = predictor("lossatt")
    n, c = p.anchors_xyxy.shape[0], p.model.spec.num_classes
    cls = torch.full((1, 1, n, c), -20.0)
    cls[0, 0, :50, 0] = 3.0
    out = {"cls": cls, "mu": torch.zeros(1, 1, n, 4), "s": torch.full((1, 1, n, 4), 50.0)}
    det = p.postprocess(out, 0, 0.5, (256.0, 200.0), seed=0)
    k = len(det["score"])
    assert k > 0
    assert p.last_stats.capped_al_std == 4 * k
    np.testing.assert_allclose(det["al"], 0.5 * 256.0, rtol=1e-6)  # network pixels
    orig = _to_original(dict(det), 0.5, (256.0, 200.0))
    assert np.all(orig["al"] == 256.0)


def test_max_nms_inputs_keeps_the_top_scoring_anchors_before_decoding() -> None:
    """Pre-NMS top-k (§3): six confident anchors of six classes (no suppression between them);
    ``max_nms_inputs`` = 3 keeps the three best, and a degenerate box among the others is never
    decoded, so it is not counted as dropped; 0 (the default) keeps all six."""
    p = predictor("lossatt")
    n, c = p.anchors_xyxy.shape[0], p.model.spec.num_classes
    anchors = (torch.arange(6) * (n // 7)).tolist()
    cls = torch.full((1, 1, n, c), -20.0)
    for k, a in enumerate(anchors):
        cls[0, 0, a, k] = 1.0 + k  # anchor k has class k and the k-th lowest score
    mu = torch.zeros(1, 1, n, 4)
    mu[0, 0, anchors[0], TW] = -20.0  # the lowest-scoring anchor decodes to a degenerate box
    out = {"cls": cls, "mu": mu, "s": torch.full((1, 1, n, 4), -10.0)}
    size = (1e4, 1e4)
    assert p.cfg.predict.max_nms_inputs == 0
    every = p.postprocess(out, 0, 1.0, size, seed=0)
    assert sorted(every["class_id"].tolist()) == [1, 2, 3, 4, 5]
    assert p.last_stats.dropped_boxes == 1
    p.cfg.predict.max_nms_inputs = 3
    p.last_stats = PredictStats()
    top = p.postprocess(out, 0, 1.0, size, seed=0)
    assert top["class_id"].tolist() == [5, 4, 3] and p.last_stats.dropped_boxes == 0
    np.testing.assert_allclose(top["score"], every["score"][:3], rtol=1e-6)
    p.cfg.predict.max_nms_inputs = 10  # more than the candidates: all of them
    assert p.postprocess(out, 0, 1.0, size, seed=0)["class_id"].tolist() == [5, 4, 3, 2, 1]
