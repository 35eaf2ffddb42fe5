"""OSS reliability mode (ALGORITHMS §10, analysis 2; ``detloop oss CONFIG --mode reliability``):
which small evaluation subsets rank models as the reference set does, and does OSS find them?

Models are the AL models of an experiment (each run's models at the chosen iterations whose
validation predictions were stored). Their reference ranking is by test mAP@[.5:.95]
(``test_map`` of each iteration's metrics) — by full-validation mAP when the runs have no test
split, and then the question is how well a small subset stands in for the whole validation
set. A subset's OSS is undefined (NaN) when every class has fewer than 5 objects in it (§10
skips those classes): subsets need enough objects per class for the measure to say anything.
For each of ``seeds`` × ``subsets`` random subsets of the validation images (``fraction`` of
them), every model is scored on the subset from its stored predictions (COCO mAP, nothing is
re-predicted), and Kendall τ compares the subset's ranking with the reference one; the subset's
OSS is computed against the reference images (test, else validation) by the formulas of §10. The
summary correlates subset OSS with τ, and compares the original validation set's τ with the τ
of each seed's highest-OSS subset ("Top-s") and with the subsets' mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_json, read_table
from detloop.data.rundir import RunDir
from detloop.orchestrator.evaluation.oss import feature_bank, weights_and_totals
from detloop.selectors.oss import Formula, correlations, reference_beta, set_similarity


@dataclass(frozen=True)
class Model:
    """One AL model: its id (``<run>/iter<i>``), stored validation predictions, reference mAP."""

    model_id: str
    predictions: pa.Table
    reference_map: float


def models_of(runs: Sequence[RunDir], iterations: Sequence[int]) -> tuple[list[Model], str]:
    """The models with stored validation predictions, and what ranks them (``test`` or ``val``).

    Raises:
        DataError: fewer than 3 models (a ranking of 2 says little).
    """
    found: list[tuple[str, pa.Table, dict[str, Any]]] = []
    for run in runs:
        for it in iterations:
            preds, metrics = run.val_predictions_file(it), run.metrics_file(it)
            if preds.exists() and metrics.exists():
                found.append((f"{run.name}/iter{it}", read_table(schema.PREDICTIONS, preds),
                              read_json(metrics)))  # fmt: skip
    if len(found) < 3:
        raise DataError("runs", None, None, f"{len(found)} models with validation predictions; "
                        "the reliability mode ranks at least 3")  # fmt: skip
    key = "test_map" if all("test_map" in m for _, _, m in found) else "map"
    models = [Model(mid, p, float(m[key])) for mid, p, m in found]
    return models, "test" if key == "test_map" else "val"


def subset_maps(
    models: Sequence[Model], ids: Sequence[str], images: pa.Table, gt: pa.Table, cats: pa.Table
) -> list[float]:
    """COCO mAP@[.5:.95] of each model on the validation images ``ids``."""
    from detloop.learners.evaluate import coco_map

    keep = pa.array(list(ids), pa.string())
    sub_images = images.filter(pc.is_in(images["image_id"], value_set=keep))
    sub_gt = gt.filter(pc.is_in(gt["image_id"], value_set=keep))
    out = []
    for m in models:
        preds = m.predictions.filter(pc.is_in(m.predictions["image_id"], value_set=keep))
        out.append(float(coco_map(preds, sub_gt, sub_images, cats)["map"]))
    return out


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall τ-b of two score lists (NaN when either is constant)."""
    if np.ptp(np.asarray(a, float)) == 0 or np.ptp(np.asarray(b, float)) == 0:
        return math.nan
    return float(stats.kendalltau(a, b).statistic)


def draw_subsets(
    ids: Sequence[str], seeds: int, subsets: int, fraction: float
) -> list[tuple[int, int, list[str]]]:
    """(seed, subset, sorted ids): ``round(fraction·n)`` of ``ids`` each, seeded by (seed, k)."""
    size = max(1, round(fraction * len(ids)))
    return [
        (
            seed,
            k,
            sorted(
                str(x) for x in np.random.default_rng([seed, k]).choice(ids, size, replace=False)
            ),
        )
        for seed in range(seeds)
        for k in range(subsets)
    ]


