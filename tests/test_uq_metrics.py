"""Known-answer tests of the uncertainty-quality metrics (ALGORITHMS §5.1, §5.2, §6.2)."""

from __future__ import annotations

import numpy as np
import pytest
import uncertainty_toolbox as uct

from detloop.learners import uq_metrics as uq


def test_ece_hand_example_two_bins() -> None:
    # bin [0.2, 0.3): 4 samples, conf 0.25, 1 correct -> acc 0.25, gap 0
    # bin [0.9, 1.0]: 6 samples, conf 0.95, 3 correct -> acc 0.5, gap 0.45
    conf = np.array([0.25] * 4 + [0.95] * 6)
    correct = np.array([1, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    assert uq.ece(conf, correct) == pytest.approx(0.6 * 0.45, abs=1e-12)
    assert uq.mce(conf, correct) == pytest.approx(0.45, abs=1e-12)


def test_ece_of_perfectly_calibrated_data_is_near_zero() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200_000)
    correct = rng.random(conf.size) < conf
    assert uq.ece(conf, correct) < 0.005
    assert uq.ece(conf, correct, binning="quantile") < 0.005


def test_planted_miscalibration() -> None:
    # confidence 0.9 everywhere, true accuracy 0.6 -> ECE = MCE = 0.3
    rng = np.random.default_rng(1)
    conf = np.full(100_000, 0.9)
    correct = rng.random(conf.size) < 0.6
    assert uq.ece(conf, correct) == pytest.approx(0.3, abs=0.01)


def test_class_metrics_brier_nll_sce() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1])
    m = uq.class_metrics(probs, labels)
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.9**2 + 0.8**2)) / 6
    assert m["brier"] == pytest.approx(brier)
    assert m["nll"] == pytest.approx(-(np.log(0.7) + np.log(0.1)) / 2)
    assert m["sce"] == pytest.approx(np.mean(m["ece_per_class"]))
    assert m["accuracy"] == 0.5


def test_regression_ece_and_coverage_of_well_calibrated_residuals() -> None:
    rng = np.random.default_rng(2)
    sigma = rng.uniform(0.5, 5.0, 100_000)
    resid = rng.normal(0, 1, sigma.size) * sigma
    assert uq.regression_ece(resid, sigma) < 0.01
    assert uq.coverage(resid, sigma) == pytest.approx(68.27, abs=1.0)
    ks, p = uq.pit_ks(uq.pit(resid, np.zeros_like(resid), sigma))
    assert p > 0.01 and ks < 0.01


def test_overconfident_stds_have_large_ece() -> None:
    rng = np.random.default_rng(3)
    sigma = np.ones(10_000)
    resid = rng.normal(0, 3, sigma.size)
    assert uq.regression_ece(resid, sigma) > 0.2
    assert uq.coverage(resid, sigma) < 40


def test_metrics_equal_uncertainty_toolbox() -> None:
    rng = np.random.default_rng(4)
    pred = rng.normal(0, 10, 2000)
    sigma = rng.uniform(0.5, 3, 2000)
    gt = pred + rng.normal(0, 1.3, 2000) * sigma
    assert uq.sharpness(sigma) == pytest.approx(uct.sharpness(sigma), abs=1e-6)
    assert uq.gaussian_nll(gt - pred, sigma) == pytest.approx(
        uct.nll_gaussian(pred, sigma, gt), abs=1e-6
    )
    mace = uct.mean_absolute_calibration_error(pred, sigma, gt, num_bins=100, vectorized=True)
    assert uq.regression_ece(gt - pred, sigma) == pytest.approx(mace, abs=1e-6)
    tb = uq.toolbox_metrics(pred, sigma, gt, np.random.default_rng(0), adversarial=False)
    assert tb["sharpness.sharp"] == pytest.approx(uct.sharpness(sigma), abs=1e-6)
    assert tb["avg_calibration.ma_cal"] == pytest.approx(mace, abs=1e-6)


@pytest.mark.slow
def test_box_report_pooled_and_per_coordinate_deterministic() -> None:
    rng = np.random.default_rng(5)
    pred = rng.uniform(0, 100, (60, 4))
    sigma = rng.uniform(1, 2, (60, 4))
    gt = pred + rng.normal(0, 1, (60, 4)) * sigma
    sigma[0, 1] = np.nan  # a row without that head is dropped
    a = uq.box_uncertainty_report(pred, sigma, gt, np.random.default_rng(0), adversarial=True)
    b = uq.box_uncertainty_report(pred, sigma, gt, np.random.default_rng(0), adversarial=True)
    assert a == b
    assert a["n_objects"] == 59
    assert set(a) >= {"pooled", "x1", "y1", "x2", "y2", "toolbox"}
    assert a["y2"]["toolbox"]["sharpness.sharp"] == pytest.approx(uq.sharpness(sigma[1:, 3]))
    assert 0 <= a["pooled"]["object_coverage"] <= 100
    assert uq.rmsue(np.array([0.0, 1.0]), np.array([5.0, 3.0])) == pytest.approx(2.0)


def test_calibration_plots_write_pngs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from detloop.reports import calibration_plots as cp

    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(3), 200)
    labels = rng.integers(0, 3, 200)
    m = uq.class_metrics(probs, labels)
    assert cp.reliability_diagram(m["reliability"], tmp_path / "rel.png").exists()
    assert cp.reliability_grid({"0": m["reliability"]}, tmp_path / "grid.png").exists()
    pred, sigma = rng.normal(0, 5, 300), rng.uniform(1, 2, 300)
    gt = pred + rng.normal(0, 1, 300) * sigma
    resid = gt - pred
    cp.regression_calibration_curve(resid, {"raw": sigma, "x2": 2 * sigma}, tmp_path / "c.png")
    cp.sigma_vs_residual(sigma, resid, tmp_path / "s.png", (np.r_[1, 2.0], np.r_[0.5, 1.5]))
    cp.intervals(pred, sigma, gt, tmp_path / "i.png", rng)
    cp.pit_plot({"raw": uq.pit(gt, pred, sigma)}, tmp_path / "pit.png")
    cp.toolbox_panel(pred, sigma, gt, tmp_path / "tb.png", rng)
    assert len(list(tmp_path.glob("*.png"))) == 7


def test_runtime_stats_hand_list_with_warmup() -> None:
    times = [500.0, 400.0, 300.0, 200.0, 100.0, 10.0, 20.0, 30.0, 40.0]
    s = uq.runtime_stats(times, warmup=5)
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(25.0)
    assert s["median"] == pytest.approx(25.0)
    assert s["std"] == pytest.approx(np.std([10, 20, 30, 40]))
    assert s["p95"] == pytest.approx(np.percentile([10, 20, 30, 40], 95))
    ref = uq.runtime_stats([10.0, 12.0, 11.0, 1500.0, 13.0], mode="reference")
    assert ref["n"] == 4 and ref["mean"] == pytest.approx(11.5)
