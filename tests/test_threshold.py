"""Known-answer tests of cost-sensitive thresholding (ALGORITHMS §7 "Tests that pin it")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from detloop.selectors.threshold import (
    CostSensitiveThresholder,
    ThresholdResult,
    load_thresholds,
    operating_point,
    parse_uncertainties,
    roc_auc,
    roc_curves,
    threshold_rows,
    uncertainty_values,
)
from detloop.selectors.threshold_metrics import jsd

CD_U = np.arange(1, 11) / 10.0
FD_U = np.array([0.05, 0.95, 1.1, 1.2])


def hand_roc() -> tuple[np.ndarray, np.ndarray]:
    u = np.r_[CD_U, FD_U]
    is_fd = np.r_[np.zeros(10, bool), np.ones(4, bool)]
    return u, is_fd


@pytest.mark.parametrize(
    ("b", "thr_cd", "metric", "delta"),
    [(0.9, True, 75.0, 0.95), (0.95, True, 50.0, 1.1), (0.75, False, 90.0, 0.95)],
)
def test_hand_roc(b: float, thr_cd: bool, metric: float, delta: float) -> None:
    u, is_fd = hand_roc()
    (roc,) = roc_curves(u, is_fd)
    op = operating_point(roc, b, thr_cd)
    assert op.metric == pytest.approx(metric)
    assert op.delta == pytest.approx(delta)


def test_budget_in_counts_not_floats() -> None:
    # 1 - 0.9 = 0.0999..; with 10 CDs exactly one CD may be removed
    u, is_fd = hand_roc()
    (roc,) = roc_curves(u, is_fd)
    assert operating_point(roc, 0.9).delta == pytest.approx(0.95)
    assert operating_point(roc, 0.9, interp="linear").metric == pytest.approx(75.0)
    assert operating_point(roc, 0.9, pick="closest").delta in roc.thresholds


def test_auroc_equals_sklearn() -> None:
    rng = np.random.default_rng(0)
    u = np.round(rng.normal(0, 1, 500), 1)  # many ties
    is_fd = rng.random(500) < 0.3
    assert roc_auc(u, is_fd) == pytest.approx(roc_auc_score(is_fd, u), abs=1e-9)
    u2, fd2 = hand_roc()
    assert roc_auc(u2, fd2) == pytest.approx(roc_auc_score(fd2, u2), abs=1e-9)


def test_jsd_of_gaussians_equals_scipy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 4000), rng.normal(1.5, 0.5, 3000)
    m1, s1, m2, s2 = a.mean(), a.std(), b.mean(), b.std()
    x = np.linspace(min(m1 - 3 * s1, m2 - 3 * s2), max(m1 + 3 * s1, m2 + 3 * s2), 1000)
    expected = jensenshannon(norm.pdf(x, m1, s1), norm.pdf(x, m2, s2))
    assert jsd(a, b) == pytest.approx(expected, abs=1e-12)
    assert jsd(a, a.copy()) == pytest.approx(0.0, abs=1e-7)
    assert 0 < jsd(a, b) <= np.sqrt(np.log(2))


def test_parse_uncertainties() -> None:
    assert parse_uncertainties("ENTALBOX") == ["entropy", "albox_rel"]
    assert parse_uncertainties(["mc_class", "mcbox_rel"]) == ["mc_class", "mcbox_rel"]
    assert parse_uncertainties("ENTALBOXSCORE") == ["entropy", "albox_rel", "score_gap"]
    with pytest.raises(ValueError, match="position 3"):
        parse_uncertainties("ENTXX")


def test_score_gap_is_one_minus_score_calibrated_or_not() -> None:
    df = pd.DataFrame({"score": [0.9, 0.25, 1.0]})
    for calibrated in (True, False):
        u = uncertainty_values(df, "score_gap", calibrated)
        np.testing.assert_allclose(u, [0.1, 0.75, 0.0])


def synthetic_rows(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Rows where rel(al) separates CD and FD perfectly and entropy is noise."""
    rng = np.random.default_rng(seed)
    is_fd = rng.random(n) < 0.3
    iou = np.where(is_fd, rng.uniform(0.1, 0.45, n), rng.uniform(0.8, 1.0, n))
    rel = np.where(is_fd, rng.uniform(0.2, 0.3, n), rng.uniform(0.0, 0.1, n))
    size = rng.uniform(10, 40, n)
    df = pd.DataFrame({
        "image_id": [f"i{k // 4}" for k in range(n)], "det_id": np.arange(n) % 4,
        "class_id": rng.integers(0, 2, n), "score": rng.uniform(0.3, 1, n),
        "x1": 0.0, "y1": 0.0, "x2": size, "y2": size,
        "entropy_cal": rng.uniform(0, 1, n), "iou": iou,
    })  # fmt: skip
    for c in ("x1", "y1", "x2", "y2"):
        df[f"al_{c}_cal"] = rel * size
    df["gt_class"] = df["class_id"]
    df["tps_class"] = True
    return df


