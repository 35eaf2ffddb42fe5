"""The run directory: the one place that knows where everything of a run is stored.

Layout (ARCHITECTURE §8)::

    <runs_root>/mlflow.db                  MLflow store (SQLite)
    <runs_root>/mlartifacts/               MLflow artifacts
    <runs_root>/<name>/_warmup/<key>/      warm-up cache shared by the strategies of one seed
    <runs_root>/<name>/<run_name>/         one run
        run.json
        pool/{images,labels,gt,categories}.parquet
        iter_0003/{checkpoint/,predictions.parquet,val_predictions.parquet,selection.parquet,
                   calibration/,eval/,thresholds.json,metrics.json}
        exports/
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_json, read_table, write_json, write_table

_ITER_RE = re.compile(r"^iter_(\d{4,})$")


def al_run_name(strategy: str, seed: int) -> str:
    """Run name of an active-learning loop: ``<canonical strategy>-s<seed>``."""
    return f"{strategy}-s{seed}"


def ssl_run_name(selection: str, seed: int) -> str:
    """Run name of a semi-supervised run: ``ssl-<selection>-s<seed>``."""
    return f"ssl-{selection}-s{seed}"


def autolabel_run_name(seed: int) -> str:
    """Run name of an auto-labeling run: ``autolabel-s<seed>``."""
    return f"autolabel-s{seed}"


@dataclass(frozen=True)
class RunsRoot:
    """The root under which runs, the MLflow store and warm-up caches live."""

    path: Path

    @property
    def mlflow_db(self) -> Path:
        return self.path / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db.resolve()}"

    @property
    def artifacts(self) -> Path:
        return self.path / "mlartifacts"

    def experiment(self, name: str) -> Path:
        return self.path / name

    def warmup(self, name: str, key: str) -> Path:
        return self.path / name / "_warmup" / key

    def run(self, name: str, run_name: str) -> RunDir:
        return RunDir(self.path / name / run_name)

    def runs_of(self, name: str) -> list[RunDir]:
        """Every run directory of experiment ``name`` (those holding a run.json)."""
        exp = self.experiment(name)
        if not exp.is_dir():
            return []
        return sorted(RunDir(p) for p in exp.iterdir() if p.is_dir() and (p / "run.json").exists())


@dataclass(frozen=True, order=True)
class RunDir:
    """Paths and table access of one run directory."""

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    # ---- layout ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def pool_dir(self) -> Path:
        return self.path / "pool"

    @property
    def images_file(self) -> Path:
        return self.pool_dir / "images.parquet"

    @property
    def labels_file(self) -> Path:
        return self.pool_dir / "labels.parquet"

    @property
    def gt_file(self) -> Path:
        return self.pool_dir / "gt.parquet"

    @property
    def categories_file(self) -> Path:
        return self.pool_dir / "categories.parquet"

    @property
    def exports(self) -> Path:
        return self.path / "exports"

    def iteration_dir(self, iteration: int) -> Path:
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return self.path / f"iter_{iteration:04d}"

    def checkpoint(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "checkpoint"

    def predictions_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "predictions.parquet"

    def val_predictions_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "val_predictions.parquet"

    def selection_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "selection.parquet"

    def calibration_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "calibration"

    def eval_dir(self, iteration: int) -> Path:
        """Evaluation curves of ``detloop evaluate`` (JSON and PNG per split)."""
        return self.iteration_dir(iteration) / "eval"

    def thresholds_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "thresholds.json"

    def metrics_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "metrics.json"

    def shard_dir(self, iteration: int, stage: str) -> Path:
        """Per-shard prediction results of a phase in progress (removed once merged)."""
        return self.iteration_dir(iteration) / "shards" / stage

    def shard_file(self, iteration: int, stage: str, shard: int) -> Path:
        return self.shard_dir(iteration, stage) / f"shard_{shard:05d}.parquet"

    def shard_stats_file(self, iteration: int, stage: str, shard: int) -> Path:
        """What the decoding bounds changed in a persisted shard (written beside it)."""
        return self.shard_dir(iteration, stage) / f"shard_{shard:05d}.stats.json"

    def matches_file(self, iteration: int, split: str = "val") -> Path:
        return self.iteration_dir(iteration) / f"{split}_matches.parquet"

    def iterations(self) -> list[int]:
        """Iteration numbers that have a directory, ascending."""
        if not self.path.is_dir():
            return []
        found = (_ITER_RE.match(p.name) for p in self.path.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint of the highest iteration that has a complete one."""
        for it in reversed(self.iterations()):
            ckpt = self.checkpoint(it)
            if (ckpt / "metadata.json").exists():
                return ckpt
        return None

    # ---- run.json -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.run_json.exists()

    def read_meta(self) -> dict[str, Any]:
        meta = read_json(self.run_json)
        if not isinstance(meta, dict):
            raise DataError(str(self.run_json), None, None, "run.json must hold a JSON object")
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(meta, self.run_json)

    # ---- pool tables ----------------------------------------------------------------------
    def _read_or_empty(self, spec: schema.TableSpec, path: Path) -> pa.Table:
        return read_table(spec, path) if path.exists() else spec.empty()

    def read_images(self) -> pa.Table:
        return self._read_or_empty(schema.IMAGES, self.images_file)

    def read_labels(self) -> pa.Table:
        return self._read_or_empty(schema.LABELS, self.labels_file)

    def read_gt(self) -> pa.Table:
        return self._read_or_empty(schema.GT, self.gt_file)

    def read_categories(self) -> pa.Table:
        return self._read_or_empty(schema.CATEGORIES, self.categories_file)

    def write_images(self, table: pa.Table) -> pa.Table:
        return write_table(table, schema.IMAGES, self.images_file)

    def write_labels(self, table: pa.Table) -> pa.Table:
        return write_table(table, schema.LABELS, self.labels_file)

    def write_gt(self, table: pa.Table) -> pa.Table:
        return write_table(table, schema.GT, self.gt_file)

    def write_categories(self, table: pa.Table) -> pa.Table:
        return write_table(table, schema.CATEGORIES, self.categories_file)
