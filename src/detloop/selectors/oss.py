"""Object-based set similarity (OSS) between a candidate set P and a reference set Q (§10).

Pure math on feature clouds: per-object features of GT crops (``crop_features``), the 1-NN
KL estimator (Pérez-Cruz 2008), the per-class JSD through KDE resampling, class weights, and
the two combinations (``paper``, the default, and the reference code's ``reference``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from scipy import fft, stats
from scipy.spatial import cKDTree

from detloop.selectors.columns import FloatArray

Formula = Literal["paper", "reference"]

MIN_POINTS: Final = 5
MIN_CROP_SIDE: Final = 2
N_RESAMPLE: Final = 10_000
BALANCE_CV: Final = 1.3


def crop_features(
    image: npt.NDArray[np.generic], boxes: FloatArray
) -> tuple[FloatArray, np.ndarray]:
    """Features of the GT crops of one RGB image: aspect ratio, DCT mean, histogram mean.

    Args:
        image: H×W×3 array.
        boxes: n×4 ``x1, y1, x2, y2`` in pixels.

    Returns:
        (features m×3 for the crops with min side > 2 px, boolean mask over ``boxes``).
        The histogram feature is the mean of the 8×8×8 RGB histogram, i.e. #pixels/512.
    """
    h_img, w_img = image.shape[:2]
    feats = []
    ok = np.zeros(len(boxes), dtype=bool)
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=np.float64)):
        c0, r0 = max(0, math.floor(x1)), max(0, math.floor(y1))
        c1, r1 = min(w_img, math.ceil(x2)), min(h_img, math.ceil(y2))
        if min(c1 - c0, r1 - r0) <= MIN_CROP_SIDE:
            continue
        crop = np.asarray(image[r0:r1, c0:c1, :3], dtype=np.float64)
        dct_mean = float(fft.dctn(crop, type=2, norm="ortho", axes=(0, 1)).mean())
        hist_mean = crop.shape[0] * crop.shape[1] / 512.0
        feats.append(((x2 - x1) / (y2 - y1), dct_mean, hist_mean))
        ok[k] = True
    return np.asarray(feats, dtype=np.float64).reshape(-1, 3), ok


def kl_1nn(p: FloatArray, m: FloatArray) -> float:
    """KL(P‖M) by the 1-nearest-neighbour estimator (Pérez-Cruz 2008).

    (d/n)·Σ_i log(ν_M(x_i)/ρ_P(x_i)) + log(m/(n − 1)), ρ_P the distance to the nearest other
    point of P, ν_M to the nearest point of M.
    """
    n, d = p.shape
    rho = cKDTree(p).query(p, k=2)[0][:, 1]
    nu = cKDTree(m).query(p, k=1)[0]
    tiny = np.finfo(np.float64).tiny
    ratio = np.log(np.maximum(nu, tiny)) - np.log(np.maximum(rho, tiny))
    return float(d / n * ratio.sum() + math.log(len(m) / (n - 1)))


def _finite_log(x: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        lx = np.log(x)
    out: FloatArray = lx[np.all(np.isfinite(lx), axis=1)]
    return out


def class_jsd(
    p: FloatArray, q: FloatArray, rng: np.random.Generator, n_resample: int = N_RESAMPLE
) -> float | None:
    """JSD of two feature clouds via KDE resampling and the 1-NN KL estimator (§10).

    Returns None (class skipped) with fewer than ``MIN_POINTS`` finite points in either set or
    a degenerate (singular) cloud.
    """
    lp, lq = _finite_log(p), _finite_log(q)
    if len(lp) < MIN_POINTS or len(lq) < MIN_POINTS:
        return None
    try:
        p_hat = stats.gaussian_kde(lp.T).resample(n_resample, seed=rng)
        q_hat = stats.gaussian_kde(lq.T).resample(n_resample, seed=rng)
        m_hat = stats.gaussian_kde(np.hstack((p_hat, q_hat))).resample(n_resample, seed=rng)
    except np.linalg.LinAlgError:
        return None
    ep, eq, em = np.exp(p_hat.T), np.exp(q_hat.T), np.exp(m_hat.T)
    return 0.5 * (kl_1nn(ep, em) + kl_1nn(eq, em))


def class_weights(shares: FloatArray) -> FloatArray:
    """Class weights from class shares (rows: candidate sets, columns: classes).

    f_j = mean share; w_j = 1/f_j. If std(w)/mean(w), rounded to 0.1, exceeds 1.3, classes
    below the 25th percentile of f get weight 0 (and the rest 1/f_j); otherwise all weights 1.
    """
    f = np.asarray(shares, dtype=np.float64).reshape(-1, np.shape(shares)[-1]).mean(axis=0)
    w = np.divide(1.0, f, out=np.zeros_like(f), where=f > 0)
    cv = round(float(w.std() / w.mean()), 1) if w.mean() > 0 else 0.0
    if cv > BALANCE_CV:
        return np.where(f < np.percentile(f, 25), 0.0, w)
    return np.ones_like(f)


def oss_paper(jsd: FloatArray, r: FloatArray, w: FloatArray) -> float:
    """s(P‖Q) = [(1/c)·Σ_j w_j·(JSD_j + r_j)]⁻¹ over the c evaluated (finite) classes."""
    jsd, r, w = (np.asarray(a, dtype=np.float64) for a in (jsd, r, w))
    ok = np.isfinite(jsd) & np.isfinite(r)
    if not ok.any():
        return math.nan
    total = float(np.sum(w[ok] * (jsd[ok] + r[ok])) / ok.sum())
    return 1.0 / total if total != 0 else math.inf


def reference_beta(total_p: int, totals: Sequence[int]) -> int:
    """β = max(1, ⌊N(P)/P25(N)⌋) over the candidate sets' object totals."""
    p25 = float(np.percentile(np.asarray(totals, dtype=np.float64), 25))
    return max(1, math.floor(total_p / p25)) if p25 > 0 else 1


