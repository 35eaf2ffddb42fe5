"""PLS — pseudo-label selection (ALGORITHMS §11.7) on numpy arrays, and its oracle analysis.

Per pseudo-labeled image i, from its teacher detections with score ≥ 0.1::

    drate_k(i) = #detections with score ≥ k/10,  k = 0 … 10
    S_i(δ_S)   = drate_{10·δ_S}(i) / drate_0(i)
    C_i        = mean over its pseudo-labels of (1 − share of their class among all pseudo-labels)
    D_i        = (1 − β)·S_i + β·C_i

``pls_keep`` keeps the ceil(top_k·N) highest D (decision 8; ``pls_select`` does the ranking,
``pseudo.pls_scores`` builds S, C, D from the tables with these functions). The analysis side:
``roc_auc`` (the rank formula of §7's thresholding, re-exported), ``drate_drops``, and
``pls_aucs`` against missing-detection rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from detloop import seeding
from detloop.selectors.columns import FloatArray, IntArray
from detloop.selectors.threshold_metrics import roc_auc

__all__ = [
    "drate",
    "drate_drops",
    "missing_rate",
    "pls_aucs",
    "pls_d",
    "pls_keep",
    "rarity",
    "roc_auc",
    "survival_share",
]

LEVELS: Final = 11  # k = 0 … 10
MISSING_LEVELS: Final = (0.0, 0.25, 0.5, 0.75)


#: §11.7: PLS counts the teacher detections with score ≥ 0.1 (as float32 stores it)
PLS_MIN_SCORE: Final = float(np.float32(0.1))


def pls_detections(predictions: pa.Table) -> pa.Table:
    """The teacher detections PLS counts (drate, S_i): score ≥ ``PLS_MIN_SCORE``."""
    return predictions.filter(pc.greater_equal(predictions["score"], PLS_MIN_SCORE))


def drate(scores_per_image: Sequence[npt.ArrayLike]) -> IntArray:
    """[n_images, 11] counts: drate_k(i) = #detections of image i with score ≥ k/10.

    Compared in float32, the precision of the predictions' ``score`` column, so a score stored
    as 0.4 counts at level 4 whether it arrives as float32 or float64.
    """
    levels = (np.arange(LEVELS) / 10).astype(np.float32)
    out = np.zeros((len(scores_per_image), LEVELS), dtype=np.int64)
    for i, scores in enumerate(scores_per_image):
        s = np.asarray(scores, dtype=np.float32).reshape(-1)
        out[i] = (s[:, None] >= levels[None, :]).sum(axis=0)
    return out


def _level(tau: float) -> int:
    k = round(10 * tau)
    if not 0 <= k < LEVELS or abs(10 * tau - k) > 1e-9:
        raise ValueError(f"PLS: δ_S must be one of 0, 0.1, …, 1.0, not {tau}")
    return k


def survival_share(drates: npt.ArrayLike, tau: float = 0.4) -> FloatArray:
    """S_i(δ_S) = drate_{10·δ_S} / drate_0 (0 for an image without detections)."""
    d = np.asarray(drates, dtype=np.float64).reshape(-1, LEVELS)
    total = d[:, 0]
    return np.divide(d[:, _level(tau)], total, out=np.zeros(len(d)), where=total > 0)


def rarity(pseudo_image: npt.ArrayLike, pseudo_class: npt.ArrayLike, n_images: int) -> FloatArray:
    """C_i: mean over image i's pseudo-labels of (1 − share of its class among all
    pseudo-labels); ``pseudo_image`` indexes images 0 … n_images − 1 (0 for an image
    without pseudo-labels)."""
    img = np.asarray(pseudo_image, dtype=np.int64).reshape(-1)
    cls = np.asarray(pseudo_class, dtype=np.int64).reshape(-1)
    if len(img) == 0:
        return np.zeros(n_images)
    share = np.bincount(cls) / len(cls)
    total = np.bincount(img, weights=1.0 - share[cls], minlength=n_images)
    count = np.bincount(img, minlength=n_images)
    return np.divide(total, count, out=np.zeros(n_images), where=count > 0)


def pls_d(s: npt.ArrayLike, c: npt.ArrayLike, beta: float = 0.1) -> FloatArray:
    """D_i = (1 − β)·S_i + β·C_i."""
    return (1.0 - beta) * np.asarray(s, np.float64) + beta * np.asarray(c, np.float64)


def pls_select(
    scores: pa.Table,
    top_k: float = 0.4,
    variant: Literal["top", "bot", "rand"] = "top",
    rng: np.random.Generator | None = None,
) -> list[str]:
    """Image ids kept by PLS: the ceil(top_k·N) highest D (ties by image_id), the rest
    (``bot``), or a seeded random set of the top's size (``rand``)."""
    ids = np.asarray(scores["image_id"].to_numpy(zero_copy_only=False), dtype=object)
    d = np.asarray(scores["D"].to_numpy(), dtype=np.float64)
    n_keep = math.ceil(Fraction(repr(float(top_k))) * len(ids))
    order = np.lexsort((ids.astype(str), -d))
    if variant == "top":
        chosen = order[:n_keep]
    elif variant == "bot":
        chosen = order[n_keep:]
    elif variant == "rand":
        if rng is None:
            raise ValueError("PLS 'rand' needs a generator")
        chosen = rng.choice(len(ids), size=n_keep, replace=False)
    else:
        raise ValueError(f"PLS variant must be top, bot or rand, not {variant!r}")
    return sorted(str(x) for x in ids[chosen])


