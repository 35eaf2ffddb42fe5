"""Validation under test-time corruptions (ALGORITHMS §6.3, ``predict.infer_augment``).

Each variant of :mod:`detloop.learners.corruptions` is applied to every image of the evaluation
split (seeded per image and variant), the model predicts the corrupted images, and the
predictions are scored against the ground truth (mirrored for ``flip``) exactly as the clean
split is: COCO mAP, and the localisation ECE of the aleatoric and epistemic stds (calibrated too
when the model has calibrators). The clean split is the first row (``none``), so every variant
reads as a change from it. Predictions of all variants form one table whose image ids carry the
variant (``<image_id>@<variant>``); corrupted images are written to a temporary folder and
removed afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import write_table
from detloop.learners.calibration import CalibrationSet, calibration_pairs
from detloop.learners.corruptions import Corruption, corruptions, flip_boxes
from detloop.reports import uq_report

SEP = "@"


def corrupt_split(
    images: pa.Table, gt: pa.Table, corruption: Corruption, out_dir: Path, seed: int
) -> tuple[pa.Table, pa.Table]:
    """The corrupted copies of ``images`` (PNG files in ``out_dir``) and their ground truth,
    image ids suffixed with ``@<variant>``; boxes mirrored when the variant flips."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = zlib.crc32(corruption.name.encode())
    files = []
    for i, file in enumerate(images["file"].to_pylist()):
        try:
            with Image.open(file) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as exc:
            raise DataError(str(file), None, "file", f"cannot read image ({exc})") from None
        rng = np.random.default_rng([seed, i, tag])
        path = out_dir / f"{i:06d}.png"
        Image.fromarray(corruption.op(arr, rng)).save(path)
        files.append(str(path))
    suffix = f"{SEP}{corruption.name}"
    ids = [f"{x}{suffix}" for x in images["image_id"].to_pylist()]
    out_images = images.set_column(
        images.schema.get_field_index("image_id"), "image_id", pa.array(ids, pa.string())
    ).set_column(images.schema.get_field_index("file"), "file", pa.array(files, pa.string()))
    gt_ids = [f"{x}{suffix}" for x in gt["image_id"].to_pylist()]
    out_gt = gt.set_column(
        gt.schema.get_field_index("image_id"), "image_id", pa.array(gt_ids, pa.string())
    )
    if corruption.flip is not None and gt.num_rows:
        sizes = {
            r["image_id"]: (r["width"], r["height"])
            for r in images.select(["image_id", "width", "height"]).to_pylist()
        }
        wh = np.array([sizes[x] for x in gt["image_id"].to_pylist()], dtype=np.float64)
        boxes = np.stack([gt[c].to_numpy() for c in schema.COORDS], axis=1).astype(np.float64)
        flipped = np.concatenate(
            [
                flip_boxes(b[None], w, h, corruption.flip)
                for b, (w, h) in zip(boxes, wh, strict=True)
            ]
        )
        for j, c in enumerate(schema.COORDS):
            field = out_gt.schema.field(c)
            out_gt = out_gt.set_column(
                out_gt.schema.get_field_index(c), c, pa.array(flipped[:, j], field.type)
            )
    return out_images, out_gt


def _scores(
    preds: pa.Table, gt: pa.Table, images: pa.Table, cats: pa.Table, cfg: ExperimentConfig,
    calibrated: bool,
) -> dict[str, Any]:  # fmt: skip
    from detloop.learners.evaluate import coco_map, match_reference

    matches = match_reference(preds, gt, assign=cfg.thresholding.assign_gt_box)
    pairs = calibration_pairs(preds, matches)
    m = coco_map(preds, gt, images, cats)
    out: dict[str, Any] = {"map": m["map"], "map50": m["map50"], "detections": preds.num_rows}
    for kind in uq_report.KINDS:
        for cal in (False, True) if calibrated else (False,):
            out[f"loc_ece_{kind}_{'cal' if cal else 'uncal'}"] = uq_report.box_ece(pairs, kind, cal)
    return out


def corruption_report(
    predictor: Any, cfg: ExperimentConfig, data: tuple[pa.Table, pa.Table, pa.Table],
    cal: CalibrationSet | None, seed: int, out_file: Path,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """mAP and localisation ECE per variant of ``cfg.predict.infer_augment`` (``none`` first:
    the clean split); every variant's predictions go to ``out_file``."""
    images, gt, cats = data
    tables = []
    clean = predictor.predict(images, seed=seed)
    if cal is not None:
        clean = cal.transform(clean)
    report = {"none": _scores(clean, gt, images, cats, cfg, cal is not None)}
    tmp = Path(tempfile.mkdtemp(prefix="detloop-corrupt-"))
    try:
        for corruption in corruptions(cfg.predict.infer_augment):
            c_images, c_gt = corrupt_split(images, gt, corruption, tmp / corruption.name, seed)
            preds = predictor.predict(c_images, seed=seed)
            if cal is not None:
                preds = cal.transform(preds)
            report[corruption.name] = _scores(preds, c_gt, c_images, cats, cfg, cal is not None)
            tables.append(preds)
            shutil.rmtree(tmp / corruption.name, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tables:
        write_table(
            pa.concat_tables(tables, promote_options="default"), schema.PREDICTIONS, out_file
        )
    return report


def plot_corruptions(report: dict[str, dict[str, Any]], path: Path) -> Path:
    """Bars of mAP and of the aleatoric / epistemic localisation ECE per variant, the clean
    value as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.45 * len(names) + 4), 4))
    x = np.arange(len(names))
    maps = [report[n]["map"] for n in names]
    axes[0].bar(x, maps, color="C0")
    axes[0].axhline(report["none"]["map"], color="black", lw=0.8)
    axes[0].set_title("mAP@[.5:.95]")
    for j, kind in enumerate(uq_report.KINDS):
        vals = [report[n].get(f"loc_ece_{kind}_uncal") for n in names]
        y = [np.nan if v is None else v for v in vals]
        axes[1].bar(x + (j - 0.5) * 0.4, y, width=0.4, label=f"{kind} std", color=f"C{j + 1}")
    axes[1].set_title("localisation ECE (uncalibrated)")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
