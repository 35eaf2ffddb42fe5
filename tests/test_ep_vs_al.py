"""The epistemic-vs-aleatoric quadrant study on planted pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from detloop.data.schema import COORDS
from detloop.reports.ep_vs_al import pair_values, plot_study, quadrant_study


def planted(ep: np.ndarray, al: np.ndarray, err: np.ndarray, iou: np.ndarray) -> pd.DataFrame:
    """Pairs whose corner stds are ep / al and whose every corner is off by err."""
    gt = np.tile([10.0, 20.0, 50.0, 60.0], (len(ep), 1))
    cols: dict[str, np.ndarray] = {"iou": iou}
    for j, c in enumerate(COORDS):
        cols[c] = gt[:, j] + err * (1 if j % 2 else -1)
        cols[f"gt_{c}"] = gt[:, j]
        cols[f"mc_{c}"] = ep
        cols[f"al_{c}"] = al
    return pd.DataFrame(cols)


def test_quadrants_and_correlations_of_a_planted_table(tmp_path: Path) -> None:
    i = np.arange(100, dtype=float)
    pairs = planted(ep=1 + i, al=101 - i, err=0.5 * (1 + i), iou=np.where(i < 30, 0.3, 0.8))
    values = pair_values(pairs)
    assert values is not None
    assert np.allclose(values["err"], 0.5 * (1 + i)) and np.allclose(values["ep"], 1 + i)
    study = quadrant_study(values)
    assert study["median_ep"] == 50.5 and study["median_al"] == 51.5  # al: 2..101
    q = study["quadrants"]
    assert q["high_ep_low_al"]["n"] == q["low_ep_high_al"]["n"] == 50
    assert q["low_ep_low_al"]["n"] == q["high_ep_high_al"]["n"] == 0
    assert q["low_ep_low_al"]["mean_iou"] is None
    assert q["high_ep_low_al"]["mean_err"] == pytest.approx(0.5 * np.mean(1 + i[50:]))
    assert q["low_ep_high_al"]["localised"] == pytest.approx(20 / 50)  # i = 30..49 of 0..49
    rho = study["spearman"]
    assert rho["ep_al"] == pytest.approx(-1.0) and rho["ep_err"] == pytest.approx(1.0)
    assert rho["al_err"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noisy = planted(
        rng.lognormal(size=200), rng.lognormal(size=200), rng.random(200), rng.random(200)
    )
    v = pair_values(noisy)
    assert v is not None
    want = stats.spearmanr(v["ep"], v["al"]).statistic
    assert quadrant_study(v)["spearman"]["ep_al"] == pytest.approx(want)
    assert plot_study(v, quadrant_study(v), tmp_path / "ep_vs_al.png").stat().st_size > 0


def test_pairs_without_both_stds_have_no_study() -> None:
    i = np.arange(5, dtype=float)
    pairs = planted(1 + i, 1 + i, i, i / 5)
    assert pair_values(pairs.drop(columns=["mc_x1"])) is None
    assert pair_values(pairs.iloc[:0]) is None
    pairs.loc[2, "al_y2"] = np.nan  # a pair without a finite std is left out
    values = pair_values(pairs)
    assert values is not None and len(values) == 4
