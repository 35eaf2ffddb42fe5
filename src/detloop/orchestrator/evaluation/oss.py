"""OSS over the runs of an experiment (``detloop oss CONFIG``; ALGORITHMS §10, analysis 1).

Candidate sets are the training sets the AL runs of the experiment chose (labeled images up to
iteration i), the reference set is the validation split (or the whole pool). Per-object
features come from the GT crops of the images (read with PIL, once per image). The math is in
``detloop.selectors.oss``; this module gathers the inputs and writes the outputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from detloop.data.errors import DataError
from detloop.data.io import read_json, write_json
from detloop.data.rundir import RunDir
from detloop.selectors.columns import FloatArray
from detloop.selectors.oss import (
    Formula,
    class_weights,
    correlations,
    reference_beta,
    set_similarity,
)

log = logging.getLogger(__name__)


@dataclass
class FeatureBank:
    """Per-image GT crop features (computed once per image) and their classes."""

    images: dict[str, str]
    boxes: dict[str, tuple[FloatArray, np.ndarray]]
    cache: dict[str, tuple[FloatArray, np.ndarray]] = field(default_factory=dict)

    def of(self, image_id: str) -> tuple[FloatArray, np.ndarray]:
        """(features m×3, class id per feature row) of one image."""
        if image_id not in self.cache:
            from detloop.selectors.oss import crop_features

            xyxy, cls = self.boxes.get(image_id, (np.zeros((0, 4)), np.zeros(0, np.int64)))
            path = self.images[image_id]
            try:
                with Image.open(path) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except OSError as exc:
                raise DataError(path, None, "file", f"cannot read image ({exc})") from None
            feats, ok = crop_features(pixels, xyxy)
            self.cache[image_id] = (feats, cls[ok])
        return self.cache[image_id]

    def by_class(self, ids: Iterable[str], names: Mapping[int, str]) -> dict[str, FloatArray]:
        """Feature cloud per class name over the images ``ids``."""
        parts: dict[str, list[FloatArray]] = {}
        for image_id in ids:
            feats, cls = self.of(image_id)
            for c in np.unique(cls):
                parts.setdefault(names.get(int(c), str(c)), []).append(feats[cls == c])
        return {k: np.concatenate(v) for k, v in parts.items()}


def feature_bank(run: RunDir) -> FeatureBank:
    """Image files and GT boxes of a run."""
    images = run.read_images()
    files = dict(zip(images["image_id"].to_pylist(), images["file"].to_pylist(), strict=True))
    gt = run.read_gt()
    ids = np.asarray(gt["image_id"].to_pylist(), dtype=object)
    xyxy = np.stack([np.asarray(gt[c].to_numpy(), np.float64) for c in ("x1", "y1", "x2", "y2")], 1)
    cls = np.asarray(gt["class_id"].to_numpy(), dtype=np.int64)
    boxes: dict[str, tuple[FloatArray, np.ndarray]] = {}
    for image_id in np.unique(ids):
        sel = ids == image_id
        boxes[str(image_id)] = (xyxy[sel], cls[sel])
    return FeatureBank(files, boxes)


def _ids(images: pa.Table, mask: pa.ChunkedArray) -> list[str]:
    return [str(x) for x in pc.filter(images["image_id"], mask).to_pylist()]


def candidate_sets(
    runs: Sequence[RunDir], iterations: Sequence[int]
) -> dict[str, tuple[RunDir, int, list[str]]]:
    """``<run>/iter<i>`` → labeled pool images up to iteration i, for each run and iteration."""
    sets: dict[str, tuple[RunDir, int, list[str]]] = {}
    for run in runs:
        images = run.read_images()
        labeled = pc.and_(pc.equal(images["split"], "pool"), pc.equal(images["state"], "labeled"))
        for it in iterations:
            upto = pc.fill_null(pc.less_equal(images["iteration"], it), False)
            ids = _ids(images, pc.and_(labeled, upto))
            if ids:
                sets[f"{run.name}/iter{it}"] = (run, it, ids)
    return sets


def reference_ids(run: RunDir, reference: str) -> list[str]:
    """The reference set: the ``val`` split (or ``test`` without one), or the whole pool."""
    images = run.read_images()
    splits = set(images["split"].to_pylist())
    split = reference if reference == "pool" else ("val" if "val" in splits else "test")
    return _ids(images, pc.equal(images["split"], split))


def set_metrics(run: RunDir, iteration: int) -> dict[str, float]:
    """mAP and per-class AP (``ap/<class>``) of the model trained on a set, if evaluated."""
    path = run.metrics_file(iteration)
    if not path.exists():
        return {}
    data: Any = read_json(path)
    return {k: float(v) for k, v in data.items() if k == "map" or k.startswith("ap/")}


def weights_and_totals(
    clouds: Mapping[str, Mapping[str, FloatArray]], classes: list[str]
) -> tuple[dict[str, float], FloatArray]:
    """Class weights over the candidate sets (§10) and each set's object total."""
    counts = np.array([[len(cl.get(c, ())) for c in classes] for cl in clouds.values()], float)
    totals = counts.sum(axis=1) if len(counts) else np.zeros(0)
    if not len(counts):
        return {}, totals
    shares = counts / np.maximum(totals[:, None], 1)
    return dict(zip(classes, class_weights(shares).tolist(), strict=True)), totals


