"""Numerical building blocks of calibration (ALGORITHMS §5), free of torch.

* ``Isotonic``: an increasing step-linear map stored as breakpoints, fitted with scikit-learn and
  applied as clipped linear interpolation (identical to ``IsotonicRegression(out_of_bounds="clip")
  .predict``), so it round-trips through npz bit-exactly without pickles.
* Temperature fits: T = exp(τ), L-BFGS from τ = 0 (T = 1), for class logits (NLL) and for box
  stds (``rmse``, ``mae`` or ``nll`` objective).
* Helpers that turn prediction/pair tables into arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax
from sklearn.isotonic import IsotonicRegression

from detloop.data.schema import COORDS


@dataclass(frozen=True)
class Isotonic:
    """Fitted isotonic map ``x -> y`` (breakpoints ``x_`` ascending, ``y_`` non-decreasing)."""

    x_: np.ndarray
    y_: np.ndarray

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, y_min: float | None = None, y_max: float | None = None
    ) -> Isotonic:
        """Fit an increasing isotonic regression of ``y`` on ``x`` (scikit-learn's PAVA)."""
        iso = IsotonicRegression(increasing=True, y_min=y_min, y_max=y_max, out_of_bounds="clip")
        iso.fit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        return cls(
            np.asarray(iso.X_thresholds_, dtype=np.float64),
            np.asarray(iso.y_thresholds_, dtype=np.float64),
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Clipped linear interpolation between the breakpoints."""
        x = np.asarray(x, dtype=np.float64)
        if self.x_.size == 1:
            return np.full(x.shape, self.y_[0])
        return np.asarray(np.interp(np.clip(x, self.x_[0], self.x_[-1]), self.x_, self.y_))


def fit_class_temperature(logits: np.ndarray, labels: np.ndarray, per_class: bool) -> np.ndarray:
    """Temperatures minimising the NLL of ``softmax(z / T)`` (Guo et al. 2017, temperature scaling).

    Args:
        logits: [N, C] logits.
        labels: [N] true class indices.
        per_class: one temperature per class column (``ts_percls``) instead of one scalar.

    Returns:
        Temperatures, shape [C] if ``per_class`` else [1].
    """
    z = np.asarray(logits, dtype=np.float64)
    n, c = z.shape
    onehot = np.zeros_like(z)
    onehot[np.arange(n), labels] = 1.0

    def nll_and_grad(tau: np.ndarray) -> tuple[float, np.ndarray]:
        s = z * np.exp(-tau)
        lse = logsumexp(s, axis=1)
        nll = float(np.mean(lse - s[np.arange(n), labels]))
        g = -(np.exp(s - lse[:, None]) - onehot) * s / n  # dNLL/dτ_c = Σ_i (p - y)_ic · (−s_ic)
        grad = g.sum(axis=0) if per_class else np.array([g.sum()])
        return nll, grad

    tau0 = np.zeros(c if per_class else 1)
    res = minimize(nll_and_grad, tau0, jac=True, method="L-BFGS-B")
    return np.asarray(np.exp(res.x), dtype=np.float64)


def class_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0)
    return float(-np.mean(np.log(p)))


def apply_temperature(logits: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """``softmax(z / T)`` row-wise (T scalar or per class)."""
    return np.asarray(softmax(np.asarray(logits, np.float64) / temperature, axis=-1))


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cw, 0.5 * cw[-1])])


def fit_box_temperature(sigma: np.ndarray, resid: np.ndarray, objective: str) -> float:
    """Temperature T of ``σ / T`` fitted to absolute residuals ``r`` (1-D arrays).

    ``rmse`` minimises sqrt(mean (r − σ/T)²) (optimum 1/T = Σrσ/Σσ²), ``nll`` the Gaussian NLL of
    r under N(0, (σ/T)²), both with L-BFGS on τ = log T from T = 1. ``mae`` has no gradient at its
    optimum; its exact minimiser, the σ-weighted median of r/σ, is used instead.
    """
    ok = np.isfinite(sigma) & np.isfinite(resid) & (sigma > 0)
    s, r = sigma[ok].astype(np.float64), resid[ok].astype(np.float64)
    if s.size == 0:
        return 1.0
    if objective == "mae":
        a = _weighted_median(r / s, s)
        return 1.0 / a if a > 0 else 1.0

    def loss(tau: np.ndarray) -> tuple[float, np.ndarray]:
        a = float(np.exp(-tau[0]))
        if objective == "rmse":
            f = float(np.sqrt(np.mean((r - a * s) ** 2)))
            dfa = float(np.mean(-(r - a * s) * s)) / max(f, 1e-300)
        else:  # nll (constants dropped)
            f = float(np.mean(np.log(a * s) + r**2 / (2 * a**2 * s**2)))
            dfa = float(np.mean(1.0 / a - r**2 / (a**3 * s**2)))
        return f, np.array([-a * dfa])

    res = minimize(loss, np.zeros(1), jac=True, method="L-BFGS-B", options={"gtol": 1e-12})
    return float(np.exp(res.x[0]))


# ---- arrays from tables --------------------------------------------------------------------


def list_column(values: Any, name: str) -> np.ndarray:
    """A list<float> column (pandas Series of arrays or Arrow column) as an [N, C] array."""
    if isinstance(values, pa.ChunkedArray | pa.Array):
        values = values.to_pylist()
    rows = list(values)
    if any(v is None for v in rows):
        raise ValueError(f"column {name!r} has null entries")
    if not rows:
        return np.zeros((0, 0))
    return np.stack([np.asarray(v, dtype=np.float64) for v in rows])


def coord_matrix(df: pd.DataFrame, prefix: str, suffix: str = "") -> np.ndarray:
    """Columns ``<prefix>x1<suffix> .. <prefix>y2<suffix>`` as an [N, 4] float64 array."""
    cols = [f"{prefix}{c}{suffix}" for c in COORDS]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns {missing}")
    return df[cols].to_numpy(dtype=np.float64, na_value=np.nan)


def box_sizes(df: pd.DataFrame) -> np.ndarray:
    """[N, 4] sizes of the predicted boxes: (w, h, w, h)."""
    w = (df["x2"] - df["x1"]).to_numpy(np.float64)
    h = (df["y2"] - df["y1"]).to_numpy(np.float64)
    return np.stack([w, h, w, h], axis=1)


def entropy_bits(probs: np.ndarray) -> np.ndarray:
    """Row-wise Shannon entropy in bits."""
    p = np.clip(probs, 1e-30, 1.0)
    return np.asarray(-(probs * np.log2(p)).sum(axis=-1))


def set_float_column(table: pa.Table, name: str, values: np.ndarray) -> pa.Table:
    """Add or replace a float32 column; NaN becomes null."""
    values = np.asarray(values, dtype=np.float32)
    col = pa.array(values, type=pa.float32(), mask=~np.isfinite(values))
    idx = table.schema.get_field_index(name)
    if idx >= 0:
        return table.set_column(idx, name, col)
    return table.append_column(name, col)
