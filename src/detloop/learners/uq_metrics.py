"""Uncertainty-quality metrics (ALGORITHMS §5.1, §5.2, §6.2), numpy/scipy only.

Class scores: ECE, MCE (top-label), SCE (class-wise ECE averaged), Brier, NLL and the reliability
diagram bins (10 uniform bins, quantile bins = ACE). Box stds: regression ECE over centred
intervals, Gaussian NLL, RMSUE, sharpness, coverage, PIT values with their Kolmogorov–Smirnov
distance, and the uncertainty-toolbox metric set (the toolbox is the reference for those).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from detloop.data.schema import COORDS


# ---- classification ------------------------------------------------------------------------
@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin sample count, accuracy and mean confidence of a reliability diagram."""

    edges: np.ndarray
    count: np.ndarray
    acc: np.ndarray
    conf: np.ndarray

    @property
    def gaps(self) -> np.ndarray:
        return np.asarray(np.abs(self.acc - self.conf))

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "edges": self.edges.tolist(),
            "count": self.count.tolist(),
            "acc": np.nan_to_num(self.acc).tolist(),
            "conf": np.nan_to_num(self.conf).tolist(),
        }


def reliability_bins(
    conf: np.ndarray, correct: np.ndarray, n_bins: int = 10, binning: str = "uniform"
) -> ReliabilityBins:
    """Bin confidences (uniform bins on [0, 1], or equal-mass ``quantile`` bins for ACE)."""
    conf = np.asarray(conf, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if binning == "quantile" and conf.size:
        edges = np.quantile(conf, np.linspace(0, 1, n_bins + 1))
        idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    else:
        edges = np.linspace(0, 1, n_bins + 1)
        idx = np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return ReliabilityBins(edges, count, acc, mean_conf)


def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10, binning: str = "uniform") -> float:
    """Expected calibration error Σ_b (n_b/N)·|acc_b − conf_b| (Naeini et al. 2015)."""
    b = reliability_bins(conf, correct, n_bins, binning)
    n = b.count.sum()
    return float(np.nansum(b.count / max(n, 1.0) * b.gaps))


def mce(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10, binning: str = "uniform") -> float:
    """Maximum calibration error max_b |acc_b − conf_b| over non-empty bins."""
    b = reliability_bins(conf, correct, n_bins, binning)
    gaps = b.gaps[b.count > 0]
    return float(gaps.max()) if gaps.size else 0.0


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over all N·C entries of (p − y)²."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean((probs - onehot) ** 2))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """−mean log p_y (probabilities clipped at 1e-15)."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0))))


