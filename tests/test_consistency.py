"""Consistency signals (ALGORITHMS §11.6): the views, the mapping back of flipped boxes, the
signals on hand examples, the predictor in consistency mode, and the pseudo-label filters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from detloop.config import ConfigError, ExperimentConfig, build_config
from detloop.data import schema
from detloop.data.io import read_table, write_table
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir
from detloop.learners import consistency as cons
from detloop.learners.model import build_model
from detloop.learners.predict import Predictor
from detloop.selectors.pseudo import ConsistencyFilter, select_pseudo_labels
from learner_data import digits_root, split_tables

torch.set_num_threads(1)


# ---- views and the mapping back ----------------------------------------------------------------
def _content(width: int = 80, height: int = 64, scale: float = 0.5) -> cons.Content:
    """One letterboxed 64×96 image whose content is ``width`` × ``height`` network pixels."""
    return cons.Content([width], [height], [scale], [(width / scale, height / scale)], ["pool/a"])


def _canvas() -> torch.Tensor:
    """A 1×3×64×96 batch: content 80×64 (columns 80.. are padding, 5.0), a bright rectangle
    at columns 10..19, rows 20..29."""
    x = torch.zeros(1, 3, 64, 96)
    x[..., 80:] = 5.0
    x[:, :, 20:30, 10:20] = 1.0
    return x


def _bright_box(x: torch.Tensor) -> cons.ViewDetections:
    """A detector that finds the rectangle: the box of the content pixels above half its
    height (network pixels), class 3."""
    out = []
    for b in range(x.shape[0]):
        rows, cols = torch.nonzero(x[b, 0, :, :80] > 0.5, as_tuple=True)
        box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        out.append((np.array([[float(v) for v in box]]), np.array([3])))
    return out


def test_flipped_boxes_are_mapped_back_about_the_content_width() -> None:
    content = _content()  # content 80 px wide at s = 0.5: the image is 160×128
    box = np.array([[10.0, 5.0, 30.0, 25.0], [70.0, 0.0, 90.0, 10.0]])
    mirrored = cons.to_original(box, 0, content, mirrored=True)
    np.testing.assert_allclose(mirrored, [[100.0, 10.0, 140.0, 50.0], [0.0, 0.0, 20.0, 20.0]])
    np.testing.assert_allclose(cons.to_original(box, 0, content, False)[0], [20, 10, 60, 50])


def test_hflip_mirrors_the_content_and_keeps_the_padding() -> None:
    x = _canvas()
    y = cons.hflip(x, _content())
    assert torch.equal(y[..., 80:], x[..., 80:])
    assert torch.equal(y[..., :80], x[..., :80].flip(-1))
    assert torch.equal(cons.hflip(y, _content()), x)


def test_views_of_a_known_image_give_a_consistent_detection() -> None:
    """The rectangle found in every view maps back onto itself: cons_iou 1, cons_cls true;
    a detector blind to the image (the same box always) is inconsistent under the flip only."""
    x, content = _canvas(), _content()
    det = [(cons.to_original(_bright_box(x)[0][0], 0, content, False), np.array([3]))]
    np.testing.assert_allclose(det[0][0], [[20.0, 40.0, 40.0, 60.0]])
    [(iou, same)] = cons.view_signals(_bright_box, x, content, 0, det)
    assert iou.tolist() == [1.0] and same.tolist() == [True]

    def blind(x: torch.Tensor) -> cons.ViewDetections:
        return [(np.array([[10.0, 20.0, 20.0, 30.0]]), np.array([3]))] * x.shape[0]

    [(iou, same)] = cons.view_signals(blind, x, content, 0, det)
    assert iou.tolist() == pytest.approx([2 / 3]) and same.tolist() == [False]


def test_blur_is_the_9x9_gaussian_with_sigma_1_7_and_reflected_borders() -> None:
    from torchvision.transforms.functional import gaussian_blur

    assert cons.BLUR_SIGMA == pytest.approx(1.7)
    k = cons.gaussian_kernel()
    assert len(k) == 9 and float(k.sum()) == pytest.approx(1.0)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    y = cons.blur(x, _content())
    expected = gaussian_blur(x[..., :64, :80], [9, 9], [1.7, 1.7])  # reflect padding
    torch.testing.assert_close(y[..., :80], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[..., 80:], x[..., 80:])


def test_noise_has_std_sqrt_half_in_pixel_units_and_a_seed_per_image() -> None:
    from detloop.data.dataset import IMAGENET_STD

    x = torch.zeros(2, 3, 64, 96)
    content = cons.Content([96, 80], [64, 64], [1.0, 1.0], [(96, 64), (80, 64)], ["a", "b"])
    y = cons.add_noise(x, content, seed=3)
    pixels = y[0] * 255.0 * torch.as_tensor(IMAGENET_STD).view(3, 1, 1)  # back to 0-255 units
    assert float(pixels.std()) == pytest.approx(math.sqrt(0.5), rel=0.03)
    assert torch.equal(y[1, :, :, 80:], x[1, :, :, 80:])  # padding untouched
    alone = cons.Content([80], [64], [1.0], [(80, 64)], ["b"])
    assert torch.equal(cons.add_noise(x[1:], alone, seed=3), y[1:])  # not batch-dependent
    assert not torch.equal(cons.add_noise(x[1:], alone, seed=4), y[1:])


# ---- the signals -------------------------------------------------------------------------------
A, B = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]


def test_signals_on_a_hand_example() -> None:
    boxes, classes = np.array([A, B]), np.array([1, 2])
    same_view = (np.array([A, B]), np.array([1, 2]))
    half = (np.array([[0.0, 0.0, 10.0, 5.0], B]), np.array([1, 3]))  # IoU(A, ·) = 0.5
    empty = (np.zeros((0, 4)), np.zeros(0, np.int64))
    iou, same = cons.signals(boxes, classes, [same_view, half, empty])
    np.testing.assert_allclose(iou, [0.5, 2 / 3], rtol=1e-6)
    assert same.tolist() == [False, False]  # a view without detections agrees with nothing
    iou, same = cons.signals(boxes, classes, [same_view, half, same_view])
    np.testing.assert_allclose(iou, [2.5 / 3, 1.0], rtol=1e-6)
    assert same.tolist() == [True, False]  # B's best match in `half` is class 3
    assert iou.dtype == np.float32 and same.dtype == bool
    # rank (compat): the views' classes at the detection's rank agree among themselves
    _, same = cons.signals(boxes, classes, [same_view, half, same_view], mode="rank")
    assert same.tolist() == [True, False]
    short = (np.array([A]), np.array([1]))
    _, same = cons.signals(boxes, classes, [same_view, same_view, short], mode="rank")
    assert same.tolist() == [True, False]  # a view without a detection at rank 1
    iou, same = cons.signals(np.zeros((0, 4)), np.zeros(0), [same_view] * 3)
    assert len(iou) == len(same) == 0


# ---- the predictor in consistency mode ---------------------------------------------------------
@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    root = digits_root(request, tmp_path_factory)
    return split_tables(root, "val", limit=3)[0]


def _predictor(consistency: bool, mode: str = "all") -> Predictor:
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"uncertainty": "mcdropout_lossatt"},
            "predict": {"consistency_ssl": consistency, "cons_cls_mode": mode},
        }
    )
    torch.manual_seed(0)
    return Predictor(build_model(cfg.model, num_classes=10), cfg, device="cpu")


def test_consistency_mode_adds_the_columns_and_changes_nothing_else(images: pa.Table) -> None:
    off, on = _predictor(False), _predictor(True)
    plain, table = off.predict(images, seed=1), on.predict(images, seed=1)
    assert "cons_iou" not in plain.column_names and "cons_cls" not in plain.column_names
    assert table.drop_columns(["cons_iou", "cons_cls"]).equals(plain)
    assert on.last_stats == off.last_stats  # the view passes are not counted
    schema.validate_table(table, schema.PREDICTIONS)
    iou = table["cons_iou"].to_numpy()
    assert table["cons_iou"].null_count == table["cons_cls"].null_count == 0
    assert ((iou >= 0) & (iou <= 1)).all() and 0 < iou.mean() < 1
    assert table.schema.field("cons_cls").type == pa.bool_()


@pytest.mark.parametrize("mode", ["all", "rank"])
def test_identical_views_give_cons_iou_1_and_cons_cls_true(
    images: pa.Table, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Views that change nothing predict the very same detections again."""
    identity = tuple(cons.View(n, lambda x, c, s: x.clone()) for n in ("a", "b", "c"))
    monkeypatch.setattr(cons, "VIEWS", identity)
    table = _predictor(True, mode).predict(images, seed=0)
    assert table.num_rows > 0
    assert set(table["cons_iou"].to_pylist()) == {1.0}
    assert set(table["cons_cls"].to_pylist()) == {True}


