"""Calibration and uncertainty-quality plots (ALGORITHMS §5, §6.2), written as PNG files.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot global state), so they
are safe in workers and tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from detloop.learners.uq_metrics import regression_ece_curve


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def reliability_diagram(bins: Mapping[str, Any], path: Path, title: str = "top-label") -> Path:
    """Bar chart of accuracy per confidence bin with the gap to the diagonal
    (``bins`` = ``class_metrics(...)["reliability"]``)."""
    edges = np.asarray(bins["edges"], dtype=float)
    acc, conf = np.asarray(bins["acc"], float), np.asarray(bins["conf"], float)
    count = np.asarray(bins["count"], float)
    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    width = np.diff(edges)
    nonempty = count > 0
    ax.bar(edges[:-1], np.where(nonempty, acc, 0), width, align="edge", edgecolor="k",
           label="accuracy")  # fmt: skip
    ax.bar(edges[:-1], np.where(nonempty, conf - acc, 0), width, bottom=np.where(nonempty, acc, 0),
           align="edge", color="red", alpha=0.3, label="gap")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def reliability_grid(per_class: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """One small reliability diagram per entry (e.g. per class), in a grid."""
    n = max(1, len(per_class))
    cols = min(n, 5)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(2.6 * cols, 2.6 * rows))
    for i, (name, bins) in enumerate(per_class.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        edges = np.asarray(bins["edges"], float)
        ax.bar(edges[:-1], np.asarray(bins["acc"], float), np.diff(edges), align="edge",
               edgecolor="k")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=str(name))
    return _save(fig, path)


def regression_calibration_curve(
    resid: np.ndarray, sigmas: Mapping[str, np.ndarray], path: Path, title: str = ""
) -> Path:
    """Expected vs observed share of residuals inside centred intervals, one curve per σ."""
    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    for label, sigma in sigmas.items():
        p, emp = regression_ece_curve(resid, sigma)
        ax.plot(p, emp, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="expected confidence", ylabel="observed confidence", title=title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def sigma_vs_residual(
    sigma: np.ndarray, resid: np.ndarray, path: Path,
    curve: tuple[np.ndarray, np.ndarray] | None = None, title: str = "",
) -> Path:  # fmt: skip
    """Scatter of predicted σ vs |residual|, with the fitted isotonic curve when given."""
    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    ax.scatter(np.ravel(sigma), np.abs(np.ravel(resid)), s=3, alpha=0.4, label="pairs")
    if curve is not None:
        ax.plot(curve[0], curve[1], "r-", lw=2, label="isotonic fit")
    hi = float(np.nanmax(np.ravel(sigma))) if np.size(sigma) else 1.0
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    ax.set(xlabel="predicted std", ylabel="|residual|", title=title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def intervals(
    pred: np.ndarray, sigma: np.ndarray, gt: np.ndarray, path: Path, rng: np.random.Generator,
    n: int = 100, title: str = "",
) -> Path:  # fmt: skip
    """±σ intervals of ``n`` random samples, ordered by GT (toolbox-style ordered intervals)."""
    pred, sigma, gt = (np.ravel(a) for a in (pred, sigma, gt))
    idx = rng.choice(pred.size, size=min(n, pred.size), replace=False)
    idx = idx[np.argsort(gt[idx])]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    x = np.arange(idx.size)
    ax.errorbar(x, pred[idx], yerr=sigma[idx], fmt="o", ms=2, alpha=0.6, label="pred ± σ")
    ax.plot(x, gt[idx], "r.", ms=3, label="ground truth")
    ax.set(xlabel="sample (ordered by GT)", ylabel="coordinate (px)", title=title)
    ax.legend(loc="upper left")
    return _save(fig, path)


def pit_plot(u_by_label: Mapping[str, np.ndarray], path: Path, title: str = "PIT") -> Path:
    """Empirical CDF of PIT values vs the diagonal, and their histogram."""
    fig = Figure(figsize=(8, 3.5))
    ax, hx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, u in u_by_label.items():
        s = np.sort(np.ravel(u))
        ax.plot(s, np.arange(1, s.size + 1) / max(s.size, 1), label=label)
        hx.hist(s, bins=20, range=(0, 1), alpha=0.5, density=True, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="u", ylabel="empirical CDF", title=title)
    hx.axhline(1.0, color="k", ls="--", lw=1)
    hx.set(xlabel="u", title="PIT histogram")
    ax.legend(loc="upper left")
    return _save(fig, path)


def toolbox_panel(
    pred: np.ndarray, sigma: np.ndarray, gt: np.ndarray, path: Path, rng: np.random.Generator,
    n: int = 100,
) -> Path:  # fmt: skip
    """uncertainty-toolbox's intervals, ordered intervals, calibration and sharpness plots."""
    import uncertainty_toolbox as uct

    p, s, g = (np.ravel(a).astype(float) for a in (pred, sigma, gt))
    s = np.maximum(s, 1e-12)
    idx = rng.choice(p.size, size=min(n, p.size), replace=False)
    fig = Figure(figsize=(16, 4))
    axes = [fig.add_subplot(1, 4, i + 1) for i in range(4)]
    uct.plot_intervals(p[idx], s[idx], g[idx], ax=axes[0])
    uct.plot_intervals_ordered(p[idx], s[idx], g[idx], ax=axes[1])
    uct.plot_calibration(p, s, g, ax=axes[2])
    uct.plot_sharpness(s, ax=axes[3])
    return _save(fig, path)
