"""Calibration of class scores and box uncertainty (ALGORITHMS §5), torch-free.

Calibrators follow the scikit-learn estimator contract: ``__init__`` stores arguments,
``fit(pairs)`` returns ``self``, learned attributes end in ``_``, ``transform(table)`` fills the
``*_cal`` columns of a predictions table. They are stored as JSON (scalars) plus npz (isotonic
breakpoints) in an iteration's ``calibration/`` directory, never pickled, and loaded once.

Class methods: ``ts_all``, ``ts_percls``, ``iso_all``, ``iso_percls`` (default) and their MC-aware
``unc_`` variants; box methods: see ``detloop.learners.calibration_box``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from detloop.data.errors import DataError
from detloop.data.io import atomic_path, write_json
from detloop.learners.calibration_box import BOX_METHODS, BoxCalibrator
from detloop.learners.calibration_core import (
    Isotonic,
    apply_temperature,
    entropy_bits,
    fit_class_temperature,
    list_column,
    set_float_column,
)

CLASS_BASE_METHODS = ("ts_all", "ts_percls", "iso_all", "iso_percls")
CLASS_METHODS = (*CLASS_BASE_METHODS, *(f"unc_{m}" for m in CLASS_BASE_METHODS))
STATE_JSON = "calibrators.json"
STATE_NPZ = "calibrators.npz"


class ClassCalibrator:
    """Calibrator of class probabilities from logits (§5.1).

    Args:
        method: one of ``CLASS_METHODS``; ``unc_*`` fits/applies on MC logit samples.
        n_samples: logit samples per row for the ``unc_`` variants.
        random_state: seed of the ``unc_`` sampling (fit and transform draw from it afresh, so
            the same table always gives the same output).
    """

    def __init__(self, method: str = "iso_percls", n_samples: int = 10, random_state: int = 0):
        self.method = method
        self.n_samples = n_samples
        self.random_state = random_state

    @property
    def unc(self) -> bool:
        return self.method.startswith("unc_")

    @property
    def base(self) -> str:
        return self.method.removeprefix("unc_")

    def _samples(self, z: np.ndarray, sd: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.random_state)
        eps = rng.standard_normal((self.n_samples, *z.shape))
        return np.asarray(z[None] + eps * sd[None])

    def fit(self, pairs: pd.DataFrame) -> ClassCalibrator:
        """Fit on pairs with ``logits`` (and ``mc_class_vec`` for ``unc_``) and ``gt_class``."""
        if self.method not in CLASS_METHODS:
            raise ValueError(f"unknown class calibration method {self.method!r}")
        z = list_column(pairs["logits"], "logits")
        y = pairs["gt_class"].to_numpy(np.int64)
        if self.unc:
            z = self._samples(z, list_column(pairs["mc_class_vec"], "mc_class_vec")).reshape(
                -1, z.shape[1]
            )
            y = np.tile(y, self.n_samples)
        self.n_classes_ = int(z.shape[1])
        self.temperature_ = np.ones(1)
        self.models_: list[Isotonic] = []
        if self.base.startswith("ts_"):
            self.temperature_ = fit_class_temperature(z, y, per_class=self.base == "ts_percls")
            return self
        p = apply_temperature(z, np.ones(1))
        onehot = np.eye(self.n_classes_)[y]
        if self.base == "iso_all":
            self.models_ = [Isotonic.fit(p.ravel(), onehot.ravel(), 0.0, 1.0)]
        else:
            self.models_ = [
                Isotonic.fit(p[:, c], onehot[:, c], 0.0, 1.0) for c in range(self.n_classes_)
            ]
        return self

    def _proba(self, z: np.ndarray) -> np.ndarray:
        p = apply_temperature(z, self.temperature_)
        if self.base.startswith("ts_"):
            return p
        if self.base == "iso_all":
            q = self.models_[0].predict(p.ravel()).reshape(p.shape)
        else:
            q = np.stack([m.predict(p[..., c]) for c, m in enumerate(self.models_)], axis=-1)
        s = q.sum(axis=-1, keepdims=True)
        return np.where(s > 0, q / np.where(s > 0, s, 1.0), p)

    def predict_proba(
        self, logits: np.ndarray, mc_std: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities [N, C] and, for ``unc_``, their per-class std over samples."""
        z = np.asarray(logits, dtype=np.float64)
        if not self.unc:
            return self._proba(z), None
        if mc_std is None:
            raise ValueError(f"{self.method} needs the MC logit std (mc_class_vec)")
        q = self._proba(self._samples(z, mc_std))
        return q.mean(axis=0), q.std(axis=0)

    def transform(self, table: pa.Table) -> pa.Table:
        """Fill ``entropy_cal`` (and ``mc_class_cal`` for ``unc_``) of a predictions table."""
        ok = np.asarray(table["logits"].is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if self.unc:
            ok &= np.asarray(table["mc_class_vec"].is_valid().to_numpy(zero_copy_only=False))
        ent = np.full(table.num_rows, np.nan)
        mcc = np.full(table.num_rows, np.nan)
        if ok.any():
            sub = table.filter(pa.array(ok))
            sd = list_column(sub["mc_class_vec"], "mc_class_vec") if self.unc else None
            p, p_std = self.predict_proba(list_column(sub["logits"], "logits"), sd)
            ent[ok] = entropy_bits(p)
            if p_std is not None:
                mcc[ok] = p_std.mean(axis=1)
        table = set_float_column(table, "entropy_cal", ent)
        return set_float_column(table, "mc_class_cal", mcc) if self.unc else table

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-ready parameters and npz arrays of the fitted state."""
        meta = {
            "type": "class",
            "method": self.method,
            "n_samples": self.n_samples,
            "random_state": self.random_state,
            "n_classes": self.n_classes_,
            "temperature": [float(t) for t in self.temperature_],
            "n_models": len(self.models_),
        }
        arrays: dict[str, np.ndarray] = {}
        for i, m in enumerate(self.models_):
            arrays[f"m{i}_x"], arrays[f"m{i}_y"] = m.x_, m.y_
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ClassCalibrator:
        """Rebuild a fitted calibrator from ``get_state`` output."""
        obj = cls(meta["method"], int(meta["n_samples"]), int(meta["random_state"]))
        obj.n_classes_ = int(meta["n_classes"])
        obj.temperature_ = np.asarray(meta["temperature"], dtype=np.float64)
        obj.models_ = [
            Isotonic(arrays[f"m{i}_x"], arrays[f"m{i}_y"]) for i in range(int(meta["n_models"]))
        ]
        return obj


# ---- registry ------------------------------------------------------------------------------
Calibrator = ClassCalibrator | BoxCalibrator
CLASS_CALIBRATORS: dict[str, Callable[..., ClassCalibrator]] = {
    m: (lambda m=m, **kw: ClassCalibrator(m, **kw)) for m in CLASS_METHODS
}
BOX_CALIBRATORS: dict[str, Callable[..., BoxCalibrator]] = {
    m: (lambda m=m, **kw: BoxCalibrator(m, **kw)) for m in BOX_METHODS
}


def _lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    if name not in registry:
        close = difflib.get_close_matches(name, list(registry), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown {what} calibration method {name!r}{hint}; one of {list(registry)}"
        )
    return registry[name]


def make_class_calibrator(name: str, **kwargs: Any) -> ClassCalibrator:
    """A class calibrator by registered name, e.g. ``iso_percls`` or ``unc_ts_all``."""
    return _lookup(CLASS_CALIBRATORS, name, "class")(**kwargs)  # type: ignore[no-any-return]


def make_box_calibrator(name: str, **kwargs: Any) -> BoxCalibrator:
    """A box calibrator by registered name, e.g. ``iso_perclscoo``; kwargs: kind, objective."""
    return _lookup(BOX_CALIBRATORS, name, "box")(**kwargs)  # type: ignore[no-any-return]


# ---- pairs ---------------------------------------------------------------------------------
def calibration_pairs(predictions: pa.Table, matches: pa.Table) -> pd.DataFrame:
    """Matched (GT, prediction) pairs with IoU > 0: matches joined with the prediction columns."""
    m = matches.to_pandas()
    m = m[(m["iou"] > 0) & m["det_id"].notna()].copy()
    m["det_id"] = m["det_id"].astype(np.int64)
    p = predictions.to_pandas()
    p["det_id"] = p["det_id"].astype(np.int64)
    out: pd.DataFrame = m.merge(p, on=["image_id", "det_id"], how="inner")
    return out.reset_index(drop=True)


def split_by_image(
    pairs: pd.DataFrame, frac: float, rng: np.random.Generator, mode: str = "random"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded split by image (an image's pairs stay together); ``ordered``: first rows."""
    if mode == "ordered":
        k = int(np.floor(frac * len(pairs)))
        return pairs.iloc[:k].reset_index(drop=True), pairs.iloc[k:].reset_index(drop=True)
    images = np.array(sorted(pairs["image_id"].unique()))
    images = images[rng.permutation(len(images))]
    fit_ids = set(images[: round(frac * len(images))])
    mask = pairs["image_id"].isin(fit_ids).to_numpy()
    return pairs[mask].reset_index(drop=True), pairs[~mask].reset_index(drop=True)


# ---- a set of calibrators, stored together -------------------------------------------------
@dataclass
class CalibrationSet:
    """The configured calibrators of one iteration, applied together to a predictions table."""

    calibrators: dict[str, Calibrator]

    def transform(self, table: pa.Table) -> pa.Table:
        """Fill every ``*_cal`` column the stored calibrators provide.

        ``unc_`` class calibrators run first, so ``entropy_cal`` comes from the configured
        class method and ``mc_class_cal`` from its ``unc_`` twin.
        """
        first = [c for c in self.calibrators.values() if isinstance(c, ClassCalibrator) and c.unc]
        rest = [c for c in self.calibrators.values() if c not in first]
        for cal in first + rest:
            table = cal.transform(table)
        return table

    def save(self, directory: Path) -> list[Path]:
        """Write ``calibrators.json`` and ``calibrators.npz`` into ``directory`` atomically."""
        meta: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for name, cal in self.calibrators.items():
            m, a = cal.get_state()
            meta[name] = m
            arrays.update({f"{name}/{k}": v for k, v in a.items()})
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / STATE_NPZ) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        write_json({"version": 1, "calibrators": meta}, directory / STATE_JSON)
        return [directory / STATE_JSON, directory / STATE_NPZ]

    @classmethod
    def load(cls, directory: Path) -> CalibrationSet:
        """Read a set written by ``save``."""
        path = directory / STATE_JSON
        try:
            doc = json.loads(path.read_text())
            with np.load(directory / STATE_NPZ) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise DataError(str(path), None, None, f"cannot read calibrators: {exc}") from exc
        cals: dict[str, Calibrator] = {}
        for name, meta in doc["calibrators"].items():
            own = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}/")}
            maker = ClassCalibrator if meta["type"] == "class" else BoxCalibrator
            cals[name] = maker.from_state(meta, own)
        return cls(cals)