# ---- tables and selection ----------------------------------------------------------------------
def _preds(cons_iou: list[float | None], cons_cls: list[bool | None]) -> pa.Table:
    """Detections k = 0.. of one image, score 0.9, boxes [1 + 10k, 1 + 10k, 6 + 10k, 6 + 10k],
    with the given signals."""
    n = len(cons_iou)
    low = np.arange(n, dtype=np.float32) * 10 + 1
    table = pa.table(
        {
            "image_id": ["pool/a"] * n,
            "det_id": pa.array(range(n), pa.int32()),
            "class_id": pa.array([0] * n, pa.int32()),
            "score": pa.array([0.9] * n, pa.float32()),
            **{c: pa.array(low if c in ("x1", "y1") else low + 5) for c in schema.COORDS},
        }
    )
    for name in schema.UNCERTAINTY_COLS:
        table = table.append_column(name, pa.nulls(n, pa.float32()))
    for name in ("logits", "mc_class_vec"):
        table = table.append_column(name, pa.nulls(n, pa.list_(pa.float32())))
    table = table.append_column("cons_iou", pa.array(cons_iou, pa.float32()))
    table = table.append_column("cons_cls", pa.array(cons_cls, pa.bool_()))
    return schema.validate_table(table, schema.PREDICTIONS)


