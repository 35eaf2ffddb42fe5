"""Plots of a thresholding result (ALGORITHMS §7.5): ROC of each uncertainty and of the
combination, the spider plot of removed / remaining groups at τ = max(thr_iou_thrs) and, with
``diagnostics``, heatmaps over the image plane and top-10 image grids per group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detloop.data.rundir import RunDir
from detloop.data.schema import COORDS
from detloop.reports import threshold_plots as tp
from detloop.selectors.threshold import uncertainty_matrix, uncertainty_values
from detloop.selectors.threshold_metrics import cd_labels


def _groups(rows: pd.DataFrame, u: np.ndarray, delta: float, tau: float) -> dict[str, np.ndarray]:
    cd = cd_labels(rows["iou"].to_numpy(float), rows["tps_class"].to_numpy(bool), [tau])[:, 0]
    removed = u >= delta
    return {
        "all": np.ones(len(rows), bool),
        "removed": removed,
        "remaining": ~removed,
        "correctly removed": removed & ~cd,
        "falsely removed": removed & cd,
        "falsely remaining": ~removed & ~cd,
    }


def write_threshold_plots(
    run: RunDir, rows: pd.DataFrame, th: Any, out_dir: Path, rng: np.random.Generator,
    diagnostics: bool = False,
) -> list[Path]:  # fmt: skip
    """ROC and spider plots (always), heatmaps and image grids (``diagnostics``)."""
    thrs = list(th.iou_thrs)
    tau, delta = max(thrs), th.thresholds_[int(np.argmax(thrs))]
    umat = uncertainty_matrix(rows, th.names_, th.calibrated)
    u = umat @ th.weights_
    cd = cd_labels(rows["iou"].to_numpy(float), rows["tps_class"].to_numpy(bool), [tau])[:, 0]
    scores = {n: umat[:, i] for i, n in enumerate(th.names_)} | {"combination": u}
    paths = [tp.roc_plot(scores, ~cd, out_dir / "roc.png", th.budget)]
    groups = _groups(rows, u, delta, tau)
    spider = {g: tp.group_stats(rows, groups[g], thrs) for g in ("all", "removed", "remaining")}
    paths.append(tp.spider_plot(spider, out_dir / "spider.png", f"δ* = {delta:.4g}"))
    if diagnostics:
        paths += _diagnostics(run, rows, u, groups, th.calibrated, out_dir, rng)
    return paths


def _diagnostics(
    run: RunDir, rows: pd.DataFrame, u: np.ndarray, groups: dict[str, np.ndarray],
    calibrated: bool, out_dir: Path, rng: np.random.Generator,
) -> list[Path]:  # fmt: skip
    images = run.read_images().to_pandas().set_index("image_id")
    used = images.loc[images.index.intersection(rows["image_id"].unique())]
    canvas = (int(used["height"].max()), int(used["width"].max())) if len(used) else (1, 1)
    boxes = rows[list(COORDS)].to_numpy(float)
    maps: dict[str, np.ndarray] = {}
    if all(f"gt_{c}" in rows.columns for c in COORDS):
        gt = rows[[f"gt_{c}" for c in COORDS]].to_numpy(float)
        maps["GT frequency"] = tp.box_heatmap(gt[np.isfinite(gt).all(1)], None, canvas)
    for name in ("albox_rel", "entropy"):
        try:
            maps[f"mean {name}"] = tp.box_heatmap(
                boxes, uncertainty_values(rows, name, calibrated), canvas
            )
        except ValueError:
            continue
    sfx = "_cal" if calibrated else ""
    if all(f"gt_{c}" in rows.columns and f"al_{c}{sfx}" in rows.columns for c in COORDS):
        sig = rows[[f"al_{c}{sfx}" for c in COORDS]].to_numpy(float)
        resid = np.abs(boxes - rows[[f"gt_{c}" for c in COORDS]].to_numpy(float))
        maps["RMSE |r| vs σ_al"] = tp.box_heatmap(
            boxes, np.sqrt(np.mean((resid - sig) ** 2, axis=1)), canvas
        )
    for g in ("correctly removed", "falsely removed", "falsely remaining"):
        m = groups[g]
        maps[f"u: {g}"] = tp.box_heatmap(boxes[m], u[m], canvas)
    paths = [tp.heatmaps(maps, out_dir / "heatmaps.png")]
    files = images["file"].to_dict()
    for g in ("correctly removed", "falsely removed", "falsely remaining"):
        sub = rows[groups[g]].assign(u=u[groups[g]])
        top = sub.groupby("image_id")["u"].max().sort_values(ascending=False).index[:10]
        paths.append(_grid(sub, list(top), files, out_dir / f"top10_{g.replace(' ', '_')}.png", g))
    keep = rows[groups["remaining"]].assign(u=u[groups["remaining"]])
    ids = sorted(keep["image_id"].unique())
    pick = [ids[i] for i in rng.choice(len(ids), size=min(10, len(ids)), replace=False)]
    paths.append(_grid(keep, pick, files, out_dir / "random10_remaining.png", "remaining"))
    return paths


def _grid(sub: pd.DataFrame, ids: list[str], files: dict[str, str], path: Path, title: str) -> Path:
    ids = [i for i in ids if i in files and Path(files[i]).exists()]
    return tp.image_grid([files[i] for i in ids], [sub[sub["image_id"] == i] for i in ids], path,
                         title)  # fmt: skip