def class_metrics(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 10, binning: str = "uniform"
) -> dict[str, Any]:
    """ECE, MCE (top-label), SCE, Brier, NLL, per-class ECE and the reliability bins."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    per_class = [
        ece(probs[:, c], labels == c, n_bins, binning) for c in range(probs.shape[1])
    ]  # fmt: skip
    return {
        "n": len(labels),
        "ece": ece(conf, correct, n_bins, binning),
        "mce": mce(conf, correct, n_bins, binning),
        "sce": float(np.mean(per_class)) if per_class else 0.0,
        "brier": brier(probs, labels),
        "nll": nll(probs, labels),
        "accuracy": float(np.mean(correct)) if len(labels) else 0.0,
        "ece_per_class": per_class,
        "reliability": reliability_bins(conf, correct, n_bins, binning).to_dict(),
    }


# ---- regression (box stds) -----------------------------------------------------------------
def _flat(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float64).ravel() for a in arrays]


def regression_ece_curve(
    resid: np.ndarray, sigma: np.ndarray, n_levels: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Expected p and observed share of |r| ≤ σ·|Φ⁻¹((1−p)/2)| (centred intervals)."""
    r, s = _flat(resid, sigma)
    p = np.linspace(0, 1, n_levels)
    z = np.abs(stats.norm.ppf((1 - p) / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sort(np.where(r == 0, 0.0, np.abs(r) / s))
    emp = np.searchsorted(ratio, z, side="right") / max(r.size, 1)
    return p, emp


def regression_ece(resid: np.ndarray, sigma: np.ndarray, n_levels: int = 100) -> float:
    """mean_p |emp(p) − p| ; for [N, 4] inputs, the mean over the 4 coordinates."""
    resid, sigma = np.asarray(resid), np.asarray(sigma)
    if resid.ndim == 2:
        return float(
            np.mean([regression_ece(resid[:, k], sigma[:, k], n_levels) for k in range(4)])
        )
    p, emp = regression_ece_curve(resid, sigma, n_levels)
    return float(np.mean(np.abs(emp - p)))


def gaussian_nll(resid: np.ndarray, sigma: np.ndarray) -> float:
    """−mean log N(r; 0, σ²)."""
    r, s = _flat(resid, sigma)
    return float(-np.mean(stats.norm.logpdf(r, scale=s)))


def rmsue(resid: np.ndarray, sigma: np.ndarray) -> float:
    """sqrt(mean (σ − |r|)²) over non-zero residuals."""
    r, s = _flat(resid, sigma)
    m = r != 0
    return float(np.sqrt(np.mean((s[m] - np.abs(r[m])) ** 2))) if m.any() else 0.0


def sharpness(sigma: np.ndarray) -> float:
    """sqrt(mean σ²)."""
    (s,) = _flat(sigma)
    return float(np.sqrt(np.mean(s**2)))


def coverage(resid: np.ndarray, sigma: np.ndarray) -> float:
    """% of coordinates whose GT lies within prediction ± σ (≈ 68.3 when calibrated)."""
    r, s = _flat(resid, sigma)
    return float(100.0 * np.mean(np.abs(r) <= s))


def object_coverage(resid: np.ndarray, sigma: np.ndarray) -> float:
    """% of objects whose 4 GT coordinates all lie in their ±σ intervals ([N, 4] inputs)."""
    return float(100.0 * np.mean(np.all(np.abs(resid) <= sigma, axis=1)))


def pit(gt: np.ndarray, pred: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Probability integral transform u = Φ((gt − pred)/σ)."""
    g, p, s = _flat(gt, pred, sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(stats.norm.cdf((g - p) / s))


def pit_ks(u: np.ndarray) -> tuple[float, float]:
    """Kolmogorov–Smirnov distance of PIT values to U(0, 1) and its p-value."""
    res = stats.kstest(np.asarray(u).ravel(), "uniform")
    return float(res.statistic), float(res.pvalue)


@contextlib.contextmanager
def _seeded_global_numpy(rng: np.random.Generator) -> Iterator[None]:
    """The toolbox samples from numpy's global RNG: seed it from ``rng``, restore it after."""
    state = np.random.get_state()
    np.random.seed(int(rng.integers(2**31)))
    try:
        yield
    finally:
        np.random.set_state(state)


def toolbox_metrics(
    pred: np.ndarray, sigma: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
    adversarial: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """uncertainty-toolbox's metric set (accuracy, average and adversarial group calibration,
    sharpness, scoring rules), flattened to ``group.metric`` keys."""
    import uncertainty_toolbox as uct

    p, s, g = _flat(pred, sigma, gt)
    s = np.maximum(s, 1e-12)  # the toolbox requires strictly positive stds
    out: dict[str, Any] = {}
    with _seeded_global_numpy(rng), contextlib.redirect_stdout(io.StringIO()):
        groups = {
            "accuracy": uct.get_all_accuracy_metrics(p, g, verbose=False),
            "avg_calibration": uct.get_all_average_calibration(p, s, g, 100, verbose=False),
            "sharpness": uct.get_all_sharpness_metrics(s, verbose=False),
            "scoring_rule": uct.get_all_scoring_rule_metrics(p, s, g, 99, True, verbose=False),
        }
        if adversarial and p.size >= 20:
            adv = uct.get_all_adversarial_group_calibration(p, s, g, 100, verbose=False)
            groups["adv_group_calibration"] = {
                f"{k}.{kk}": np.asarray(vv).tolist() for k, v in adv.items() for kk, vv in v.items()
            }
    for name, metrics in groups.items():
        for key, value in metrics.items():
            out[f"{name}.{key}"] = value if isinstance(value, list) else float(value)
    return out


def box_metrics(pred: np.ndarray, sigma: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """detloop's box-uncertainty metrics of [N, 4] (or flat) arrays, with the PIT KS distance."""
    resid = np.asarray(gt, np.float64) - np.asarray(pred, np.float64)
    sigma = np.asarray(sigma, np.float64)
    ks, ks_p = pit_ks(pit(gt, pred, sigma)) if resid.size else (float("nan"), float("nan"))
    out = {
        "n": int(resid.size),
        "ece": regression_ece(resid, sigma),
        "nll": gaussian_nll(resid, sigma),
        "rmsue": rmsue(resid, sigma),
        "sharpness": sharpness(sigma),
        "coverage": coverage(resid, sigma),
        "pit_ks": ks,
        "pit_ks_pvalue": ks_p,
    }
    if resid.ndim == 2:
        out["object_coverage"] = object_coverage(np.abs(resid), sigma)
    return out


def box_uncertainty_report(
    pred: np.ndarray, sigma: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
    toolbox: bool = True, adversarial: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Pooled and per-coordinate metrics of [N, 4] predicted corners, stds and GT corners.

    Rows with a non-finite std (a head that was absent) or a zero std (NLL and PIT undefined)
    are dropped; ``n_dropped`` counts them.
    """
    ok = np.all(np.isfinite(sigma) & (sigma > 0), axis=1)
    pred, sigma, gt = pred[ok], sigma[ok], gt[ok]
    report: dict[str, Any] = {
        "pooled": box_metrics(pred, sigma, gt),
        "n_objects": int(ok.sum()),
        "n_dropped": int((~ok).sum()),
    }
    for k, c in enumerate(COORDS):
        report[c] = box_metrics(pred[:, k], sigma[:, k], gt[:, k])
    if toolbox and ok.sum() >= 2:
        report["toolbox"] = toolbox_metrics(pred, sigma, gt, rng, adversarial)
        for k, c in enumerate(COORDS):
            report[c]["toolbox"] = toolbox_metrics(pred[:, k], sigma[:, k], gt[:, k], rng, False)
    return report


def runtime_stats(
    times_ms: list[float] | np.ndarray, warmup: int = 5, mode: str = "detloop"
) -> dict[str, float]:
    """Per-image runtime statistics in ms (§6.1).

    ``detloop``: drop the first ``warmup`` entries, then mean, std, median and p95 unfiltered.
    ``reference`` (compat): drop times ≥ 1 s and outliers > Q3 + 50·IQR; mean, std, median.
    """
    t = np.asarray(times_ms, dtype=np.float64)
    if mode == "reference":
        t = t[t < 1000.0]
        if t.size:
            q1, q3 = np.percentile(t, [25, 75])
            t = t[t <= q3 + 50 * (q3 - q1)]
    else:
        t = t[warmup:]
    if t.size == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "median": float("nan")}
    out = {"n": int(t.size), "mean": float(t.mean()), "std": float(t.std()),
           "median": float(np.median(t))}  # fmt: skip
    if mode != "reference":
        out["p95"] = float(np.percentile(t, 95))
    return out