def pls_keep(
    image_ids: Sequence[str],
    d: FloatArray | Sequence[float],
    top_k: float = 0.4,
    variant: Literal["top", "bot", "rand"] = "top",
    seed: int = 0,
) -> list[str]:
    """Image ids kept by PLS (decision 8): the n_keep = ceil(top_k·N) highest D (ties by
    image_id), the rest (``bot``) or a random set of n_keep images (``rand``, from
    ``seeding.rng(seed, None, "pls_rand")``); sorted by image_id."""
    table = pa.table(
        {"image_id": pa.array(list(image_ids), pa.string()), "D": np.asarray(d, np.float64)}
    )
    rng = seeding.rng(seed, None, "pls_rand") if variant == "rand" else None
    return pls_select(table, top_k, variant, rng)


# ---- oracle analysis ---------------------------------------------------------------------


def drate_drops(drates: npt.ArrayLike) -> dict[str, FloatArray]:
    """Per image the max, mean and (population) std of the 10 drops drate_k − drate_{k+1}."""
    d = np.asarray(drates, dtype=np.float64).reshape(-1, LEVELS)
    drops = d[:, :-1] - d[:, 1:]
    return {"max": drops.max(axis=1), "mean": drops.mean(axis=1), "std": drops.std(axis=1)}


def missing_rate(n_missed: npt.ArrayLike, n_gt: npt.ArrayLike) -> FloatArray:
    """Missed GT / GT per image (0 for an image without GT)."""
    missed = np.asarray(n_missed, dtype=np.float64)
    gt = np.asarray(n_gt, dtype=np.float64)
    return np.divide(missed, gt, out=np.zeros(len(gt)), where=gt > 0)


def pls_aucs(
    signals: Mapping[str, npt.ArrayLike],
    missing: npt.ArrayLike,
    levels: Sequence[float] = MISSING_LEVELS,
) -> dict[str, dict[float, float]]:
    """AUC of each signal (S, C, D, …) against "missing-detection rate > level" per level.

    A value below 0.5 means the signal is high on the images with fewer misses (as S and D
    are meant to be)."""
    rate = np.asarray(missing, dtype=np.float64)
    return {
        name: {float(lv): roc_auc(np.asarray(values, np.float64), rate > lv) for lv in levels}
        for name, values in signals.items()
    }
