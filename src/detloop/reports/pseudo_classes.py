"""A round's pseudo-labels per class (``RunDir.pseudo_classes_file``): the numbers logged to
MLflow and the bar plot beside them — which classes the selection fed the student, against how
many labeled boxes of each it had, and (simulated runs) how many of them were right.

matplotlib is imported inside the function (``Figure`` with the Agg canvas, no pyplot global
state), so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def class_numbers(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``pseudo_boxes/<class>`` for every class, ``pseudo_precision/<class>`` and
    ``pseudo_recall/<class>`` where the hidden gt defines them."""
    out: dict[str, float] = {}
    for row in rows:
        name = row["name"]
        out[f"pseudo_boxes/{name}"] = float(row["pseudo"])
        for key in ("precision", "recall"):
            if row.get(key) is not None:
                out[f"pseudo_{key}/{name}"] = float(row[key])
    return out


def pseudo_class_plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Per class (rarest labeled class last): labeled boxes beside the pseudo-labels, these
    split into right and wrong at IoU 0.5 when the rows hold the hidden gt's matches (their
    precision above the bar), on a log scale — rare classes' counts are tens where common ones'
    are thousands."""
    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: (-int(r["labeled"]), int(r["class_id"])))
    x = np.arange(len(rows))
    labeled = np.array([r["labeled"] for r in rows], dtype=np.float64)
    pseudo = np.array([r["pseudo"] for r in rows], dtype=np.float64)
    scored = bool(rows) and all("matched" in r for r in rows)
    fig = Figure(figsize=(max(5.0, 0.45 * len(rows) + 2.0), 3.8))
    ax = fig.add_subplot(1, 1, 1)
    w = 0.4
    ax.bar(x - w / 2, labeled, w, color="0.6", label="labeled boxes")
    if scored:
        right = np.array([r["matched"] for r in rows], dtype=np.float64)
        ax.bar(x + w / 2, right, w, color="tab:green", label="pseudo-labels, right")
        ax.bar(x + w / 2, pseudo - right, w, bottom=right, color="tab:red",
               label="pseudo-labels, wrong")  # fmt: skip
        for i, r in enumerate(rows):
            if r.get("precision") is not None:
                ax.annotate(f"{r['precision']:.2f}", (x[i] + w / 2, max(pseudo[i], 1.0)),
                            ha="center", va="bottom", fontsize=7)  # fmt: skip
    else:
        ax.bar(x + w / 2, pseudo, w, color="tab:blue", label="pseudo-labels")
    if (np.r_[labeled, pseudo] > 0).any():
        ax.set_yscale("log")
    ax.set_xticks(x, [str(r["name"]) for r in rows], rotation=90 if len(rows) > 12 else 0)
    ax.set(ylabel="boxes", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