def test_tables_with_and_without_the_signals_read_back(tmp_path: Path) -> None:
    table = _preds([0.5, None], [True, None])
    assert write_table(table, schema.PREDICTIONS, tmp_path / "p.parquet").equals(table)
    assert read_table(schema.PREDICTIONS, tmp_path / "p.parquet").equals(table)
    older = table.drop_columns(["cons_iou", "cons_cls"])  # a table from before §11.6
    write_table(older, schema.PREDICTIONS, tmp_path / "old.parquet")
    assert read_table(schema.PREDICTIONS, tmp_path / "old.parquet").equals(older)


def test_pseudo_labels_can_require_the_consistency_signals() -> None:
    preds = _preds([0.95, 0.9, 0.5, None, 0.99], [True, False, True, True, None])

    def kept(f: ConsistencyFilter | None) -> list[int]:
        return select_pseudo_labels(preds, "score", 0.4, consistency=f)["det_id"].to_pylist()

    assert kept(None) == kept(ConsistencyFilter()) == [0, 1, 2, 3, 4]
    assert kept(ConsistencyFilter(min_cons_iou=0.9)) == [0, 1, 4]  # ≥, null fails
    assert kept(ConsistencyFilter(cons_cls=True)) == [0, 2, 3]  # null fails
    assert kept(ConsistencyFilter(min_cons_iou=0.9, cons_cls=True)) == [0]
    older = preds.drop_columns(["cons_iou", "cons_cls"])
    with pytest.raises(ValueError, match=r"'cons_iou'.*consistency_ssl"):
        select_pseudo_labels(older, "score", consistency=ConsistencyFilter(min_cons_iou=0.5))


def test_the_ssl_pseudo_label_step_applies_the_filters(tmp_path: Path) -> None:
    from detloop.orchestrator.loops.steps import pseudo_label

    cfg = build_config(
        {"predict": {"consistency_ssl": True}, "ssl": {"min_cons_iou": 0.9, "cons_cls": True}}
    )
    images = pa.table(
        {"image_id": ["pool/a"], "file": ["a.png"], "width": pa.array([64], pa.int32()),
         "height": pa.array([64], pa.int32()), "split": ["pool"], "state": ["unlabeled"],
         "iteration": pa.nulls(1, pa.int32()), "phash": pa.nulls(1, pa.uint64()),
         "source_id": pa.nulls(1, pa.string()), "reason": pa.nulls(1, pa.string())}
    )  # fmt: skip
    pool = PoolState(schema.validate_table(images, schema.IMAGES), schema.LABELS.empty())
    preds = _preds([0.95, 0.9, 0.5, None, 0.99], [True, False, True, True, None])
    pool, info = pseudo_label(RunDir(tmp_path / "run"), cfg, pool, preds, images, 1)
    assert info["pseudo_labels"] == 1 and pool.labels["x1"].to_pylist() == [1.0]


def test_consistency_filters_need_consistency_mode() -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"ssl": {"min_cons_iou": 0.8, "cons_cls": True}})
    paths = [p for p, _ in err.value.problems]
    assert paths == ["ssl.min_cons_iou", "ssl.cons_cls"]
    assert "predict.consistency_ssl" in str(err.value)
    cfg = build_config(
        {"predict": {"consistency_ssl": True, "cons_cls_mode": "rank"},
         "ssl": {"min_cons_iou": 0.8, "cons_cls": True}}
    )  # fmt: skip
    assert cfg.ssl.consistency_filter == ConsistencyFilter(0.8, True)
    assert build_config({}).ssl.consistency_filter.active is False
    with pytest.raises(ConfigError, match="cons_cls_mode"):
        build_config({"predict": {"cons_cls_mode": "mean"}})
