"""Uncertainty-quality reports of calibration pairs (ALGORITHMS §5 metrics, §6.2), with plots.

``pairs`` are matched (GT, prediction) rows from ``calibration_pairs``; a report is computed
uncalibrated and, when a ``CalibrationSet`` (or ``*_cal`` columns) is available, calibrated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy.special import softmax

from detloop.data.schema import COORDS
from detloop.learners import uq_metrics as uq
from detloop.learners.calibration import CalibrationSet, ClassCalibrator
from detloop.learners.calibration_core import coord_matrix, list_column

logger = logging.getLogger(__name__)
KINDS = ("al", "mc")


def pairs_table(pairs: pd.DataFrame) -> pa.Table:
    """Pairs as an Arrow table that calibrators can transform."""
    return pa.Table.from_pandas(pairs, preserve_index=False)


def with_calibration(pairs: pd.DataFrame, cal: CalibrationSet) -> pd.DataFrame:
    """Pairs with every ``*_cal`` column the set provides."""
    out = cal.transform(pairs_table(pairs)).to_pandas()
    return out if isinstance(out, pd.DataFrame) else pd.DataFrame(out)


def class_probs(pairs: pd.DataFrame, cal: CalibrationSet | None) -> dict[str, np.ndarray]:
    """Uncalibrated softmax and (when a class calibrator exists) calibrated probabilities."""
    if len(pairs) == 0 or pairs["logits"].isna().any():
        return {}
    z = list_column(pairs["logits"], "logits")
    out = {"uncalibrated": softmax(z, axis=1)}
    c = cal.calibrators.get("class") if cal is not None else None
    if isinstance(c, ClassCalibrator):
        sd = list_column(pairs["mc_class_vec"], "mc_class_vec") if c.unc else None
        out["calibrated"] = c.predict_proba(z, sd)[0]
    return out


def class_report(pairs: pd.DataFrame, cal: CalibrationSet | None, n_bins: int) -> dict[str, Any]:
    """ECE, MCE, SCE, Brier, NLL (+ reliability bins) per available probability set."""
    labels = pairs["gt_class"].to_numpy(np.int64)
    return {k: uq.class_metrics(p, labels, n_bins) for k, p in class_probs(pairs, cal).items()}


def box_arrays(
    pairs: pd.DataFrame, kind: str, calibrated: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(pred, sigma, gt) [N, 4] arrays for one std family, or None when absent."""
    suffix = "_cal" if calibrated else ""
    if f"{kind}_x1{suffix}" not in pairs.columns or pairs[f"{kind}_x1{suffix}"].isna().all():
        return None
    return (
        coord_matrix(pairs, ""),
        coord_matrix(pairs, f"{kind}_", suffix),
        coord_matrix(pairs, "gt_"),
    )


def box_report(pairs: pd.DataFrame, rng: np.random.Generator, toolbox: bool) -> dict[str, Any]:
    """Box-uncertainty metrics per std family, uncalibrated and calibrated."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        for calibrated in (False, True):
            arrays = box_arrays(pairs, kind, calibrated)
            if arrays is not None and len(pairs):
                key = f"{kind}_{'calibrated' if calibrated else 'uncalibrated'}"
                pred, sigma, gt = arrays
                out[key] = uq.box_uncertainty_report(pred, sigma, gt, rng, toolbox)
    return out


def write_plots(
    pairs: pd.DataFrame, cal: CalibrationSet | None, out_dir: Path, rng: np.random.Generator,
    n_bins: int = 10,
) -> list[Path]:  # fmt: skip
    """Reliability diagrams, calibration curves, σ-vs-residual scatter, PIT, toolbox panels."""
    from detloop.reports import calibration_plots as cp

    written: list[Path] = []
    labels = pairs["gt_class"].to_numpy(np.int64)
    for name, p in class_probs(pairs, cal).items():
        m = uq.class_metrics(p, labels, n_bins)
        written.append(cp.reliability_diagram(m["reliability"], out_dir / f"reliability_{name}.png",
                                              f"top-label ({name})"))  # fmt: skip
        per_class = {
            str(c): uq.reliability_bins(p[:, c], labels == c, n_bins).to_dict()
            for c in range(p.shape[1])
        }
        written.append(cp.reliability_grid(per_class, out_dir / f"reliability_cls_{name}.png"))
    for kind in KINDS:
        raw, calib = box_arrays(pairs, kind, False), box_arrays(pairs, kind, True)
        if raw is None or len(pairs) < 2:
            continue
        pred, sigma, gt = raw
        sigmas = {"uncalibrated": sigma} | ({"calibrated": calib[1]} if calib else {})
        resid = gt - pred
        written.append(cp.regression_calibration_curve(resid, sigmas, out_dir / f"{kind}_curve.png",
                                                       f"{kind} std"))  # fmt: skip
        written.append(cp.sigma_vs_residual(sigma, resid, out_dir / f"{kind}_sigma_resid.png"))
        pits = {k: uq.pit(gt, pred, s) for k, s in sigmas.items()}
        written.append(cp.pit_plot(pits, out_dir / f"{kind}_pit.png", f"PIT ({kind})"))
        for k, s in sigmas.items():
            written.append(cp.intervals(pred[:, 0], s[:, 0], gt[:, 0],
                                        out_dir / f"{kind}_intervals_{k}.png", rng,
                                        title=f"{kind} x1 ±σ ({k})"))  # fmt: skip
            written.append(cp.toolbox_panel(pred, s, gt, out_dir / f"{kind}_toolbox_{k}.png", rng))
    logger.info("wrote %d plots to %s", len(written), out_dir)
    return written


def box_ece(pairs: pd.DataFrame, kind: str, calibrated: bool) -> float | None:
    """Regression ECE of one std family (None when absent)."""
    arrays = box_arrays(pairs, kind, calibrated)
    if arrays is None or not len(pairs):
        return None
    pred, sigma, gt = arrays
    ok = np.all(np.isfinite(sigma) & (sigma > 0), axis=1)
    return uq.regression_ece(gt[ok] - pred[ok], sigma[ok])


def coords_present(pairs: pd.DataFrame, kind: str) -> bool:
    return all(f"{kind}_{c}" in pairs.columns for c in COORDS) and bool(
        pairs[f"{kind}_x1"].notna().any()
    )
