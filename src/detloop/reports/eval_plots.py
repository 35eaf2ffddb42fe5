"""Plots of the extra evaluation curves (ALGORITHMS §4), drawn from a
:func:`~detloop.learners.eval_curves.curves_report` dict (or its JSON file) as PNG files.

matplotlib is imported inside the functions (``Figure`` with the Agg canvas, no pyplot global
state), so importing this module stays cheap and safe in workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def ap_vs_iou_plot(report: Mapping[str, Any], path: Path) -> Path:
    """AP against the IoU threshold (undefined points, AP = −1, are left out)."""
    iou = np.asarray(report["ap_vs_iou"]["iou"], dtype=float)
    ap = np.asarray(report["ap_vs_iou"]["ap"], dtype=float)
    ok = ap >= 0
    fig = _figure(4.5, 3.5)
    ax = fig.add_subplot()
    ax.plot(iou[ok], ap[ok], "o-", ms=3)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="IoU threshold", ylabel="AP", title="AP vs IoU")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confusion_plot(report: Mapping[str, Any], path: Path) -> Path:
    """Heatmap of the confusion matrix with the count in every cell (rows: GT class, columns:
    predicted class; the last row/column is background)."""
    conf = report["confusion"]
    matrix = np.asarray(conf["matrix"], dtype=np.int64)
    labels = [str(x) for x in conf["labels"]]
    n = len(labels)
    side = max(3.5, 0.45 * n + 1.5)
    fig = _figure(side + 0.8, side)
    ax = fig.add_subplot()
    image = ax.imshow(np.log1p(matrix), cmap="Blues")  # log: the diagonal would hide the rest
    high = np.log1p(matrix.max()) / 2 if matrix.size else 0.0
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            color = "white" if np.log1p(count) > high else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set(xlabel="predicted class", ylabel="ground-truth class",
           title=f"IoU ≥ {conf['iou']}, score ≥ {conf['score_thresh']}")  # fmt: skip
    fig.colorbar(image, ax=ax, label="log(1 + count)")
    return _save(fig, path)


def roc_plot(report: Mapping[str, Any], path: Path) -> Path:
    """One-vs-rest ROC curve per class (classes without positives or negatives are skipped)."""
    roc = report["roc"]
    fig = _figure(4.5, 4.5)
    ax = fig.add_subplot()
    for name, curve in roc["per_class"].items():
        if curve["auc"] is not None:
            ax.plot(curve["fpr"], curve["tpr"], lw=1, label=f"{name} ({curve['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    macro = roc["macro_auc"]
    title = "ROC, softmax(logits)" + (f", macro AUC {macro:.3f}" if macro is not None else "")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate",
           title=title)  # fmt: skip
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=6)
    return _save(fig, path)


def write_eval_plots(report: Mapping[str, Any], out_dir: Path, prefix: str = "") -> list[Path]:
    """Write ``<prefix>ap_vs_iou.png``, ``<prefix>confusion.png`` and ``<prefix>roc.png``
    into ``out_dir``; returns their paths."""
    return [
        ap_vs_iou_plot(report, out_dir / f"{prefix}ap_vs_iou.png"),
        confusion_plot(report, out_dir / f"{prefix}confusion.png"),
        roc_plot(report, out_dir / f"{prefix}roc.png"),
    ]