def test_perfect_separator_gets_weight_and_fd_at_cd_100() -> None:
    rows = synthetic_rows()
    th = CostSensitiveThresholder("ENTALBOX", n_trials=30, patience=10, seed=0).fit(rows)
    assert th.weights_[1] > 0
    assert th.report_["combination"]["metric"] == pytest.approx(100.0)
    singles = th.report_["single"]
    best_single = min(s["objective"] for s in singles.values())
    assert th.objective_ <= best_single


def test_determinism_and_json_roundtrip(tmp_path: Path) -> None:
    rows = synthetic_rows(seed=3)
    rows["entropy_cal"] += np.where(rows["iou"] < 0.6, 0.3, 0.0)
    rows.loc[rows.index[::7], "iou"] = 0.62  # overlap: no single uncertainty is perfect
    kw = {"n_trials": 40, "patience": 40, "seed": 7, "per_cls": True}
    a = CostSensitiveThresholder("ENTALBOX", **kw).fit(rows).result()
    b = CostSensitiveThresholder("ENTALBOX", **kw).fit(rows).result()
    assert a.weights == b.weights and a.thresholds == b.thresholds
    a.save(tmp_path / "thr.json")
    back = load_thresholds(tmp_path / "thr.json")
    assert back.weights == a.weights and back.thresholds == a.thresholds
    assert back.threshold_mean == pytest.approx(np.mean(a.thresholds))
    assert set(back.per_class["variants"]) == {"clsopt", "clsoptpred", "clsoptfix"}  # type: ignore[index]
    u = back.combine(rows)
    rel = (rows["al_x1_cal"] / rows["x2"]).to_numpy()
    np.testing.assert_allclose(
        u, rows["entropy_cal"].to_numpy() * a.weights[0] + rel * a.weights[1]
    )


def test_threshold_rows_fd_scope_all() -> None:
    preds = pd.DataFrame({
        "image_id": ["a", "a", "a", "b"], "det_id": [0, 1, 2, 0], "class_id": [0, 1, 0, 0],
        "score": [0.9, 0.8, 0.2, 0.7],
    })  # fmt: skip
    matches = pd.DataFrame({
        "image_id": ["a", "a", "b"], "gt_id": [0, 1, 2], "gt_class": [0, 0, 1],
        "det_id": [0, 1, None], "iou": [0.8, 0.4, 0.0],
    })  # fmt: skip
    matched = threshold_rows(preds, matches, "matched")
    assert len(matched) == 2 and matched["tps_class"].tolist() == [True, False]
    full = threshold_rows(preds, matches, "all", min_score=0.4)
    # (b, 0) is a background FP; (a, 2) is below min_score
    assert len(full) == 3
    bg = full[full["image_id"] == "b"].iloc[0]
    assert bg["iou"] == 0 and not bg["tps_class"]


