"""Box-uncertainty calibrators (ALGORITHMS §5.2): regress predicted corner stds onto observed
absolute corner errors, for the aleatoric (``al_*``) or the MC (``mc_*``) stds alike.

Methods: ``ts_all``, ``ts_percoo`` (σ/T), ``iso_all``, ``iso_percoo``, ``iso_perclscoo`` (default;
one isotonic map per (class, coordinate), fitted with the GT class, applied with the predicted
class, falling back to the coordinate's map below ``min_pairs`` pairs), ``rel_iso_perclscoo``,
``rel_iso_all``, ``rel_iso_percoo`` (relative units σ/size on both axes).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from detloop.data.schema import COORDS
from detloop.learners.calibration_core import (
    Isotonic,
    box_sizes,
    coord_matrix,
    fit_box_temperature,
    set_float_column,
)

logger = logging.getLogger(__name__)

BOX_METHODS = (
    "ts_all",
    "ts_percoo",
    "iso_all",
    "iso_percoo",
    "iso_perclscoo",
    "rel_iso_perclscoo",
    "rel_iso_all",
    "rel_iso_percoo",
)
_SIZE_FLOOR = 1e-6
STD_FLOOR = 1e-6  # calibrated stds (absolute, or relative for rel_*) are at least this


class BoxCalibrator:
    """Calibrator of the corner stds ``<kind>_x1 .. <kind>_y2`` (scikit-learn estimator contract).

    Args:
        method: one of ``BOX_METHODS``.
        kind: ``al`` (aleatoric) or ``mc`` (epistemic).
        objective: temperature objective ``rmse`` (default), ``mae`` or ``nll``.
        min_pairs: minimum pairs of a (class, coordinate) cell for its own isotonic map.
    """

    def __init__(
        self, method: str = "iso_perclscoo", kind: str = "al", objective: str = "rmse",
        min_pairs: int = 10,
    ) -> None:  # fmt: skip
        self.method = method
        self.kind = kind
        self.objective = objective
        self.min_pairs = min_pairs

    # ---- fitting -------------------------------------------------------------------------
    @property
    def relative(self) -> bool:
        return self.method.startswith("rel_")

    def _xy(self, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        sigma = coord_matrix(pairs, f"{self.kind}_")
        resid = np.abs(coord_matrix(pairs, "") - coord_matrix(pairs, "gt_"))
        if self.relative:
            size = np.maximum(box_sizes(pairs), _SIZE_FLOOR)
            sigma, resid = sigma / size, resid / size
        return sigma, resid

    def fit(self, pairs: pd.DataFrame) -> BoxCalibrator:
        """Fit on calibration pairs (prediction columns plus ``gt_class``, ``gt_x1..gt_y2``)."""
        if self.method not in BOX_METHODS:
            raise ValueError(
                f"unknown box calibration method {self.method!r}; one of {BOX_METHODS}"
            )
        sigma, resid = self._xy(pairs)
        ok = np.isfinite(sigma) & np.isfinite(resid)
        self.temperature_ = np.ones(4)
        self.models_: dict[str, Isotonic] = {}
        self.n_pairs_ = len(pairs)
        base = self.method.removeprefix("rel_")
        if base == "ts_all":
            self.temperature_[:] = fit_box_temperature(sigma[ok], resid[ok], self.objective)
        elif base == "ts_percoo":
            for k in range(4):
                m = ok[:, k]
                self.temperature_[k] = fit_box_temperature(sigma[m, k], resid[m, k], self.objective)
        elif base == "iso_all":
            self.models_["all"] = Isotonic.fit(sigma[ok], resid[ok])
        else:
            for k in range(4):
                m = ok[:, k]
                self.models_[f"k{k}"] = Isotonic.fit(sigma[m, k], resid[m, k])
            if base == "iso_perclscoo":
                self._fit_cells(pairs["gt_class"].to_numpy(np.int64), sigma, resid, ok)
        return self

    def _fit_cells(
        self, cls: np.ndarray, sigma: np.ndarray, resid: np.ndarray, ok: np.ndarray
    ) -> None:
        for c in np.unique(cls):
            for k in range(4):
                m = ok[:, k] & (cls == c)
                if int(m.sum()) < self.min_pairs:
                    logger.info(
                        "box calibration %s: class %d %s has %d pairs (< %d): coordinate model",
                        self.kind, c, COORDS[k], int(m.sum()), self.min_pairs,
                    )  # fmt: skip
                    continue
                self.models_[f"c{int(c)}k{k}"] = Isotonic.fit(sigma[m, k], resid[m, k])

    # ---- applying ------------------------------------------------------------------------
    def calibrate(self, sigma: np.ndarray, cls: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Calibrated [N, 4] stds from raw stds, predicted classes and (w, h, w, h) sizes."""
        size = np.maximum(size, _SIZE_FLOOR)
        x = sigma / size if self.relative else sigma.astype(np.float64)
        out = np.full_like(x, np.nan, dtype=np.float64)
        base = self.method.removeprefix("rel_")
        if base.startswith("ts_"):
            out = x / self.temperature_[None, :]
        elif base == "iso_all":
            out = self.models_["all"].predict(x)
        else:
            for k in range(4):
                out[:, k] = self.models_[f"k{k}"].predict(x[:, k])
                for key, model in self.models_.items():
                    if key.startswith("c") and key.endswith(f"k{k}"):
                        rows = cls == int(key[1 : key.index("k")])
                        out[rows, k] = model.predict(x[rows, k])
        out = np.maximum(out, STD_FLOOR)  # a zero std would make NLL and PIT undefined
        out[~np.isfinite(x)] = np.nan
        return out * size if self.relative else out

    def transform(self, table: pa.Table) -> pa.Table:
        """Fill ``<kind>_x1_cal .. <kind>_y2_cal`` of a predictions table (predicted class)."""
        df = table.select(["class_id", *COORDS, *(f"{self.kind}_{c}" for c in COORDS)]).to_pandas()
        cal = self.calibrate(
            coord_matrix(df, f"{self.kind}_"), df["class_id"].to_numpy(np.int64), box_sizes(df)
        )
        for k, c in enumerate(COORDS):
            table = set_float_column(table, f"{self.kind}_{c}_cal", cal[:, k])
        return table

    # ---- storage -------------------------------------------------------------------------
    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-ready parameters and the npz arrays of the fitted state."""
        meta = {
            "type": "box",
            "method": self.method,
            "kind": self.kind,
            "objective": self.objective,
            "min_pairs": self.min_pairs,
            "n_pairs": int(self.n_pairs_),
            "temperature": [float(t) for t in self.temperature_],
            "models": sorted(self.models_),
        }
        arrays: dict[str, np.ndarray] = {}
        for key, model in self.models_.items():
            arrays[f"{key}_x"], arrays[f"{key}_y"] = model.x_, model.y_
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> BoxCalibrator:
        """Rebuild a fitted calibrator from ``get_state`` output."""
        obj = cls(meta["method"], meta["kind"], meta["objective"], int(meta["min_pairs"]))
        obj.n_pairs_ = int(meta["n_pairs"])
        obj.temperature_ = np.asarray(meta["temperature"], dtype=np.float64)
        obj.models_ = {k: Isotonic(arrays[f"{k}_x"], arrays[f"{k}_y"]) for k in meta["models"]}
        return obj
