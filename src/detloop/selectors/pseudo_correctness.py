"""``pcorrect``: the probability that a teacher detection is a right pseudo-label, learned on
validation from the score and the uncertainties together.

The score, the class entropy and the box uncertainties each rank detections; none of them is
the probability that a detection matches an object. Validation has gt, so the labeling model's
validation detections can be labeled right (matched to a gt box of their class at IoU
``ssl.pcorrect_iou``, default 0.5, in descending score order) or wrong — or, with
``pcorrect_iou: coco``, given the fraction of COCO's IoU thresholds 0.5, 0.55, …, 0.95 at which
they are matched (a soft target: how well the box is localised, what mAP@[.5:.95] rewards) —
and a logistic regression on their standardised features learns how much each signal says
beyond the others:

    features   logit(score), entropy, mc_class, log rel(al), log rel(mc), log √(w·h)
    model      P(right | x) = σ(b + w·(x − μ)/s), fitted by Newton's method on
               ½‖w‖² + C·Σ logloss (the intercept b not penalised; equals scikit-learn's
               ``LogisticRegression(C=C)``; a soft target y weighs the logloss of
               right by y and of wrong by 1 − y), μ and s the validation mean and std

and P becomes the selection signal: a pseudo-label is kept when P > τ (or τ fitted for a
precision target), and with ``pseudoscore`` weighs P.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

from detloop.selectors.columns import BoolArray, DetColumns, FloatArray

FEATURES: Final = ("logit_score", "entropy", "mc_class", "log_rel_al", "log_rel_mc", "log_size")
_EPS: Final = 1e-6


def correctness_features(cols: DetColumns) -> FloatArray:
    """The ``FEATURES`` of each detection, (n, 6) float64."""
    score = np.clip(cols.get("score"), _EPS, 1.0 - _EPS)
    w, h = cols.sizes()
    return np.stack(
        [
            np.log(score / (1.0 - score)),
            cols.get("entropy"),
            cols.get("mc_class"),
            np.log(_EPS + cols.box_std("al", relative=True)),
            np.log(_EPS + cols.box_std("mc", relative=True)),
            0.5 * np.log(w * h),
        ],
        axis=1,
    )


@dataclass(frozen=True)
class CorrectnessModel:
    """A fitted ``pcorrect`` model (JSON-able with ``as_dict``/``from_dict``)."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    n_fit: int
    n_right: float  # the targets' sum: the right detections' count, or a soft target's total
    c: float = 1.0

    def predict(self, cols: DetColumns) -> FloatArray:
        """P(right) of each detection of ``cols``."""
        z = (correctness_features(cols) - np.asarray(self.mean)) / np.asarray(self.scale)
        out: FloatArray = _sigmoid(self.intercept + z @ np.asarray(self.coef))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"features": list(FEATURES), **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorrectnessModel:
        if list(data.get("features", [])) != list(FEATURES):
            raise ValueError(f"correctness model: features {data.get('features')!r} != {FEATURES}")
        return cls(
            mean=tuple(float(v) for v in data["mean"]),
            scale=tuple(float(v) for v in data["scale"]),
            coef=tuple(float(v) for v in data["coef"]),
            intercept=float(data["intercept"]),
            n_fit=int(data["n_fit"]),
            n_right=float(data["n_right"]),
            c=float(data.get("c", 1.0)),
        )

    def numbers(self) -> dict[str, float]:
        """The coefficients by feature (on standardised features: comparable), for logs."""
        out = {f"pcorrect_coef_{f}": c for f, c in zip(FEATURES, self.coef, strict=True)}
        return {**out, "pcorrect_intercept": self.intercept, "pcorrect_n_fit": float(self.n_fit)}


def fit_correctness(
    cols: DetColumns, right: BoolArray | FloatArray, c: float = 1.0, max_iter: int = 100
) -> CorrectnessModel:
    """Fit ``pcorrect`` on detections ``cols`` labeled ``right`` (booleans, or soft targets in
    [0, 1]; see the module docstring). With one target value for all (only right or only wrong
    detections) the model is that constant rate (clipped to [1e-6, 1 − 1e-6]): nothing to tell
    them apart by."""
    x = correctness_features(cols)
    y = np.asarray(right, dtype=np.float64)
    if y.size and (y.min() < 0 or y.max() > 1):
        raise ValueError(f"correctness targets must lie in [0, 1], got [{y.min()}, {y.max()}]")
    n, d = x.shape
    mean = x.mean(axis=0) if n else np.zeros(d)
    std = x.std(axis=0) if n else np.ones(d)
    scale = np.where(std > 0, std, 1.0)
    n_right = float(y.sum())
    if n == 0 or np.all(y == y[0]):
        rate = float(np.clip(y[0] if n else 0.5, _EPS, 1.0 - _EPS))
        coef, b = np.zeros(d), float(np.log(rate / (1.0 - rate)))
    else:
        coef, b = _newton((x - mean) / scale, y, c, max_iter)
    return CorrectnessModel(
        mean=tuple(map(float, mean)),
        scale=tuple(map(float, scale)),
        coef=tuple(map(float, coef)),
        intercept=b,
        n_fit=n,
        n_right=n_right,
        c=c,
    )


def _newton(z: FloatArray, y: FloatArray, c: float, max_iter: int) -> tuple[FloatArray, float]:
    """argmin ½‖w‖² + c·Σ logloss(b + z·w, y) by Newton steps (the objective is strictly
    convex: one minimum)."""
    n, d = z.shape
    a = np.hstack([z, np.ones((n, 1))])  # the intercept last, not penalised
    penalty = np.ones(d + 1)
    penalty[-1] = 0.0
    theta = np.zeros(d + 1)
    for _ in range(max_iter):
        p = _sigmoid(a @ theta)
        grad = penalty * theta + c * (a.T @ (p - y))
        hess = np.diag(penalty) + c * (a.T * (p * (1.0 - p))) @ a
        step = np.linalg.solve(hess + 1e-12 * np.eye(d + 1), grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def _sigmoid(x: FloatArray) -> FloatArray:
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for any x
    return out
