"""Known-answer tests of the calibrators (ALGORITHMS §5 "Tests that pin it")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy.special import softmax
from sklearn.isotonic import IsotonicRegression

from detloop.data.schema import PREDICTIONS, validate_table
from detloop.learners.calibration import (
    BOX_CALIBRATORS,
    CLASS_CALIBRATORS,
    CalibrationSet,
    ClassCalibrator,
    calibration_pairs,
    fit_calibration_set,
    make_box_calibrator,
    make_class_calibrator,
    split_by_image,
)
from detloop.learners.calibration_box import BoxCalibrator
from detloop.learners.calibration_core import Isotonic, fit_box_temperature


def synthetic_pairs(n: int = 600, n_classes: int = 3, seed: int = 0) -> pd.DataFrame:
    """Pairs whose true residual std is 2× the predicted aleatoric std (over-confident)."""
    rng = np.random.default_rng(seed)
    gt_class = rng.integers(0, n_classes, n)
    logits = rng.normal(0, 2, (n, n_classes))
    logits[np.arange(n), gt_class] += 2.0
    x1, y1 = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
    w, h = rng.uniform(10, 50, n), rng.uniform(10, 50, n)
    pred = np.stack([x1, y1, x1 + w, y1 + h], axis=1)
    al = rng.uniform(0.5, 3.0, (n, 4))
    gt = pred + rng.normal(0, 1, (n, 4)) * 2.0 * al
    df = pd.DataFrame(
        {
            "image_id": [f"img{i // 3:04d}" for i in range(n)],
            "det_id": np.arange(n) % 3,
            "gt_class": gt_class,
            "class_id": np.where(rng.random(n) < 0.8, gt_class, (gt_class + 1) % n_classes),
            "logits": list(logits.astype(np.float32)),
            "mc_class_vec": list(rng.uniform(0.1, 0.5, (n, n_classes)).astype(np.float32)),
        }
    )
    for k, c in enumerate(("x1", "y1", "x2", "y2")):
        df[c], df[f"gt_{c}"] = pred[:, k], gt[:, k]
        df[f"al_{c}"], df[f"mc_{c}"] = al[:, k], al[:, k] * 0.5
    return df


def to_predictions(df: pd.DataFrame) -> pa.Table:
    cols = {c: df[c] for c in PREDICTIONS.column_names if c in df.columns}
    t = pd.DataFrame(cols)
    t["score"] = 0.9
    t["entropy"] = 0.5
    t["mc_class"] = 0.1
    return validate_table(pa.Table.from_pandas(t[PREDICTIONS.column_names], preserve_index=False),
                          PREDICTIONS)  # fmt: skip


def test_isotonic_equals_sklearn_including_out_of_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, 500), rng.normal(0, 1, 500)
    x[:20] = x[20:40]  # ties
    iso = Isotonic.fit(x, y)
    ref = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(x, y)
    q = np.concatenate([rng.normal(0, 2, 1000), [-10.0, 10.0, x.min(), x.max()]])
    np.testing.assert_allclose(iso.predict(q), ref.predict(q), atol=1e-12, rtol=0)
    np.savez(tmp_path / "iso.npz", x=iso.x_, y=iso.y_)
    with np.load(tmp_path / "iso.npz") as f:
        back = Isotonic(f["x"], f["y"])
    assert np.array_equal(back.predict(q), iso.predict(q))


@pytest.mark.parametrize("method", ["iso_all", "iso_percoo", "iso_perclscoo"])
def test_box_isotonic_matches_sklearn(method: str) -> None:
    pairs = synthetic_pairs()
    cal = make_box_calibrator(method, kind="al").fit(pairs)
    sigma = pairs[[f"al_{c}" for c in ("x1", "y1", "x2", "y2")]].to_numpy()
    resid = np.abs(pairs[["x1", "y1", "x2", "y2"]].to_numpy()
                   - pairs[["gt_x1", "gt_y1", "gt_x2", "gt_y2"]].to_numpy())  # fmt: skip
    k = 2
    if method == "iso_all":
        ref = IsotonicRegression(out_of_bounds="clip").fit(sigma.ravel(), resid.ravel())
        rows = np.ones(len(pairs), bool)
    elif method == "iso_percoo":
        ref = IsotonicRegression(out_of_bounds="clip").fit(sigma[:, k], resid[:, k])
        rows = np.ones(len(pairs), bool)
    else:
        m = pairs["gt_class"].to_numpy() == 1
        ref = IsotonicRegression(out_of_bounds="clip").fit(sigma[m, k], resid[m, k])
        rows = pairs["class_id"].to_numpy() == 1  # applied with the predicted class
    size = np.ones((len(pairs), 4))
    out = cal.calibrate(sigma, pairs["class_id"].to_numpy(), size)
    np.testing.assert_allclose(out[rows, k], ref.predict(sigma[rows, k]), atol=1e-12)


@pytest.mark.parametrize("method", ["iso_all", "iso_percls"])
def test_class_isotonic_matches_sklearn(method: str) -> None:
    pairs = synthetic_pairs()
    cal = make_class_calibrator(method).fit(pairs)
    z = np.stack(pairs["logits"]).astype(np.float64)
    p = softmax(z, axis=1)
    onehot = np.eye(3)[pairs["gt_class"]]
    if method == "iso_all":
        iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(
            p.ravel(), onehot.ravel()
        )
        q = iso.predict(p.ravel()).reshape(p.shape)
    else:
        q = np.stack(
            [IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:, c], onehot[:, c])
             .predict(p[:, c]) for c in range(3)], axis=1)  # fmt: skip
    s = q.sum(1, keepdims=True)
    expected = np.where(s > 0, q / np.where(s > 0, s, 1), p)
    got, _ = cal.predict_proba(z)
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("t0", [2.0, 0.5])
@pytest.mark.parametrize("method", ["ts_all", "ts_percls"])
def test_temperature_recovers_planted(t0: float, method: str) -> None:
    rng = np.random.default_rng(3)
    n, c = 20000, 4
    z = rng.normal(0, 3, (n, c))
    p = softmax(z / t0, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    pairs = pd.DataFrame({"logits": list(z), "gt_class": y})
    cal = ClassCalibrator(method).fit(pairs)
    np.testing.assert_allclose(cal.temperature_, t0, rtol=0.05)


def test_box_ts_rmse_closed_form() -> None:
    rng = np.random.default_rng(4)
    s = rng.uniform(0.5, 2, 1000)
    r = np.abs(rng.normal(0, 1, 1000)) * s * 1.7
    t = fit_box_temperature(s, r, "rmse")
    np.testing.assert_allclose(1 / t, (r * s).sum() / (s**2).sum(), rtol=1e-4)
    t_nll = fit_box_temperature(s, r, "nll")
    np.testing.assert_allclose(1 / t_nll**2, np.mean(r**2 / s**2), rtol=1e-4)
    cal = make_box_calibrator("ts_all", kind="al").fit(synthetic_pairs())
    assert cal.temperature_[0] < 1.0  # residuals are larger than predicted: T < 1


def test_perclscoo_fallback_below_min_pairs() -> None:
    pairs = synthetic_pairs(n=300)
    pairs.loc[pairs.index[:5], "gt_class"] = 7  # a rare class with 5 pairs
    cal = BoxCalibrator("iso_perclscoo", min_pairs=10).fit(pairs)
    assert "c7k0" not in cal.models_ and "c0k0" in cal.models_
    sigma = np.full((2, 4), 1.5)
    out = cal.calibrate(sigma, np.array([7, 0]), np.ones((2, 4)))
    np.testing.assert_allclose(out[0], [cal.models_[f"k{k}"].predict(np.array([1.5]))[0]
                                        for k in range(4)])  # fmt: skip
    np.testing.assert_allclose(out[1], [cal.models_[f"c0k{k}"].predict(np.array([1.5]))[0]
                                        for k in range(4)])  # fmt: skip


def test_rel_iso_uses_relative_units() -> None:
    pairs = synthetic_pairs()
    cal = make_box_calibrator("rel_iso_perclscoo").fit(pairs)
    sigma = np.full((1, 4), 2.0)
    small = cal.calibrate(sigma, np.array([0]), np.full((1, 4), 10.0))
    big = cal.calibrate(sigma * 2, np.array([0]), np.full((1, 4), 20.0))
    np.testing.assert_allclose(big, 2 * small)


@pytest.mark.parametrize("name", sorted(CLASS_CALIBRATORS))
def test_every_class_calibrator_roundtrips(name: str, tmp_path: Path) -> None:
    pairs = synthetic_pairs(n=300)
    table = to_predictions(pairs)
    cal = make_class_calibrator(name).fit(pairs)
    out = cal.transform(table)
    assert out["entropy_cal"].null_count == 0
    assert np.all(np.asarray(out["entropy_cal"]) <= np.log2(3) + 1e-6)
    CalibrationSet({"class": cal}).save(tmp_path)
    back = CalibrationSet.load(tmp_path).transform(table)
    assert back.equals(out)
    validate_table(out, PREDICTIONS)


@pytest.mark.parametrize("name", sorted(BOX_CALIBRATORS))
def test_every_box_calibrator_roundtrips(name: str, tmp_path: Path) -> None:
    pairs = synthetic_pairs(n=300)
    table = to_predictions(pairs)
    cs = CalibrationSet({"box_al": make_box_calibrator(name, kind="al").fit(pairs)})
    out = cs.transform(table)
    assert out["al_x1_cal"].null_count == 0
    cs.save(tmp_path)
    assert CalibrationSet.load(tmp_path).transform(table).equals(out)


def test_unc_variant_fills_mc_class_and_is_deterministic() -> None:
    pairs = synthetic_pairs(n=300)
    table = to_predictions(pairs)
    cs = fit_calibration_set(pairs, "iso_percls", "iso_perclscoo")
    assert set(cs.calibrators) == {"class", "class_mc", "box_al", "box_mc"}
    a, b = cs.transform(table), cs.transform(table)
    assert a.equals(b)
    ent_plain = cs.calibrators["class"].transform(table)["entropy_cal"]
    assert a["entropy_cal"].equals(ent_plain)  # entropy from the configured method
    assert a["mc_class_cal"].null_count == 0


def test_unknown_method_names_close_match() -> None:
    with pytest.raises(ValueError, match="iso_percls"):
        make_class_calibrator("iso_perclas")


def test_pairs_and_split_keep_images_together() -> None:
    preds = to_predictions(synthetic_pairs(n=30))
    matches = pa.table({
        "image_id": preds["image_id"], "det_id": preds["det_id"],
        "iou": pa.array(np.r_[np.zeros(3), np.full(27, 0.7)], pa.float32()),
        "gt_class": pa.array(np.zeros(30, np.int32)),
        **{f"gt_{c}": preds[c] for c in ("x1", "y1", "x2", "y2")},
    })  # fmt: skip
    pairs = calibration_pairs(preds, matches)
    assert len(pairs) == 27
    fit, rep = split_by_image(pairs, 0.8, np.random.default_rng(0))
    assert not set(fit.image_id) & set(rep.image_id)
    assert len(fit) + len(rep) == 27
