"""Active-learning curves: mAP against the labeled fraction, one line per strategy, mean ± std
over seeds; plus a markdown table and a one-run text summary. The points come from run
directories (their ``metrics.json``) or from an MLflow tracking store (``tracked_curves``: the
runs of an experiment on a tracking server, for a machine without the run directories)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detloop.data.io import read_json
from detloop.data.rundir import RunDir


@dataclass(frozen=True)
class CurvePoint:
    iteration: int
    labeled_fraction: float
    labeled_images: int
    map: float
    map50: float


def run_curve(run: RunDir) -> list[CurvePoint]:
    """The logged points of one run (iterations whose ``log`` phase completed)."""
    meta = run.read_meta()
    logged = {
        h["iteration"] for h in meta.get("history", []) if h["phase"] == "log" and h.get("ended")
    }
    points = []
    for it in sorted(logged):
        m = read_json(run.metrics_file(it))
        if "autolabel_frames" in m:  # autolabel.after_loop: no model, no point of the curve
            continue
        points.append(
            CurvePoint(
                it,
                float(m.get("labeled_fraction", float("nan"))),
                int(m.get("labeled_images", 0)),
                float(m.get("map", float("nan"))),
                float(m.get("map50", float("nan"))),
            )
        )
    return points


def run_summary(run: RunDir) -> str:
    """A small text table of one run's curve."""
    meta = run.read_meta()
    lines = [f"{meta.get('strategy')} seed {meta.get('seed')}: {run.path}"]
    lines.append(f"{'iter':>4} {'labeled':>8} {'fraction':>8} {'mAP':>7} {'mAP50':>7}")
    for p in run_curve(run):
        lines.append(
            f"{p.iteration:>4} {p.labeled_images:>8} {p.labeled_fraction:>8.3f} "
            f"{p.map:>7.4f} {p.map50:>7.4f}"
        )
    return "\n".join(lines)


def curve_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the curve over the covered labeled fraction (trapezoids, normalised)."""
    if len(x) < 2 or x[-1] == x[0]:
        return float(y.mean()) if len(y) else float("nan")
    return float(np.trapezoid(y, x) / (x[-1] - x[0]))


def curves_by_strategy(runs: list[RunDir]) -> dict[str, list[list[CurvePoint]]]:
    out: dict[str, list[list[CurvePoint]]] = defaultdict(list)
    for run in runs:
        out[str(run.read_meta().get("strategy"))].append(run_curve(run))
    return dict(out)


def tracked_curves(tracking_uri: str, experiment: str) -> dict[str, list[list[CurvePoint]]]:
    """The curves of the runs of ``experiment`` in an MLflow store, by their ``strategy`` tag:
    the metrics ``map``, ``map50``, ``labeled_images`` and ``labeled_fraction`` at each
    iteration (MLflow step) that logged ``map``. Empty when there is no such experiment.
    Auto-labeling runs have no curve; a step logged twice (a resume that repeated a log
    phase) counts once, with its last value."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    found = client.search_runs([exp.experiment_id], max_results=10_000)
    out: dict[str, list[list[CurvePoint]]] = defaultdict(list)
    for r in sorted(found, key=lambda r: (r.data.tags.get("seed", ""), r.info.start_time or 0)):
        if r.data.tags.get("loop") == "autolabel" or "map" not in r.data.metrics:
            continue
        curve = _tracked_curve(client, r.info.run_id)
        if curve:
            out[r.data.tags.get("strategy") or r.info.run_name or r.info.run_id].append(curve)
    return dict(out)


def _tracked_curve(client: Any, run_id: str) -> list[CurvePoint]:
    keys = ("map", "map50", "labeled_images", "labeled_fraction")
    hist = {
        k: {m.step: m.value for m in sorted(client.get_metric_history(run_id, k), key=_time)}
        for k in keys
    }
    nan = float("nan")
    return [
        CurvePoint(
            int(step),
            float(hist["labeled_fraction"].get(step, nan)),
            int(hist["labeled_images"].get(step, 0)),
            float(hist["map"][step]),
            float(hist["map50"].get(step, nan)),
        )
        for step in sorted(hist["map"])
    ]


def _time(metric: Any) -> int:
    return int(metric.timestamp)


def write_report(runs: list[RunDir], out_dir: Path, metric: str = "map") -> tuple[Path, Path]:
    """Plot AL curves (mean ± std over seeds) and write a markdown table; returns both paths."""
    return write_curves(curves_by_strategy(runs), out_dir, metric)


def write_curves(
    groups: dict[str, list[list[CurvePoint]]], out_dir: Path, metric: str = "map"
) -> tuple[Path, Path]:
    """``write_report`` of curves by strategy, wherever they came from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = ["| strategy | seeds | " + " | ".join(["labeled → mAP"]) + f" | AUC ({metric}) |"]
    rows.append("|---|---|---|---|")
    for strategy, curves in sorted(groups.items()):
        n = min((len(c) for c in curves), default=0)
        if n == 0:
            continue
        x = np.array([[p.labeled_fraction for p in c[:n]] for c in curves]).mean(axis=0)
        y = np.array([[getattr(p, metric) for p in c[:n]] for c in curves])
        mean, std = y.mean(axis=0), y.std(axis=0)
        ax.plot(x * 100, mean, marker="o", label=f"{strategy} (n={len(curves)})")
        ax.fill_between(x * 100, mean - std, mean + std, alpha=0.2)
        aucs = [curve_auc(x, yy) for yy in y]
        cells = ", ".join(
            f"{xx * 100:.0f}% → {m:.3f}±{s:.3f}" for xx, m, s in zip(x, mean, std, strict=True)
        )
        rows.append(
            f"| {strategy} | {len(curves)} | {cells} | {np.mean(aucs):.4f} ± {np.std(aucs):.4f} |"
        )
    ax.set_xlabel("labeled share of the pool (%)")
    ax.set_ylabel({"map": "mAP@[.5:.95]", "map50": "mAP@.5"}.get(metric, metric) + " (validation)")
    ax.set_title("Active learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    png = out_dir / "al_curves.png"
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    md = out_dir / "al_curves.md"
    md.write_text("\n".join(rows) + "\n")
    return png, md
