"""The ROC plot of ``detloop pls`` (ALGORITHMS §11.7): per missing-rate level, the ROC of S, C
and D against "missing-detection rate > level" over the pseudo-labeled images.

matplotlib is imported inside the function (``Figure`` with the Agg canvas, no pyplot global
state), so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from detloop.selectors.threshold_metrics import roc_auc, roc_curves

#: the curves drawn (the other signals are in the report's AUC table)
CURVES = ("S", "C", "D")


def pls_roc_plot(
    signals: Mapping[str, npt.ArrayLike],
    missing: npt.ArrayLike,
    levels: Sequence[float],
    path: Path,
) -> Path:
    """One panel per level: the ROC of each signal of ``CURVES`` (its value as the score, the
    images with missing rate > level as positives), AUC in the legend. A curve under the
    diagonal (AUC < 0.5) is a signal that is high where fewer GT are missed."""
    from matplotlib.figure import Figure

    rate = np.asarray(missing, dtype=np.float64)
    fig = Figure(figsize=(4.0 * len(levels), 4.0))
    for k, level in enumerate(levels):
        ax = fig.add_subplot(1, len(levels), k + 1)
        positive = rate > level
        for name in CURVES:
            if name not in signals:
                continue
            u = np.asarray(signals[name], dtype=np.float64)
            roc = roc_curves(u, positive)[0]
            auc = roc_auc(u, positive)
            label = f"{name} (AUC {auc:.3f})" if np.isfinite(auc) else f"{name} (AUC n/a)"
            ax.plot(roc.fpr, roc.tpr, label=label)  # linear between points: the AUC's ties
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        n_pos = int(positive.sum())
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="FPR",
            ylabel="TPR",
            title=f"missing rate > {level:g} ({n_pos} of {len(rate)} images)",
        )
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
