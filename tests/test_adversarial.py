"""An adversarial model on real images (issue: predictions that stay finite on real imagery).

A tiny uncertainty model whose box and variance heads start at extreme values (biases of ±50:
sizes e^±50 times the anchor, centres 50 anchors away, σ² at both training bounds) predicts on
real digits-det PNGs from disk, as an early model on real photographs does. Every column of
the predictions table must be finite, every box must have positive area, the bounds must be
counted, and every registered selection score must rank every candidate with finite scores.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.learners.model import TH, TW, TX, TY, _predict_conv, build_model
from detloop.learners.predict import Predictor
from detloop.selectors.pipeline import SelectContext, select
from detloop.selectors.scores import registered_scores
from learner_data import digits_root, split_tables

torch.set_num_threads(1)

#: Extreme head biases per anchor group (anchor index mod 3): size, centre and log-variance.
_GROUPS = (
    {"size": 50.0, "centre": 0.0, "s": 50.0},  # boxes 62.5x the anchor, σ² at σ_max²
    {"size": -50.0, "centre": 0.0, "s": -50.0},  # boxes of ~0 px, σ² at σ_min²
    {"size": 0.0, "centre": 50.0, "s": 50.0},  # boxes 50 anchors off the image
)
THRESHOLDS = {"uncertainties": ["entropy", "albox"], "weights": [0.5, 0.5], "calibrated": False}


def adversarial_predictor(method: str) -> Predictor:
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"uncertainty": "mcdropout_lossatt", "mc_dropoutsamp": 4},
            "predict": {"uncert_adjust_method": method, "decode_nsamples": 8},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=10)
    conv = _predict_conv(model.box_net)
    a = model.num_anchors
    assert conv.bias is not None and conv.bias.shape[0] == 8 * a
    with torch.no_grad():
        for anchor in range(a):
            group = _GROUPS[anchor % 3]
            base = 4 * anchor
            conv.bias[base + TW] = conv.bias[base + TH] = group["size"]
            conv.bias[base + TX] = conv.bias[base + TY] = group["centre"]
            conv.bias[4 * a + base : 4 * a + base + 4] = group["s"]
    return Predictor(model, cfg, device="cpu")


@pytest.fixture(scope="module")
def images(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    root = digits_root(request, tmp_path_factory)
    table = split_tables(root, "val", limit=6)[0]
    n = table.num_rows
    return table.append_column("split", pa.array(["pool"] * n)).append_column(
        "state", pa.array(["unlabeled"] * n)
    )


def finite_everywhere(table: pa.Table) -> None:
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type):
            col = pc.list_flatten(col)
        if pa.types.is_floating(col.type):
            values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
            assert np.isfinite(values).all(), f"{name}: {np.sum(~np.isfinite(values))} non-finite"


@pytest.mark.parametrize("method", ["l-norm", "n-flow", "sample", "falsedec"])
def test_extreme_heads_give_a_finite_table_of_real_boxes(images: pa.Table, method: str) -> None:
    p = adversarial_predictor(method)
    table = p.predict(images.select(["image_id", "file", "width", "height"]), seed=0)
    schema.validate_table(table, schema.PREDICTIONS)
    assert table.num_rows > 0
    finite_everywhere(table)
    x1, y1, x2, y2 = (np.asarray(table.column(c).to_numpy()) for c in schema.COORDS)
    assert np.all(x2 - x1 >= 1.0) and np.all(y2 - y1 >= 1.0)  # min_box_size, original px
    side = max(images.column("width").to_pylist() + images.column("height").to_pylist())
    for name in (*schema.AL_COLS, *schema.MC_COLS):
        assert float(pc.max(table.column(name)).as_py()) <= side, name
    # the bounds were hit and counted: half-size boxes and off-image boxes dropped, σ_max² stds
    # capped at the image side
    assert p.stats.dropped_boxes > 0
    if method != "falsedec":
        assert p.stats.capped_al_std > 0


def test_every_registered_score_ranks_every_image_with_finite_scores(images: pa.Table) -> None:
    p = adversarial_predictor("l-norm")
    preds = p.predict(images.select(["image_id", "file", "width", "height"]), seed=0)
    n = images.num_rows
    for name in registered_scores():
        for strategy in {name, f"norm_{name}"} if name in ("albox", "mcbox") else {name}:
            ctx = SelectContext(min_score=0.0, rng=np.random.default_rng(0), thresholds=THRESHOLDS)
            sel = select(preds, images, strategy, budget=3, ctx=ctx)
            assert sel.num_rows == n
            assert sorted(sel.column("rank").to_pylist()) == list(range(n)), strategy
            assert sum(sel.column("selected").to_pylist()) == 3
            scores = sel.column("score")
            assert scores.null_count == 0, f"{strategy}: an image with detections is unscored"
            assert np.isfinite(np.asarray(scores.to_numpy())).all(), strategy
