"""Epistemic vs aleatoric localisation uncertainty (the reference's ``uncertainty_ep_vs_al``):
do the two stds say the same thing, and which one tracks the actual error?

Per matched (gt, prediction) pair: ``ep`` = mean of the four MC-dropout corner stds, ``al`` = mean
of the four aleatoric corner stds, ``err`` = mean absolute corner residual (all in pixels), and
the IoU. The pairs fall into four quadrants by the medians of ``ep`` and ``al`` (low/high each);
per quadrant: the count and share, mean IoU, share localised (IoU ≥ 0.5), mean error and the two
mean stds. Spearman rank correlations of ep with al, and of each with the error, summarise it:
a model whose epistemic std tracks the error where the aleatoric one does not (or the reverse)
shows it here. One scatter plot (ep vs al, log axes, coloured by IoU, median lines) and the
error per quadrant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from detloop.data.schema import COORDS

QUADRANTS = ("low_ep_low_al", "high_ep_low_al", "low_ep_high_al", "high_ep_high_al")


def pair_values(pairs: pd.DataFrame) -> pd.DataFrame | None:
    """``ep``, ``al``, ``err`` and ``iou`` per pair with both stds finite (None when the pairs
    lack either std family)."""
    need = [f"{k}_{c}" for k in ("mc", "al") for c in COORDS]
    if len(pairs) == 0 or any(c not in pairs.columns for c in need):
        return None
    mc = pairs[[f"mc_{c}" for c in COORDS]].to_numpy(np.float64)
    al = pairs[[f"al_{c}" for c in COORDS]].to_numpy(np.float64)
    pred = pairs[list(COORDS)].to_numpy(np.float64)
    gt = pairs[[f"gt_{c}" for c in COORDS]].to_numpy(np.float64)
    out = pd.DataFrame(
        {
            "ep": mc.mean(axis=1),
            "al": al.mean(axis=1),
            "err": np.abs(pred - gt).mean(axis=1),
            "iou": pairs["iou"].to_numpy(np.float64),
        }
    )
    keep = np.isfinite(out.to_numpy()).all(axis=1)
    return out[keep].reset_index(drop=True) if keep.any() else None


def quadrant_study(values: pd.DataFrame) -> dict[str, Any]:
    """The quadrant table and the rank correlations of :func:`pair_values`' output."""
    ep_med, al_med = float(values["ep"].median()), float(values["al"].median())
    high_ep, high_al = values["ep"] > ep_med, values["al"] > al_med
    masks = {
        "low_ep_low_al": ~high_ep & ~high_al,
        "high_ep_low_al": high_ep & ~high_al,
        "low_ep_high_al": ~high_ep & high_al,
        "high_ep_high_al": high_ep & high_al,
    }
    n = len(values)
    table: dict[str, dict[str, float | int | None]] = {}
    for name in QUADRANTS:
        q = values[masks[name]]
        table[name] = {
            "n": len(q),
            "share": len(q) / n,
            "mean_iou": float(q["iou"].mean()) if len(q) else None,
            "localised": float((q["iou"] >= 0.5).mean()) if len(q) else None,
            "mean_err": float(q["err"].mean()) if len(q) else None,
            "mean_ep": float(q["ep"].mean()) if len(q) else None,
            "mean_al": float(q["al"].mean()) if len(q) else None,
        }

    def rho(a: str, b: str) -> float | None:
        if n < 3 or values[a].nunique() < 2 or values[b].nunique() < 2:
            return None
        return float(stats.spearmanr(values[a], values[b]).statistic)

    return {
        "n_pairs": n,
        "median_ep": ep_med,
        "median_al": al_med,
        "spearman": {
            "ep_al": rho("ep", "al"),
            "ep_err": rho("ep", "err"),
            "al_err": rho("al", "err"),
        },
        "quadrants": table,
    }


def plot_study(values: pd.DataFrame, study: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    sc = ax1.scatter(
        values["ep"], values["al"], c=values["iou"], s=6, cmap="viridis", vmin=0, vmax=1
    )
    ax1.axvline(study["median_ep"], color="grey", lw=0.8)
    ax1.axhline(study["median_al"], color="grey", lw=0.8)
    if (values[["ep", "al"]] > 0).all().all():
        ax1.set_xscale("log")
        ax1.set_yscale("log")
    ax1.set_xlabel("epistemic std (MC dropout, px)")
    ax1.set_ylabel("aleatoric std (px)")
    ax1.set_title(f"ρ(ep, al) = {study['spearman']['ep_al'] or float('nan'):.2f}")
    fig.colorbar(sc, ax=ax1, label="IoU with gt")
    names = list(QUADRANTS)
    errs = [study["quadrants"][q]["mean_err"] or 0.0 for q in names]
    ax2.bar(range(len(names)), errs, color="C1")
    ax2.set_xticks(range(len(names)), [q.replace("_", " ") for q in names], rotation=20)
    ax2.set_ylabel("mean |corner residual| (px)")
    ax2.set_title(
        f"ρ(ep, err) = {study['spearman']['ep_err'] or float('nan'):.2f}, "
        f"ρ(al, err) = {study['spearman']['al_err'] or float('nan'):.2f}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