def subset_oss(
    run: RunDir, draws: Sequence[tuple[int, int, list[str]]], reference_ids: Sequence[str],
    formula: Formula, rng: np.random.Generator, n_resample: int,
) -> list[float]:  # fmt: skip
    """OSS of each drawn subset against the reference images (§10's weights over the subsets)."""
    bank = feature_bank(run)
    cats = run.read_categories()
    names = dict(zip(cats["class_id"].to_pylist(), cats["name"].to_pylist(), strict=True))
    ref_cloud = bank.by_class(reference_ids, names)
    clouds = {f"{s}/{k}": bank.by_class(ids, names) for s, k, ids in draws}
    classes = sorted({*ref_cloud, *(c for cl in clouds.values() for c in cl)})
    weights, totals = weights_and_totals(clouds, classes)
    out = []
    for cloud, total in zip(clouds.values(), totals, strict=True):
        beta = reference_beta(int(total), totals.astype(int).tolist())
        out.append(set_similarity(cloud, ref_cloud, weights, formula, rng, beta, n_resample)[0])
    return out


def run_reliability(
    runs: Sequence[RunDir], iterations: Sequence[int], *, seeds: int, subsets: int,
    fraction: float, formula: Formula, rng: np.random.Generator, n_resample: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """One row per subset (seed, subset, images, OSS, τ) and the summary."""
    if not 0 < fraction <= 1:
        raise DataError("fraction", None, None, f"must be in (0, 1], got {fraction}")
    models, ranked_by = models_of(runs, iterations)
    run = runs[0]
    images, gt, cats = run.read_images(), run.read_gt(), run.read_categories()
    val = images.filter(pc.equal(images["split"], "val"))
    ref_ids = pc.filter(images["image_id"], pc.equal(images["split"], ranked_by)).to_pylist()
    reference = [m.reference_map for m in models]
    val_ids = sorted(val["image_id"].to_pylist())
    draws = draw_subsets(val_ids, seeds, subsets, fraction)
    osses = subset_oss(run, draws, [str(x) for x in ref_ids], formula, rng, n_resample)
    rows: list[dict[str, Any]] = []
    for (seed, k, ids), oss in zip(draws, osses, strict=True):
        maps = subset_maps(models, ids, val, gt, cats)
        rows.append({"seed": seed, "subset": k, "n_images": len(ids), "oss": oss,
                     "tau": kendall(maps, reference), "maps": maps})  # fmt: skip
    full_tau = kendall(subset_maps(models, val_ids, val, gt, cats), reference)
    top = [top_subset([r for r in rows if r["seed"] == s]) for s in range(seeds)]
    taus = [r["tau"] for r in rows]
    summary = {
        "models": [m.model_id for m in models],
        "ranked_by": f"{ranked_by} mAP@[.5:.95]",
        "reference_maps": reference,
        "subset_images": len(draws[0][2]) if draws else 0,
        "formula": formula,
        "oss_vs_tau": correlations([r["oss"] for r in rows], taus),
        "tau_full_val": full_tau if ranked_by == "test" else None,
        "tau_subsets_mean": float(np.nanmean(taus)) if np.isfinite(taus).any() else None,
        "tau_top_s": [r["tau"] for r in top],
        "tau_top_s_mean": float(np.nanmean([r["tau"] for r in top])) if top else None,
    }
    return rows, summary


def top_subset(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The row of the highest OSS (an undefined OSS ranks last; ties: the first subset)."""
    return max(
        rows, key=lambda r: (r["oss"] if math.isfinite(r["oss"]) else -math.inf, -r["subset"])
    )


def plot_reliability(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([r["oss"] for r in rows], [r["tau"] for r in rows], s=12, label="random subsets")
    tops = {(s, top_subset([r for r in rows if r["seed"] == s])["subset"])
            for s in {r["seed"] for r in rows}}  # fmt: skip
    top_rows = [r for r in rows if (r["seed"], r["subset"]) in tops]
    ax.scatter([r["oss"] for r in top_rows], [r["tau"] for r in top_rows], s=40, marker="*",
               color="C3", label="Top-s (highest OSS of its seed)")  # fmt: skip
    if summary.get("tau_full_val") is not None:
        ax.axhline(summary["tau_full_val"], color="black", lw=0.8, label="full validation set")
    corr = summary["oss_vs_tau"]
    ax.set_title(f"OSS vs ranking agreement (Pearson r {corr['pearson_r']:.2f})")
    ax.set_xlabel("subset OSS vs the reference set")
    ax.set_ylabel(f"Kendall τ with the ranking by {summary['ranked_by']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
