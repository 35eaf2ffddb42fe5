"""Budget metrics of cost-sensitive thresholding (ALGORITHMS §7.3), numpy/scipy only.

ROC with the false detections (FD) as the positive class and the uncertainty u as the score
(high u = remove). Budgets are compared in counts, never as floats: keeping b of N correct
detections allows floor((1 − b)·N) removals, computed with exact fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numpy.typing import NDArray
from scipy.spatial.distance import jensenshannon
from scipy.stats import norm, rankdata

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class Roc:
    """ROC points, one per distinct threshold (descending), with (0, 0) at δ = +inf first.

    ``cd_removed[i]`` and ``fd_removed[i]`` count rows with u ≥ ``thresholds[i]``.
    """

    thresholds: FloatArray
    cd_removed: IntArray
    fd_removed: IntArray
    n_cd: int
    n_fd: int

    @property
    def fpr(self) -> FloatArray:
        return self.cd_removed / self.n_cd if self.n_cd else np.zeros(len(self.thresholds))

    @property
    def tpr(self) -> FloatArray:
        return self.fd_removed / self.n_fd if self.n_fd else np.ones(len(self.thresholds))


def _sorted_groups(u: FloatArray) -> tuple[IntArray, FloatArray, IntArray]:
    order = np.argsort(-u, kind="stable")
    us = u[order]
    ends = np.flatnonzero(np.r_[us[1:] != us[:-1], True]).astype(np.int64)
    return order.astype(np.int64), us[ends], ends


def roc_curves(u: FloatArray, is_fd: BoolArray) -> list[Roc]:
    """ROC of ``u`` for each column of the [N, T] label matrix ``is_fd`` (one sort for all)."""
    u = np.asarray(u, dtype=np.float64)
    fd = np.asarray(is_fd, dtype=bool).reshape(len(u), -1)
    order, thr, ends = _sorted_groups(u)
    cum_fd = np.cumsum(fd[order], axis=0)[ends]
    cum_all = ends + 1
    thresholds = np.r_[np.inf, thr]
    out = []
    for t in range(fd.shape[1]):
        fd_rm = np.r_[0, cum_fd[:, t]].astype(np.int64)
        cd_rm = np.r_[0, cum_all - cum_fd[:, t]].astype(np.int64)
        n_fd = int(fd[:, t].sum())
        out.append(Roc(thresholds, cd_rm, fd_rm, len(u) - n_fd, n_fd))
    return out


@dataclass(frozen=True)
class OperatingPoint:
    """Result of one budget: the metric (FD@CD or CD@FD, %), the error, and δ*."""

    metric: float
    error: float
    delta: float


def _budget_fraction(b: float) -> Fraction:
    return Fraction(repr(float(b)))


def operating_point(
    roc: Roc, b: float, thr_cd: bool = True, pick: str = "last", interp: str = "step"
) -> OperatingPoint:
    """FD@CD(b) (``thr_cd``) or CD@FD(b) and the threshold δ* of one ROC.

    ``thr_cd``: TPR* = largest TPR with removed CDs ≤ floor((1 − b)·N_CD); δ* = threshold of the
    last point within the budget. Otherwise FPR* = smallest FPR with removed FDs ≥ ceil(b·N_FD),
    δ* = threshold of the first point reaching it. ``interp="linear"`` interpolates the metric
    (compat); ``pick="closest"`` takes the threshold whose 1 − TPR (resp. FPR) is closest to the
    error (compat).
    """
    bf = _budget_fraction(b)
    fpr, tpr = roc.fpr, roc.tpr
    if thr_cd:
        allowed = math.floor((1 - bf) * roc.n_cd)
        idx = int(np.flatnonzero(roc.cd_removed <= allowed)[-1])
        error = 1.0 - float(tpr[idx])
        if interp == "linear":
            error = 1.0 - float(np.interp(float(1 - bf), fpr, tpr))
        if pick == "closest":
            idx = int(np.argmin(np.abs((1.0 - tpr) - error)))
        return OperatingPoint(100.0 * (1.0 - error), error, float(roc.thresholds[idx]))
    needed = math.ceil(bf * roc.n_fd)
    idx = int(np.flatnonzero(roc.fd_removed >= needed)[0])
    error = float(fpr[idx])
    if interp == "linear":
        error = float(np.interp(float(bf), tpr, fpr))
    if pick == "closest":
        idx = int(np.argmin(np.abs(fpr - error)))
    return OperatingPoint(100.0 * (1.0 - error), error, float(roc.thresholds[idx]))


def roc_auc(u: FloatArray, is_fd: BoolArray) -> float:
    """ROC-AUC with FD positive (Mann–Whitney, ties count one half); NaN with one class only."""
    u = np.asarray(u, dtype=np.float64)
    fd = np.asarray(is_fd, dtype=bool)
    n_fd, n_cd = int(fd.sum()), int((~fd).sum())
    if n_fd == 0 or n_cd == 0:
        return float("nan")
    ranks = rankdata(u)
    return float((ranks[fd].sum() - n_fd * (n_fd + 1) / 2) / (n_fd * n_cd))


def jsd(u_cd: FloatArray, u_fd: FloatArray, n_points: int = 1000) -> float:
    """Jensen–Shannon distance between Gaussians fitted to u over CDs and over FDs (§7.3)."""
    if len(u_cd) == 0 or len(u_fd) == 0:
        return float("nan")
    m1, s1 = float(np.mean(u_cd)), float(np.std(u_cd))
    m2, s2 = float(np.mean(u_fd)), float(np.std(u_fd))
    if s1 == 0 and s2 == 0:
        return 0.0 if m1 == m2 else float(np.sqrt(np.log(2)))
    # a (near-)zero std would put its whole mass between two grid points: floor it at the
    # grid spacing so both pdf vectors are non-zero somewhere
    lo, hi = min(m1 - 3 * s1, m2 - 3 * s2), max(m1 + 3 * s1, m2 + 3 * s2)
    floor = (hi - lo) / n_points
    s1, s2 = max(s1, floor), max(s2, floor)
    x = np.linspace(min(m1 - 3 * s1, m2 - 3 * s2), max(m1 + 3 * s1, m2 + 3 * s2), n_points)
    return float(jensenshannon(norm.pdf(x, m1, s1), norm.pdf(x, m2, s2)))


def cd_labels(iou: FloatArray, tps_class: BoolArray, iou_thrs: list[float]) -> BoolArray:
    """[N, T] matrix of CD_τ = (IoU ≥ τ) ∧ tps_class."""
    iou = np.asarray(iou, dtype=np.float64)[:, None]
    return np.asarray((iou >= np.asarray(iou_thrs)[None, :]) & np.asarray(tps_class)[:, None])


def evaluate(
    u: FloatArray, is_cd: BoolArray, iou_thrs: list[float], b: float, thr_cd: bool = True,
    pick: str = "last", interp: str = "step",
) -> dict[str, object]:  # fmt: skip
    """Metric, δ*, AUROC (%) and JSD per IoU threshold and their means."""
    rocs = roc_curves(u, ~is_cd)
    per: list[dict[str, float]] = []
    for t, roc in enumerate(rocs):
        op = operating_point(roc, b, thr_cd, pick, interp)
        fd = ~is_cd[:, t]
        per.append(
            {
                "iou_thr": float(iou_thrs[t]),
                "metric": op.metric,
                "error": op.error,
                "delta": op.delta,
                "auroc": 100.0 * roc_auc(u, fd),
                "jsd": jsd(u[~fd], u[fd]),
                "n_cd": roc.n_cd,
                "n_fd": roc.n_fd,
            }
        )
    mean = {k: float(np.mean([p[k] for p in per])) for k in ("metric", "error", "auroc", "jsd")}
    return {"per_iou": per, **mean, "objective": 100.0 * mean["error"]}


def objective(u: FloatArray, is_cd: BoolArray, b: float, thr_cd: bool, interp: str) -> float:
    """f = mean over τ of 100·error (what the optimiser minimises)."""
    errs = [operating_point(r, b, thr_cd, "last", interp).error for r in roc_curves(u, ~is_cd)]
    return 100.0 * float(np.mean(errs))
