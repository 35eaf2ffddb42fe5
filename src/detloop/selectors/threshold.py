"""Cost-sensitive thresholding (ALGORITHMS §7): weights w and per-IoU thresholds δ* so that
removing detections with u = Σ w_i·u_i ≥ δ* removes as many false detections as possible
within a budget on the correct ones (FD@CD(b)) or the other way round (CD@FD(b)).

``CostSensitiveThresholder`` follows the scikit-learn estimator contract: ``fit(rows)`` on the
rows of ``threshold_rows`` returns ``self``; ``transform(predictions)`` gives u per detection;
``result()`` the JSON record of §7.4 (``ThresholdResult``). The weights come from a seeded
Optuna TPE ask/tell loop in which every single uncertainty is enqueued first, so the result is
never worse than the best single one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from detloop.selectors.threshold_data import (
    DEFAULT_IOU_THRS,
    ThresholdResult,
    finite_or_none,
    load_thresholds,
    threshold_rows,
    uncertainty_matrix,
    uncertainty_values,
)
from detloop.selectors.threshold_metrics import (
    BoolArray,
    FloatArray,
    IntArray,
    cd_labels,
    evaluate,
    objective,
    operating_point,
    roc_auc,
    roc_curves,
)
from detloop.selectors.uncertainty_names import ALIASES, UNCERTAINTIES, parse_uncertainties

__all__ = [
    "ALIASES",
    "DEFAULT_IOU_THRS",
    "UNCERTAINTIES",
    "UNITS",
    "CostSensitiveThresholder",
    "ImageReduction",
    "ThresholdResult",
    "load_thresholds",
    "operating_point",
    "optimise_weights",
    "parse_uncertainties",
    "roc_auc",
    "roc_curves",
    "threshold_rows",
    "uncertainty_matrix",
    "uncertainty_values",
]


UNITS = ("detection", "image")


@dataclass(frozen=True)
class ImageReduction:
    """Rows → images as the auto-labeling rule (§8) sees them (``thr_unit: image``).

    An image's u is the largest u of its detections (the rule sends it to review as soon as one
    detection reaches δ̄), and it is correct at τ only when every one of its detections is CD_τ
    (one false detection makes its auto-labels wrong). Images without rows are not in the
    budget: the rule auto-labels them whatever the threshold.
    """

    order: IntArray
    starts: IntArray

    @classmethod
    def of(cls, image_ids: Any) -> ImageReduction:
        ids = np.asarray(image_ids, dtype=object)
        order = np.argsort(ids.astype(str), kind="stable").astype(np.int64)
        s = ids[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0)
        return cls(order, starts.astype(np.int64))

    @property
    def n_images(self) -> int:
        return len(self.starts)

    def u(self, u_rows: FloatArray) -> FloatArray:
        if not len(self.starts):
            return np.zeros(0)
        return np.asarray(np.maximum.reduceat(np.asarray(u_rows)[self.order], self.starts))

    def cd(self, is_cd_rows: BoolArray) -> BoolArray:
        if not len(self.starts):
            return np.zeros((0, np.asarray(is_cd_rows).shape[1]), bool)
        rows = np.asarray(is_cd_rows, dtype=bool)[self.order]
        return np.asarray(np.logical_and.reduceat(rows, self.starts, axis=0))


def _identity(u: FloatArray) -> FloatArray:
    return u


def optimise_weights(
    u: FloatArray, is_cd: Any, b: float, thr_cd: bool, *, seed: int, n_trials: int = 1500,
    patience: int = 300, interp: str = "step",
    reduce: Callable[[FloatArray], FloatArray] = _identity,
) -> tuple[FloatArray, float, int]:  # fmt: skip
    """Minimise f(w) = mean_τ 100·error(reduce(u·w)) over w ∈ [0, 1]^d with seeded Optuna TPE.

    The d one-hot weight vectors are enqueued first (ties keep the earliest trial), so the best
    single uncertainty is always a candidate. Stops after ``n_trials`` or ``patience`` trials
    without a new best. Returns the weights, their objective and the number of trials run.
    ``reduce`` maps per-row u to the unit ``is_cd`` labels (``ImageReduction.u`` for images).
    """
    import optuna

    d = u.shape[1]
    if d == 1:
        return np.ones(1), objective(reduce(u[:, 0]), is_cd, b, thr_cd, interp), 1
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        sampler = optuna.samplers.TPESampler(seed=seed)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for j in range(d):
            study.enqueue_trial({f"w{i}": float(i == j) for i in range(d)})
        dist: dict[str, optuna.distributions.BaseDistribution] = {
            f"w{i}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(d)
        }
        best_w, best_f, since, n = np.zeros(d), np.inf, 0, 0
        while n < n_trials and since < patience:
            trial = study.ask(dist)
            w = np.array([trial.params[f"w{i}"] for i in range(d)])
            f = objective(reduce(u @ w), is_cd, b, thr_cd, interp)
            study.tell(trial, f)
            n += 1
            since += 1
            if f < best_f:
                best_w, best_f, since = w, f, 0
    finally:
        optuna.logging.set_verbosity(verbosity)
    return best_w, float(best_f), n


def _row_class(rows: pd.DataFrame) -> np.ndarray:
    """GT class of matched rows, predicted class of background rows."""
    gt = rows["gt_class"].to_numpy(np.int64)
    return np.where(gt >= 0, gt, rows["class_id"].to_numpy(np.int64))


def _mean_delta(deltas: list[float]) -> float | None:
    return finite_or_none(float(np.mean(deltas))) if deltas else None


class CostSensitiveThresholder:
    """Fits combination weights and per-IoU thresholds δ* on validation rows (§7).

    Args:
        uncertainties: ``ENTALBOX``-style string or registered names.
        iou_thrs: the IoU thresholds τ of CD_τ.
        budget: b = ``thr_fpr_tpr``.
        thr_cd: budget on correct detections (FD@CD) instead of false ones (CD@FD).
        calibrated: read the ``*_cal`` columns.
        seed, n_trials, patience: the optimiser's settings.
        thr_pick, thr_interp: ``last``/``step`` (detloop) or ``closest``/``linear`` (compat).
        per_cls: also fit one weight vector per class (``unit="detection"`` only).
        unit: ``detection`` (§7: the budget counts detections) or ``image`` (detloop extension:
            the budget counts images, each with the largest u of its detections and correct
            only when all of them are, which is what the auto-labeling rule of §8 decides on).
        min_score: with ``unit="image"``, rows at or below it are ignored, as §8 ignores them.
        fd_scope, calib_method_class, calib_method_box: recorded in the result.
    """

    def __init__(
        self,
        uncertainties: str | Sequence[str] = "ENTALBOX",
        iou_thrs: Sequence[float] = DEFAULT_IOU_THRS,
        budget: float = 0.95,
        thr_cd: bool = True,
        calibrated: bool = True,
        seed: int = 0,
        n_trials: int = 1500,
        patience: int = 300,
        thr_pick: str = "last",
        thr_interp: str = "step",
        per_cls: bool = False,
        fd_scope: str = "matched",
        unit: str = "detection",
        min_score: float | None = None,
        calib_method_class: str | None = None,
        calib_method_box: str | None = None,
    ) -> None:
        self.uncertainties = uncertainties
        self.iou_thrs = iou_thrs
        self.budget = budget
        self.thr_cd = thr_cd
        self.calibrated = calibrated
        self.seed = seed
        self.n_trials = n_trials
        self.patience = patience
        self.thr_pick = thr_pick
        self.thr_interp = thr_interp
        self.per_cls = per_cls
        self.fd_scope = fd_scope
        self.unit = unit
        self.min_score = min_score
        self.calib_method_class = calib_method_class
        self.calib_method_box = calib_method_box

    def _eval(self, u: FloatArray, is_cd: Any) -> dict[str, Any]:
        return evaluate(
            u, is_cd, list(self.iou_thrs), self.budget, self.thr_cd, self.thr_pick,
            self.thr_interp,
        )  # fmt: skip

    def _optimise(
        self, u: FloatArray, is_cd: Any, seed: int,
        reduce: Callable[[FloatArray], FloatArray] = _identity,
    ) -> tuple[FloatArray, float, int]:  # fmt: skip
        return optimise_weights(
            u, is_cd, self.budget, self.thr_cd, seed=seed, n_trials=self.n_trials,
            patience=self.patience, interp=self.thr_interp, reduce=reduce,
        )  # fmt: skip

    def _check(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.unit == "image" and self.per_cls:
            raise ValueError("per_cls weights need unit='detection' (an image has many classes)")

    def fit(self, rows: pd.DataFrame) -> CostSensitiveThresholder:
        """Fit on threshold rows (``threshold_rows`` output); returns ``self``."""
        self._check()
        spec = self.uncertainties
        self.names_ = parse_uncertainties(spec if isinstance(spec, str) else list(spec))
        if self.unit == "image" and self.min_score is not None:
            rows = rows[rows["score"].to_numpy(np.float64) > self.min_score]
        u = uncertainty_matrix(rows, self.names_, self.calibrated)
        is_cd = cd_labels(
            rows["iou"].to_numpy(np.float64), rows["tps_class"].to_numpy(bool), list(self.iou_thrs)
        )
        reduce: Callable[[FloatArray], FloatArray] = _identity
        unit_cd = is_cd
        if self.unit == "image":
            images = ImageReduction.of(rows["image_id"].to_numpy())
            reduce, unit_cd = images.u, images.cd(is_cd)
        self.weights_, self.objective_, self.n_trials_ = self._optimise(
            u, unit_cd, self.seed, reduce
        )
        combo = self._eval(reduce(u @ self.weights_), unit_cd)
        self.thresholds_ = [float(p["delta"]) for p in combo["per_iou"]]
        self.report_: dict[str, Any] = {
            "unit": self.unit,
            "single": {n: self._eval(reduce(u[:, i]), unit_cd) for i, n in enumerate(self.names_)},
            "combination": combo,
            # per detection whatever the unit: which classes the combination serves well
            "per_class_table": self._class_table(rows, u @ self.weights_, is_cd),
        }
        self.per_class_ = self._fit_per_class(rows, u, is_cd) if self.per_cls else None
        return self

    def _class_table(self, rows: pd.DataFrame, u: FloatArray, is_cd: Any) -> dict[str, Any]:
        cls = _row_class(rows)
        table: dict[str, Any] = {}
        for c in np.unique(cls):
            m = cls == c
            ev = self._eval(u[m], is_cd[m])
            table[str(int(c))] = {
                "per_iou": [{k: p[k] for k in ("iou_thr", "metric", "auroc", "jsd")}
                            for p in ev["per_iou"]],
                "metric": ev["metric"], "auroc": ev["auroc"], "jsd": ev["jsd"],
            }  # fmt: skip
        return table

    def _fit_per_class(self, rows: pd.DataFrame, u: FloatArray, is_cd: Any) -> dict[str, Any]:
        gt_cls, pred_cls = _row_class(rows), rows["class_id"].to_numpy(np.int64)
        weights: dict[int, FloatArray] = {}
        fix: dict[int, FloatArray] = {}
        for c in np.unique(gt_cls):
            m = gt_cls == c
            w, f, _ = self._optimise(u[m], is_cd[m], self.seed + int(c) + 1)
            weights[int(c)] = w
            f_global = objective(u[m] @ self.weights_, is_cd[m], self.budget, self.thr_cd,
                                 self.thr_interp)  # fmt: skip
            fix[int(c)] = self.weights_ if (f > f_global or f >= 100.0) else w
        variants: dict[str, Any] = {}
        for name, table, cls in (
            ("clsopt", weights, gt_cls), ("clsoptpred", weights, pred_cls),
            ("clsoptfix", fix, pred_cls),
        ):  # fmt: skip
            w_rows = np.stack([table.get(int(c), self.weights_) for c in cls]) if len(cls) else u
            ev = self._eval(np.sum(u * w_rows, axis=1), is_cd)
            deltas = [float(p["delta"]) for p in ev["per_iou"]]
            variants[name] = {
                "thresholds": [finite_or_none(d) for d in deltas],
                "threshold_mean": _mean_delta(deltas),
                "metric": ev["metric"], "auroc": ev["auroc"], "objective": ev["objective"],
            }  # fmt: skip
        return {
            "weights": {str(c): w.tolist() for c, w in weights.items()},
            "fix_weights": {str(c): w.tolist() for c, w in fix.items()},
            "variants": variants,
        }

    def transform(self, predictions: pd.DataFrame) -> FloatArray:
        """u = Σ w_i·u_i of every prediction row."""
        u = uncertainty_matrix(predictions, self.names_, self.calibrated)
        return np.asarray(u @ self.weights_)

    def result(self) -> ThresholdResult:
        """The JSON record of §7.4."""
        return ThresholdResult(
            uncertainties=list(self.names_),
            weights=[float(w) for w in self.weights_],
            thresholds=[finite_or_none(d) for d in self.thresholds_],
            threshold_mean=_mean_delta(self.thresholds_),
            thr_fpr_tpr=float(self.budget),
            thr_cd=bool(self.thr_cd),
            thr_iou_thrs=[float(t) for t in self.iou_thrs],
            fd_scope=self.fd_scope,
            calibrated=bool(self.calibrated),
            calib_method_class=self.calib_method_class,
            calib_method_box=self.calib_method_box,
            optimizer="optuna-tpe",
            seed=int(self.seed),
            n_trials=int(self.n_trials_),
            objective=float(self.objective_),
            metrics=self.report_,
            per_class=self.per_class_,
            unit=self.unit,
        )