def oss_reference(jsd: FloatArray, r: FloatArray, w: FloatArray, beta: int) -> float:
    """The reference code's variant: OSS = Σ_j (w_j/D_j) / Σ_j w_j, NaN-safe.

    D_j = JSD_j + 0.25·(r_j·β) + 0.5 with r_j = n_j(Q)/n_j(P).
    """
    jsd, r, w = (np.asarray(a, dtype=np.float64) for a in (jsd, r, w))
    d = jsd + 0.25 * (r * beta) + 0.5
    ok = np.isfinite(d)
    denom = float(np.sum(w[ok]))
    return float(np.nansum(w[ok] / d[ok]) / denom) if denom > 0 else math.nan


@dataclass(frozen=True)
class ClassResult:
    """One class of one candidate set."""

    cls: str
    jsd: float
    r: float
    weight: float
    n_p: int
    n_q: int
    similarity: float  # the class's own term: 1/(JSD + r) (paper) or 1/D_j (reference)


def set_similarity(
    p: Mapping[str, FloatArray],
    q: Mapping[str, FloatArray],
    weights: Mapping[str, float],
    formula: Formula,
    rng: np.random.Generator,
    beta: int = 1,
    n_resample: int = N_RESAMPLE,
) -> tuple[float, list[ClassResult]]:
    """Overall OSS of candidate set ``p`` against reference ``q`` and its per-class terms.

    Classes skipped by ``class_jsd`` get JSD NaN and weight 0 (listed in the result).
    """
    rows: list[ClassResult] = []
    for cls in sorted(weights):
        fp = p.get(cls, np.zeros((0, 3)))
        fq = q.get(cls, np.zeros((0, 3)))
        jsd = class_jsd(fp, fq, rng, n_resample)
        n_p, n_q = len(fp), len(fq)
        if formula == "paper":
            r = n_p / n_q if n_q else math.nan
        else:
            r = n_q / n_p if n_p else math.nan
        w = weights[cls] if jsd is not None else 0.0
        j = math.nan if jsd is None else jsd
        denom = j + r if formula == "paper" else j + 0.25 * r * beta + 0.5
        sim = 1.0 / denom if denom and math.isfinite(denom) else math.nan
        rows.append(ClassResult(cls, j, r, w, n_p, n_q, sim))
    jsd_a = np.array([c.jsd for c in rows])
    r_a = np.array([c.r for c in rows])
    w_a = np.array([c.weight for c in rows])
    if formula == "paper":
        return oss_paper(jsd_a, r_a, w_a), rows
    return oss_reference(jsd_a, r_a, w_a, beta), rows


def correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson r and Kendall τ (scipy) of two paired sequences, NaN pairs dropped."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(xa) & np.isfinite(ya)
    if ok.sum() < 2 or np.ptp(xa[ok]) == 0 or np.ptp(ya[ok]) == 0:  # undefined
        return {"pearson_r": math.nan, "kendall_tau": math.nan, "n": int(ok.sum())}
    pr = stats.pearsonr(xa[ok], ya[ok])
    kt = stats.kendalltau(xa[ok], ya[ok])
    return {
        "pearson_r": float(pr.statistic),
        "pearson_p": float(pr.pvalue),
        "kendall_tau": float(kt.statistic),
        "kendall_p": float(kt.pvalue),
        "n": int(ok.sum()),
    }