def fit_calibration_set(
    pairs: pd.DataFrame,
    class_method: str | None = "iso_percls",
    box_method: str | None = "iso_perclscoo",
    *,
    objective: str = "rmse",
    min_pairs: int = 10,
    n_samples: int = 10,
    random_state: int = 0,
) -> CalibrationSet:
    """Fit the configured calibrators on ``pairs`` (None disables a family).

    Class: the configured method and, when the pairs carry MC logit stds, its ``unc_`` twin (for
    ``mc_class_cal``). Box: one calibrator per std family present (``al``, ``mc``).
    """
    cals: dict[str, Calibrator] = {}
    if class_method is not None and pairs["logits"].notna().all():
        base = class_method.removeprefix("unc_")
        cals["class"] = make_class_calibrator(
            class_method, n_samples=n_samples, random_state=random_state
        ).fit(pairs)
        if pairs["mc_class_vec"].notna().all():
            cals["class_mc"] = make_class_calibrator(
                f"unc_{base}", n_samples=n_samples, random_state=random_state
            ).fit(pairs)
    if box_method is not None:
        for kind in ("al", "mc"):
            if pairs[f"{kind}_x1"].notna().any():
                cals[f"box_{kind}"] = make_box_calibrator(
                    box_method, kind=kind, objective=objective, min_pairs=min_pairs
                ).fit(pairs)
    return CalibrationSet(cals)
