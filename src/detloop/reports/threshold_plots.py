"""Thresholding diagnostics (ALGORITHMS §7.5): ROC curves, heatmaps over the image plane,
top-10 image grids and the spider plot of the removed / remaining groups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from detloop.data.schema import COORDS
from detloop.reports.calibration_plots import _save
from detloop.selectors.threshold_metrics import roc_curves


def roc_plot(
    scores: Mapping[str, np.ndarray], is_fd: np.ndarray, path: Path, budget: float | None = None
) -> Path:
    """ROC (FD positive) of each uncertainty; a vertical line at FPR = 1 − b."""
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot()
    for name, u in scores.items():
        (roc,) = roc_curves(np.asarray(u, float), np.asarray(is_fd, bool))
        ax.step(roc.fpr, roc.tpr, where="post", label=name)
    if budget is not None:
        ax.axvline(1 - budget, color="k", ls=":", lw=1)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="share of correct detections removed", ylabel="share of false detections removed")
    ax.legend(loc="lower right")
    return _save(fig, path)


def box_heatmap(
    boxes: np.ndarray, values: np.ndarray | None, canvas: tuple[int, int]
) -> np.ndarray:
    """[H, W] map: each pixel is the mean value over the boxes covering it (NaN if none);
    with ``values`` None, the number of covering boxes (frequency)."""
    h, w = canvas
    s = np.zeros((h + 1, w + 1))
    c = np.zeros((h + 1, w + 1))
    b = np.clip(np.round(np.asarray(boxes, float)), 0, [w, h, w, h]).astype(int)
    v = np.ones(len(b)) if values is None else np.asarray(values, float)
    ok = np.isfinite(v) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    for (x1, y1, x2, y2), val in zip(b[ok], v[ok], strict=True):
        for arr, add in ((s, val), (c, 1.0)):
            arr[y1, x1] += add
            arr[y1, x2] -= add
            arr[y2, x1] -= add
            arr[y2, x2] += add
    s = s.cumsum(0).cumsum(1)[:h, :w]
    c = c.cumsum(0).cumsum(1)[:h, :w]
    if values is None:
        return c
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0.5, s / c, np.nan)


def heatmaps(maps: Mapping[str, np.ndarray], path: Path, cols: int = 3) -> Path:
    """A grid of heatmaps over the image plane (one per named map)."""
    n = max(1, len(maps))
    cols = min(cols, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    for i, (name, m) in enumerate(maps.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        im = ax.imshow(m, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(name)
        ax.set_axis_off()
    return _save(fig, path)


def image_grid(
    files: Sequence[str], boxes: Sequence[pd.DataFrame], path: Path, title: str = "",
    cols: int = 5,
) -> Path:  # fmt: skip
    """Up to 10 images with their boxes drawn (``boxes[i]`` has x1..y2 and optionally ``u``)."""
    from PIL import Image

    n = max(1, min(len(files), 10))
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(3 * cols, 3 * rows))
    for i, (file, b) in enumerate(zip(files[:10], boxes[:10], strict=False)):
        ax = fig.add_subplot(rows, cols, i + 1)
        with Image.open(file) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
        for r in b[list(COORDS) + (["u"] if "u" in b.columns else [])].itertuples(index=False):
            x1, y1, x2, y2 = (float(v) for v in r[:4])
            ax.add_patch(_rect(x1, y1, x2, y2))
            if len(r) > 4:
                ax.text(x1, y1, f"{float(r[4]):.2f}", color="yellow", fontsize=6)
        ax.set_title(Path(file).stem, fontsize=7)
        ax.set_axis_off()
    fig.suptitle(title)
    return _save(fig, path)


def _rect(x1: float, y1: float, x2: float, y2: float):  # type: ignore[no-untyped-def]
    from matplotlib.patches import Rectangle

    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", lw=1)


def spider_plot(groups: Mapping[str, Mapping[str, float]], path: Path, title: str = "") -> Path:
    """Radar chart: one polygon per group over the same metric axes (values in [0, 100])."""
    names = list(next(iter(groups.values())).keys()) if groups else []
    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False).tolist()
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="polar")
    for label, vals in groups.items():
        v = [float(np.nan_to_num(vals[k])) for k in names]
        ax.plot([*angles, angles[0]], [*v, v[0]], label=label)
        ax.fill([*angles, angles[0]], [*v, v[0]], alpha=0.1)
    ax.set_xticks(angles)
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def group_stats(
    rows: pd.DataFrame, mask: np.ndarray, iou_thrs: Sequence[float]
) -> dict[str, float]:
    """Spider axes of one group: mIoU, class accuracy, % detections, % CD_τ, % FD_τ (mean τ)."""
    g = rows[mask]
    n_all = max(len(rows), 1)
    if len(g) == 0:
        return {"mIoU": 0.0, "class acc.": 0.0, "% det.": 0.0, "% CD": 0.0, "% FD": 0.0}
    iou = g["iou"].to_numpy(float)
    tps = g["tps_class"].to_numpy(bool)
    cd = np.mean([np.mean((iou >= t) & tps) for t in iou_thrs])
    return {
        "mIoU": 100.0 * float(iou.mean()),
        "class acc.": 100.0 * float(tps.mean()),
        "% det.": 100.0 * len(g) / n_all,
        "% CD": 100.0 * float(cd),
        "% FD": 100.0 * float(1 - cd),
    }
