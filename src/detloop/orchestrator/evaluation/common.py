"""Shared pieces of validation, calibration, thresholding and auto-labeling runs: which model,
which split, the stored validation tables and calibrators, metrics.json, MLflow artifacts."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_table, write_json, write_table
from detloop.data.rundir import RunDir, is_checkpoint, iteration_of
from detloop.data.splits import eval_split
from detloop.learners.calibration import STATE_JSON, CalibrationSet, calibration_pairs

logger = logging.getLogger(__name__)
DECODE_METHODS = ("l-norm", "n-flow", "sample", "falsedec")


@dataclass(frozen=True)
class ModelRef:
    """Which model to use and which iteration directory receives the outputs."""

    iteration: int
    checkpoint: Path


def resolve_model(run: RunDir, iteration: int | None, checkpoint: Path | None) -> ModelRef:
    """``--iteration N`` / ``--checkpoint PATH`` (default: the latest complete checkpoint)."""
    if checkpoint is not None:
        if not is_checkpoint(checkpoint):
            raise DataError(str(checkpoint), None, None, "not a checkpoint (no metadata.json)")
        its = run.iterations()
        return ModelRef(iteration if iteration is not None else (its[-1] if its else 0), checkpoint)
    if iteration is None:
        latest = run.latest_checkpoint()
        if latest is None:
            raise DataError(str(run.path), None, None, "no trained checkpoint; train first or "
                            "pass --checkpoint PATH")  # fmt: skip
        return ModelRef(iteration_of(latest) or 0, latest)
    ckpt = run.checkpoint(iteration)
    if not is_checkpoint(ckpt):
        raise DataError(str(ckpt), None, None, f"iteration {iteration} has no checkpoint")
    return ModelRef(iteration, ckpt)


def categories_table(run: RunDir, n_classes: int) -> pa.Table:
    """The run's categories, or class-index names."""
    cats = run.read_categories()
    if cats.num_rows:
        return cats
    ids = list(range(n_classes))
    return pa.table({"class_id": pa.array(ids, pa.int32()), "name": [str(i) for i in ids],
                     "source_id": pa.array([i + 1 for i in ids], pa.int64())})  # fmt: skip


def mean_matched_score(preds: pa.Table, matches: pa.Table) -> float | None:
    """Mean ``score`` of the predictions matched with IoU > 0 (§6.1)."""
    pairs = calibration_pairs(preds.select(["image_id", "det_id", "score"]), matches)
    return float(pairs["score"].mean()) if len(pairs) else None


def update_metrics(run: RunDir, iteration: int, key: str, value: Any) -> Path:
    """Merge ``{key: value}`` into the iteration's metrics.json."""
    doc = run.read_metrics(iteration)
    doc[key] = value
    write_json(jsonable(doc), run.metrics_file(iteration))
    return run.metrics_file(iteration)


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars as Python ones and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer | np.bool_):
        return obj.item()
    return obj


def log_artifacts(
    run_id: str | None, tracking_uri: str | None, paths: list[Path], artifact_path: str
) -> int:
    """Log files and directories as MLflow artifacts of ``run_id``; no-op without a run id or
    tracking URI. Returns the number of paths logged."""
    if not run_id or not tracking_uri:
        return 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    n = 0
    for p in paths:
        if p.is_dir():
            client.log_artifacts(run_id, str(p), f"{artifact_path}/{p.name}")
        elif p.exists():
            client.log_artifact(run_id, str(p), artifact_path)
        else:
            continue
        n += 1
    return n


def log_run_artifacts(run: RunDir, cfg: ExperimentConfig, paths: list[Path], sub: str) -> int:
    """``log_artifacts`` with the run's MLflow run id (run.json) and the configured store."""
    if not cfg.tracking.enabled or not run.exists():
        return 0
    from detloop.orchestrator.engine.tracking import tracking_uri

    run_id = run.read_meta().get("mlflow_run_id")
    return log_artifacts(run_id, tracking_uri(cfg), paths, sub)


# ---- validation data -------------------------------------------------------------------------
def load_calibration(run: RunDir, iteration: int) -> CalibrationSet | None:
    """The stored calibrators of ``iteration`` (loaded once), or None."""
    d = run.calibration_dir(iteration)
    return CalibrationSet.load(d) if (d / STATE_JSON).exists() else None


def apply_calibration(path: Path, cal: CalibrationSet) -> None:
    """Rewrite a stored predictions table with its ``*_cal`` columns filled."""
    if path.exists():
        write_table(cal.transform(read_table(schema.PREDICTIONS, path)), schema.PREDICTIONS, path)


def pairs_frame(preds: pa.Table, matches: pa.Table) -> pd.DataFrame:
    return calibration_pairs(preds, matches)


__all__ = [
    "DECODE_METHODS",
    "ModelRef",
    "apply_calibration",
    "categories_table",
    "eval_split",
    "jsonable",
    "load_calibration",
    "log_artifacts",
    "log_run_artifacts",
    "mean_matched_score",
    "resolve_model",
    "update_metrics",
]
