"""Inputs and outputs of cost-sensitive thresholding (ALGORITHMS §7.1, §7.2, §7.4).

Uncertainty names (``ENTALBOX`` or registered names), the per-row uncertainty matrix, the
threshold rows built from the matches and predictions, and ``ThresholdResult``: the JSON of
§7.4 that auto-labeling (§8) and the ``combo`` scores read. Import these through
``detloop.selectors.threshold``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detloop.data.errors import DataError
from detloop.data.io import write_json
from detloop.data.min_score import DEFAULT_MIN_SCORE
from detloop.data.schema import COORDS
from detloop.selectors.threshold_metrics import FloatArray
from detloop.selectors.uncertainty_names import UNCERTAINTIES

logger = logging.getLogger(__name__)

DEFAULT_IOU_THRS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def _col(df: pd.DataFrame, name: str, calibrated: bool) -> FloatArray:
    col = f"{name}_cal" if calibrated else name
    if col not in df.columns:
        raise ValueError(f"predictions lack column {col!r} (calibrated={calibrated})")
    return np.asarray(df[col].to_numpy(dtype=np.float64, na_value=np.nan))


def uncertainty_values(df: pd.DataFrame, name: str, calibrated: bool) -> FloatArray:
    """One registered uncertainty per row; ``*box_rel`` = mean_k σ_k / size_k (§0 rel());
    ``score_gap`` = 1 − score (no calibrated twin: the score is used as predicted)."""
    if name in ("entropy", "mc_class"):
        return _col(df, name, calibrated)
    if name == "score_gap":
        return 1.0 - _col(df, "score", False)
    if name not in ("albox_rel", "mcbox_rel"):
        raise ValueError(f"unknown uncertainty {name!r}; one of {UNCERTAINTIES}")
    prefix = name[:2]
    w = (df["x2"] - df["x1"]).to_numpy(np.float64)
    h = (df["y2"] - df["y1"]).to_numpy(np.float64)
    size = np.maximum(np.stack([w, h, w, h], axis=1), 1e-6)
    sig = np.stack([_col(df, f"{prefix}_{c}", calibrated) for c in COORDS], axis=1)
    return np.asarray(np.mean(sig / size, axis=1))


def uncertainty_matrix(df: pd.DataFrame, names: list[str], calibrated: bool) -> FloatArray:
    """[N, d] matrix of the named uncertainties; missing values become 0 (logged)."""
    u = np.stack([uncertainty_values(df, n, calibrated) for n in names], axis=1)
    bad = ~np.isfinite(u)
    if bad.any():
        logger.warning("%d missing uncertainty values treated as 0", int(bad.sum()))
        u = np.where(bad, 0.0, u)
    return np.asarray(u, dtype=np.float64)


def threshold_rows(
    predictions: pd.DataFrame, matches: pd.DataFrame, fd_scope: str = "matched",
    min_score: float = DEFAULT_MIN_SCORE,
) -> pd.DataFrame:  # fmt: skip
    """Rows of §7.1: GT-matched predictions (IoU > 0) with ``iou``, ``gt_class``, ``tps_class``;
    with ``fd_scope="all"`` also every prediction above ``min_score`` no GT selected (IoU 0)."""
    keep = ["image_id", "det_id", "gt_class", "iou"]
    keep += [f"gt_{c}" for c in COORDS if f"gt_{c}" in matches.columns]
    m = matches[(matches["iou"] > 0) & matches["det_id"].notna()][keep]
    m = m.astype({"det_id": np.int64})
    p = predictions.astype({"det_id": np.int64})
    rows = m.merge(p, on=["image_id", "det_id"], how="inner")
    if fd_scope == "all":
        taken = pd.MultiIndex.from_frame(m[["image_id", "det_id"]])
        key = pd.MultiIndex.from_frame(p[["image_id", "det_id"]])
        extra = p[~key.isin(taken) & (p["score"] > min_score)].copy()
        extra["gt_class"], extra["iou"] = -1, 0.0
        rows = pd.concat([rows, extra], ignore_index=True)
    elif fd_scope != "matched":
        raise ValueError(f"fd_scope must be 'matched' or 'all', got {fd_scope!r}")
    rows["tps_class"] = rows["class_id"].to_numpy() == rows["gt_class"].to_numpy()
    return rows.reset_index(drop=True)


# ---- the stored result (§7.4) --------------------------------------------------------------
def variant_key(
    uncertainties: Sequence[str],
    thr_cd: bool,
    thr_fpr_tpr: float,
    thr_iou_thrs: Sequence[float],
    unit: str,
    calibrated: bool,
    fd_scope: str = "matched",
) -> str:
    """A file-name-safe name of one thresholding setting, e.g.
    ``cd_b0.95_iou0.5-0.75_detection_cal_entropy+albox_rel`` (``fd-all`` for FD over every
    detection): the results of different settings are kept side by side, not overwritten."""
    mode = "cd" if thr_cd else ("fd" if fd_scope == "matched" else f"fd-{fd_scope}")
    ious = [float(x) for x in thr_iou_thrs]
    span = f"{min(ious):g}-{max(ious):g}" if ious else "none"
    cal = "_cal" if calibrated else ""
    return f"{mode}_b{thr_fpr_tpr:g}_iou{span}_{unit}{cal}_{'+'.join(uncertainties)}"


@dataclass
class ThresholdResult:
    """The thresholding JSON; ``thresholds[i]`` belongs to ``thr_iou_thrs[i]`` (None = +inf)."""

    uncertainties: list[str]
    weights: list[float]
    thresholds: list[float | None]
    threshold_mean: float | None
    thr_fpr_tpr: float
    thr_cd: bool
    thr_iou_thrs: list[float]
    fd_scope: str
    calibrated: bool
    calib_method_class: str | None
    calib_method_box: str | None
    optimizer: str
    seed: int
    n_trials: int
    objective: float
    metrics: dict[str, Any] = field(default_factory=dict)
    per_class: dict[str, Any] | None = None
    unit: str = "detection"  # what the budget counts (detloop extension; absent = detection)

    @property
    def variant(self) -> str:
        """The :func:`variant_key` of this result's setting."""
        return variant_key(
            self.uncertainties, self.thr_cd, self.thr_fpr_tpr, self.thr_iou_thrs, self.unit,
            self.calibrated, self.fd_scope,
        )  # fmt: skip

    @property
    def delta_mean(self) -> float:
        """δ̄ as a float (+inf when no threshold removes anything)."""
        return float("inf") if self.threshold_mean is None else float(self.threshold_mean)

    def combine(self, predictions: pd.DataFrame) -> FloatArray:
        """u = Σ w_i·u_i per prediction row, with the stored uncertainties."""
        u = uncertainty_matrix(predictions, self.uncertainties, self.calibrated)
        return np.asarray(u @ np.asarray(self.weights, dtype=np.float64))

    def save(self, path: Path) -> None:
        write_json(_jsonable(asdict(self)), path)

    @classmethod
    def load(cls, path: Path) -> ThresholdResult:
        """Read a thresholds JSON written by ``save`` (a ``DataError`` names missing keys)."""
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(str(path), None, None, f"cannot read thresholds: {exc}") from exc
        names = set(cls.__dataclass_fields__)
        optional = ("metrics", "per_class", "unit")
        missing = sorted(n for n in names if n not in doc and n not in optional)
        if missing:
            raise DataError(str(path), None, ",".join(missing), "missing thresholding keys")
        return cls(**{k: v for k, v in doc.items() if k in names})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def load_thresholds(path: Path) -> ThresholdResult:
    """Shorthand of ``ThresholdResult.load``."""
    return ThresholdResult.load(path)
