"""Evaluate a model on a labelled split: predict the split, then COCO mAP (ALGORITHMS §4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from detloop.config import ExperimentConfig
from detloop.learners.model import UncertainEfficientDet


def default_categories(num_classes: int) -> pa.Table:
    """A categories table naming classes by their index (when the run's table is absent)."""
    return pa.table(
        {
            "class_id": pa.array(range(num_classes), pa.int32()),
            "name": pa.array([str(i) for i in range(num_classes)], pa.string()),
            "source_id": pa.array(range(1, num_classes + 1), pa.int64()),
        }
    )


def evaluate_predictions(
    predictions: pa.Table, gt: pa.Table, images: pa.Table, categories: pa.Table
) -> dict[str, Any]:
    """COCO metrics of a predictions table against ground truth (``map``, ``map50``, ...)."""
    from detloop.learners.evaluate import coco_map

    return dict(coco_map(predictions, gt, images, categories))


def evaluate_model(
    model: UncertainEfficientDet,
    cfg: ExperimentConfig,
    images: pa.Table,
    gt: pa.Table,
    *,
    seed: int,
    categories: pa.Table | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """Predict ``images`` with ``model`` and score the predictions against ``gt``."""
    from detloop.learners.predict import Predictor

    was_training = model.training
    predictor = Predictor(model, cfg, device=str(next(model.parameters()).device))
    try:
        preds = predictor.predict(images, seed=seed, root=root)
    finally:
        model.train(was_training)
    cats = categories if categories is not None else default_categories(model.spec.num_classes)
    return evaluate_predictions(preds, gt, images, cats)
