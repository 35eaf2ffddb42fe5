"""The oracle analysis of PLS (ALGORITHMS §11.7) over one round's pseudo-labels: how well the
image signals S, C, D (and the drate drops, #detections, mean score) tell the images whose
pseudo-labels miss ground truth.

Per pseudo-labeled image (``pls_oracle_table``, ``schema.PLS_ANALYSIS``): drate_0..10 of its
teacher detections with score ≥ 0.1, their mean score, the max/mean/std of the drops between
consecutive drate levels, S, C, D (``pseudo.pls_scores``), its GT, the GT no pseudo-label found
(matched at IoU ≥ 0.5, same class, greedily by descending score: ``ssl_3d.match_pseudo_to_gt``,
§11.8) and the missing-detection rate. ``pls_oracle_report`` gives the ROC AUC of every signal
against "missing rate > {0, 0.25, 0.5, 0.75}" (``ssl_pls.pls_aucs``; below 0.5: the signal is
high on the images with fewer misses, as S and D are meant to be) and the means over images.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data import schema
from detloop.selectors.columns import FloatArray
from detloop.selectors.pseudo import pls_scores
from detloop.selectors.ssl_3d import match_pseudo_to_gt, rows_by_image
from detloop.selectors.ssl_pls import (
    MISSING_LEVELS,
    drate,
    drate_drops,
    missing_rate,
    pls_aucs,
    pls_detections,
)

#: the signals whose AUCs the report gives, in table order
SIGNALS: Final = ("S", "C", "D", "drop_max", "drop_mean", "drop_std", "n_det", "mean_score")


def _count(ids: list[str], table: pa.Table, mask: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``table`` (those of ``mask``) per image of ``ids``."""
    code = pc.fill_null(pc.index_in(table["image_id"], value_set=pa.array(ids, pa.string())), -1)
    c = np.asarray(code.to_numpy(), dtype=np.int64)
    if mask is not None:
        c = c[mask]
    return np.bincount(c[c >= 0], minlength=len(ids))


def pls_oracle_table(
    teacher: pa.Table,
    pseudo: pa.Table,
    gt: pa.Table,
    *,
    tau: float = 0.4,
    beta: float = 0.1,
    iteration: int = 0,
    trained: Collection[str] = (),
) -> pa.Table:
    """One row per image holding a pseudo-label (``schema.PLS_ANALYSIS``, by image_id).

    Args:
        teacher: the round's teacher predictions (rows with score < 0.1 are not counted).
        pseudo: the round's τ-selected pseudo-labels (image_id, class_id, score, x1..y2).
        gt: ground truth of (at least) the pseudo-labeled images.
        tau: δ_S of S_i.
        beta: weight of C_i in D_i.
        iteration: the round, written into the table.
        trained: images whose pseudo-labels the run kept for its student (``trained``).
    """
    teacher = pls_detections(teacher)
    scores = pls_scores(teacher, pseudo, tau=tau, beta=beta)
    ids = [str(i) for i in scores["image_id"].to_pylist()]
    groups = rows_by_image(teacher)
    t_score = np.asarray(teacher["score"].to_numpy(), dtype=np.float64)
    per_image = [t_score[groups.get(i, np.zeros(0, np.int64))] for i in ids]
    drates = drate(per_image)
    drops = drate_drops(drates)
    mean = np.array([s.mean() if len(s) else np.nan for s in per_image])
    match = match_pseudo_to_gt(pseudo, gt, image_ids=ids)
    n_gt = _count(ids, match.gt)
    n_missed = _count(ids, match.gt, ~match.gt_matched)
    n, kept = len(ids), set(trained)
    cols: dict[str, Any] = {
        "image_id": pa.array(ids, pa.string()),
        "iteration": pa.array(np.full(n, iteration, dtype=np.int32)),
        **{c: pa.array(drates[:, k].astype(np.int32)) for k, c in enumerate(schema.DRATE_COLS)},
        "mean_score": pa.array(mean, pa.float64(), mask=np.isnan(mean)),
        **{f"drop_{k}": pa.array(v.astype(np.float64)) for k, v in drops.items()},
        "n_pseudo": pa.array(_count(ids, pseudo).astype(np.int32)),
        "S": scores["S"],
        "C": scores["C"],
        "D": scores["D"],
        "n_gt": pa.array(n_gt.astype(np.int32)),
        "n_missed": pa.array(n_missed.astype(np.int32)),
        "missing_rate": pa.array(missing_rate(n_missed, n_gt)),
        "trained": pa.array([i in kept for i in ids], pa.bool_()),
    }
    table = pa.table(cols).select(schema.PLS_ANALYSIS.column_names)
    return schema.validate_table(table, schema.PLS_ANALYSIS, file="pls analysis")


def signal_values(table: pa.Table) -> dict[str, FloatArray]:
    """Each of ``SIGNALS`` per image (``n_det`` = drate_0; a missing mean score counts 0)."""
    out: dict[str, FloatArray] = {}
    for name in SIGNALS:
        column = "drate_0" if name == "n_det" else name
        values = pc.fill_null(table[column], 0).to_numpy()
        out[name] = np.asarray(values, dtype=np.float64)
    return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def pls_oracle_report(table: pa.Table) -> dict[str, Any]:
    """AUCs of every signal against "missing rate > level" (None where one class is empty),
    the number of positives per level, and totals and means over the images."""
    rate = np.asarray(table["missing_rate"].to_numpy(), dtype=np.float64)
    signals = signal_values(table)
    aucs = pls_aucs(signals, rate, MISSING_LEVELS)
    n = table.num_rows

    def mean(name: str) -> float | None:  # over the images that have a value
        value = pc.mean(table["drate_0" if name == "n_det" else name]).as_py()
        return None if value is None else _finite_or_none(float(value))

    return {
        "images": n,
        "pseudo_labels": int(pc.sum(table["n_pseudo"]).as_py() or 0),
        "gt": int(pc.sum(table["n_gt"]).as_py() or 0),
        "missed_gt": int(pc.sum(table["n_missed"]).as_py() or 0),
        "mean_missing_rate": _finite_or_none(float(rate.mean())) if n else None,
        "positives": {f"{lv:g}": int((rate > lv).sum()) for lv in MISSING_LEVELS},
        "auc": {
            name: {f"{lv:g}": _finite_or_none(v) for lv, v in per_level.items()}
            for name, per_level in aucs.items()
        },
        "mean": {name: mean(name) for name in SIGNALS},
    }