def _summarise(rows: list[dict[str, Any]], summary: dict[str, Any], classes: list[str]) -> None:
    summary["skipped_classes"] = sorted({r["class"] for r in rows if math.isnan(r["jsd"])})
    per_set = list(summary["sets"].values())
    summary["oss_vs_map"] = correlations([s["oss"] for s in per_set], [s["map"] for s in per_set])
    summary["per_class"] = {
        c: correlations(
            [r["similarity"] for r in rows if r["class"] == c],
            [r["ap"] for r in rows if r["class"] == c],
        )
        for c in classes
    }


def run_oss(
    runs: Sequence[RunDir],
    iterations: Sequence[int],
    reference: str,
    formula: Formula,
    rng: np.random.Generator,
    n_resample: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-class rows and a summary (per-set OSS and mAP, correlations) for the runs."""
    if not runs:
        raise DataError("runs", None, None, "no runs of this experiment (run the loop first)")
    bank = feature_bank(runs[0])
    cats = runs[0].read_categories()
    names = dict(zip(cats["class_id"].to_pylist(), cats["name"].to_pylist(), strict=True))
    ref = bank.by_class(reference_ids(runs[0], reference), names)
    sets = candidate_sets(runs, iterations)
    clouds = {sid: bank.by_class(ids, names) for sid, (_, _, ids) in sets.items()}
    classes = sorted({*ref, *(c for cl in clouds.values() for c in cl)})
    weights, totals = weights_and_totals(clouds, classes)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"formula": formula, "reference": reference, "sets": {}}
    for k, (sid, (run, it, _)) in enumerate(sets.items()):
        beta = reference_beta(int(totals[k]), totals.astype(int).tolist())
        oss, per_class = set_similarity(clouds[sid], ref, weights, formula, rng, beta, n_resample)
        metrics = set_metrics(run, it)
        summary["sets"][sid] = {"oss": oss, "map": metrics.get("map", math.nan)}
        for c in per_class:
            row = {"set_id": sid, "class": c.cls, "jsd": c.jsd, "r": c.r, "weight": c.weight}
            row |= {"n_p": c.n_p, "n_q": c.n_q, "similarity": c.similarity, "oss": oss}
            rows.append(row | {"ap": metrics.get(f"ap/{c.cls}", math.nan)})
    _summarise(rows, summary, classes)
    return rows, summary


def write_outputs(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    """``oss.parquet`` (one row per set and class) and ``oss_summary.json`` under ``out``."""
    from detloop.data.io import write_parquet

    table = pa.Table.from_pylist(rows) if rows else pa.table({"set_id": pa.array([], pa.string())})
    write_parquet(table, out / "oss.parquet")
    write_json(summary, out / "oss_summary.json")