def test_missing_keys_in_json_are_reported(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text('{"weights": [1.0]}')
    from detloop.data.errors import DataError

    with pytest.raises(DataError, match="missing"):
        ThresholdResult.load(tmp_path / "t.json")


def test_selectors_do_not_import_torch_or_ray() -> None:
    code = (
        "import sys, detloop.selectors.threshold, detloop.selectors.autolabel; "
        "print('torch' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_box_heatmap_mean_over_covering_boxes() -> None:
    from detloop.reports.threshold_plots import box_heatmap

    boxes = np.array([[0, 0, 4, 4], [2, 2, 6, 6]], float)
    m = box_heatmap(boxes, np.array([1.0, 3.0]), (8, 8))
    assert m[1, 1] == 1.0 and m[3, 3] == 2.0 and m[5, 5] == 3.0 and np.isnan(m[7, 7])
    f = box_heatmap(boxes, None, (8, 8))
    assert f[3, 3] == 2 and f[0, 0] == 1 and f[7, 7] == 0


def test_threshold_plots_write_pngs(tmp_path: Path) -> None:
    from PIL import Image

    from detloop.reports import threshold_plots as tp

    u, is_fd = hand_roc()
    assert tp.roc_plot({"u": u, "-u": -u}, is_fd, tmp_path / "roc.png", 0.95).stat().st_size
    maps = {"freq": tp.box_heatmap(np.array([[1, 1, 5, 5.0]]), None, (10, 10))}
    assert tp.heatmaps(maps, tmp_path / "heat.png").exists()
    Image.new("RGB", (32, 32)).save(tmp_path / "im.png")
    b = pd.DataFrame({"x1": [2.0], "y1": [2.0], "x2": [20.0], "y2": [20.0], "u": [0.4]})
    assert tp.image_grid([str(tmp_path / "im.png")] * 2, [b, b], tmp_path / "g.png").exists()
    rows = synthetic_rows(40)
    mask = rows["iou"].to_numpy() < 0.5
    groups = {"all": tp.group_stats(rows, np.ones(40, bool), [0.5, 0.75]),
              "removed": tp.group_stats(rows, mask, [0.5, 0.75])}  # fmt: skip
    assert groups["all"]["% det."] == 100.0
    assert tp.spider_plot(groups, tmp_path / "spider.png").exists()


def test_json_is_read_by_combo_scores_and_pseudo_labels(tmp_path: Path) -> None:
    """§7 (e): the stored result drives §9 ``combo`` and §11 ``combo`` identically."""
    from detloop.data.io import read_json
    from detloop.learners.calibration import fit_calibration_set
    from detloop.selectors.columns import DetColumns
    from detloop.selectors.pseudo import _threshold_mean
    from detloop.selectors.scores import combo_values
    from test_calibration import synthetic_pairs, to_predictions

    pairs = synthetic_pairs(n=120)
    table = fit_calibration_set(pairs).transform(to_predictions(pairs))
    rows = table.to_pandas()
    rows["iou"], rows["gt_class"] = 0.6, rows["class_id"]
    rows["tps_class"] = np.arange(len(rows)) % 3 > 0
    res = CostSensitiveThresholder("ENTALBOX", n_trials=10, patience=10).fit(rows).result()
    res.save(tmp_path / "t.json")
    doc = read_json(tmp_path / "t.json")
    ours = load_thresholds(tmp_path / "t.json").combine(table.to_pandas())
    np.testing.assert_allclose(combo_values(DetColumns(table), doc), ours, rtol=1e-6)
    assert _threshold_mean(doc) == pytest.approx(res.delta_mean)


# ---- thr_unit: image (detloop extension) --------------------------------------------------
def image_rows(n_images: int = 150, seed: int = 0) -> pd.DataFrame:
    """1–4 detections per image; an image is wrong when one detection is (IoU < 0.5).

    ``al`` marks wrong detections only weakly, entropy is noise; the image's largest σ decides.
    """
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_images)
    img = np.repeat(np.arange(n_images), per)
    n = len(img)
    wrong = rng.random(n) < 0.1
    size = rng.uniform(10, 40, n)
    rel = np.where(wrong, rng.uniform(0.05, 0.3, n), rng.uniform(0.0, 0.12, n))
    df = pd.DataFrame({
        "image_id": [f"im{k:03d}" for k in img], "det_id": np.arange(n),
        "class_id": 0, "gt_class": 0, "tps_class": True,
        "score": rng.uniform(0.2, 1.0, n), "iou": np.where(wrong, 0.3, 0.9),
        "x1": 0.0, "y1": 0.0, "x2": size, "y2": size, "entropy_cal": rng.uniform(0, 1, n),
    })  # fmt: skip
    for c in ("x1", "y1", "x2", "y2"):
        df[f"al_{c}_cal"] = rel * size
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # images interleaved


def test_image_reduction_equals_groupby() -> None:
    from detloop.selectors.threshold import ImageReduction

    rows = image_rows()
    red = ImageReduction.of(rows["image_id"].to_numpy())
    u = rows["entropy_cal"].to_numpy()
    cd = np.stack([rows["iou"].to_numpy() >= 0.5, rows["score"].to_numpy() > 0.5], axis=1)
    g = rows.assign(u=u, a=cd[:, 0], b=cd[:, 1]).groupby("image_id")
    np.testing.assert_array_equal(red.u(u), g["u"].max().to_numpy())
    np.testing.assert_array_equal(red.cd(cd), np.stack([g["a"].all(), g["b"].all()], axis=1))
    assert red.n_images == rows["image_id"].nunique()
    empty = ImageReduction.of(np.array([], dtype=object))
    assert empty.u(np.zeros(0)).shape == (0,) and empty.cd(np.zeros((0, 2), bool)).shape == (0, 2)


def brute_force_image_fd_at_cd(rows: pd.DataFrame, w: np.ndarray, b: float) -> float:
    """FD@CD(b) over images by trying every threshold: keep ≥ b of the correct images."""
    u = uncertainty_values(rows, "entropy", True) * w[0]
    u = u + uncertainty_values(rows, "albox_rel", True) * w[1]
    per = rows.assign(u=u, ok=rows["iou"] >= 0.5).groupby("image_id")
    per = per.agg(u=("u", "max"), ok=("ok", "all"))
    good, bad = per.loc[per["ok"], "u"].to_numpy(), per.loc[~per["ok"], "u"].to_numpy()
    best = 0.0
    for delta in np.r_[np.inf, np.unique(per["u"])]:
        if (good >= delta).sum() <= np.floor((1 - b) * len(good) + 1e-9):
            best = max(best, 100.0 * float((bad >= delta).mean()))
    return best


def test_image_unit_matches_brute_force_and_section_8_rule() -> None:
    """The image budget is what §8 decides on: at δ̄ the rule keeps ≥ b of the correct images."""
    from detloop.selectors.autolabel import decide

    rows = image_rows()
    th = CostSensitiveThresholder("ENTALBOX", iou_thrs=[0.5], budget=0.9, unit="image",
                                  n_trials=40, patience=40, seed=0).fit(rows)  # fmt: skip
    res = th.result()
    assert res.unit == "image" and th.report_["unit"] == "image"
    metric = th.report_["combination"]["metric"]
    assert metric == pytest.approx(brute_force_image_fd_at_cd(rows, th.weights_, 0.9))
    for i, name in enumerate(th.names_):  # single uncertainties too, at the image level
        one_hot = np.eye(2)[i]
        single = th.report_["single"][name]["metric"]
        assert single == pytest.approx(brute_force_image_fd_at_cd(rows, one_hot, 0.9))
    assert metric >= max(s["metric"] for s in th.report_["single"].values())
    dec = decide(rows, rows["image_id"].unique().tolist(), res, min_score=0.0)
    ok = rows.groupby("image_id")["iou"].min() >= 0.5
    auto = set(dec.ids("auto_labeled"))
    kept = ok[ok].index.isin(list(auto)).mean()
    assert kept >= 0.9
    removed_bad = 100.0 * (~ok[~ok].index.isin(list(auto))).mean()
    assert removed_bad == pytest.approx(metric)


def test_image_unit_ignores_rows_at_or_below_min_score() -> None:
    rows = image_rows(seed=2)
    kw = {"iou_thrs": [0.5], "budget": 0.8, "unit": "image", "n_trials": 20, "seed": 0}
    high = rows[rows["score"] > 0.5]
    a = CostSensitiveThresholder("ENTALBOX", min_score=0.5, **kw).fit(rows)  # type: ignore[arg-type]
    b = CostSensitiveThresholder("ENTALBOX", **kw).fit(high)  # type: ignore[arg-type]
    assert a.weights_.tolist() == b.weights_.tolist() and a.thresholds_ == b.thresholds_


def test_image_unit_differs_from_detection_unit_and_rejects_per_class() -> None:
    rows = image_rows(seed=4)
    kw = {"iou_thrs": [0.5], "budget": 0.9, "n_trials": 20, "seed": 0}
    det = CostSensitiveThresholder("ENTALBOX", **kw).fit(rows)  # type: ignore[arg-type]
    img = CostSensitiveThresholder("ENTALBOX", unit="image", **kw).fit(rows)  # type: ignore[arg-type]
    n_det = (
        det.report_["combination"]["per_iou"][0]["n_cd"]
        + det.report_["combination"]["per_iou"][0]["n_fd"]
    )
    n_img = (
        img.report_["combination"]["per_iou"][0]["n_cd"]
        + img.report_["combination"]["per_iou"][0]["n_fd"]
    )
    assert n_det == len(rows) and n_img == rows["image_id"].nunique()
    with pytest.raises(ValueError, match="per_cls"):
        CostSensitiveThresholder(unit="image", per_cls=True).fit(rows)
    with pytest.raises(ValueError, match="unit"):
        CostSensitiveThresholder(unit="frame").fit(rows)


def test_result_without_unit_loads_as_detection(tmp_path: Path) -> None:
    rows = synthetic_rows(80)
    res = CostSensitiveThresholder("ENTALBOX", n_trials=5, patience=5).fit(rows).result()
    res.save(tmp_path / "t.json")
    import json

    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["unit"] == "detection"
    del doc["unit"]  # a file written before the key existed
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert load_thresholds(tmp_path / "old.json").unit == "detection"


def test_config_rejects_per_class_with_image_unit() -> None:
    from detloop.config import ConfigError, build_config

    assert build_config({"thresholding": {"thr_unit": "image"}}).thresholding.thr_unit == "image"
    with pytest.raises(ConfigError, match="per_cls"):
        build_config({"thresholding": {"thr_unit": "image", "per_cls": True}})
