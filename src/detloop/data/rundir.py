"""The run directory: the one place that knows where everything of a run is stored.

Layout (ARCHITECTURE §8)::

    <runs_root>/mlflow.db                  MLflow store (SQLite)
    <runs_root>/mlartifacts/               MLflow artifacts
    <runs_root>/<name>/_warmup/<key>/      warm-up cache shared by the strategies of one seed
    <runs_root>/<name>/<run_name>/         one run
        run.json
        pool/{images,labels,gt,categories}.parquet
        iter_0003/{checkpoint/,predictions.parquet,val_predictions.parquet,selection.parquet,
                   calibration/,eval/,validation/,thresholding/,thresholds.json,metrics.json,
                   pls.parquet (SSL rounds with ssl.pls)}
        exports/                           review exports (queries, auto-labeling), COCO
        pls/<tag>/                         `detloop pls` analyses of a round's pseudo-labels
    <runs_root>/<name>/oss/                OSS analysis of the experiment's runs

Nobody else builds these paths: code asks ``RunsRoot`` or ``RunDir`` for them.
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
CHECKPOINT_METADATA = "metadata.json"  # written last: a checkpoint is complete when it exists
CHECKPOINT_WEIGHTS = "model.pt"


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a complete checkpoint directory (its metadata.json exists)."""
    return (Path(path) / CHECKPOINT_METADATA).exists()


def iteration_of(path: str | os.PathLike[str]) -> int | None:
    """The iteration of a directory inside ``iter_NNNN/`` (e.g. a checkpoint), else None."""
    match = _ITER_RE.match(Path(path).resolve().parent.name)
    return int(match.group(1)) if match else None


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

    def experiment_artifacts(self, name: str) -> Path:
        """MLflow artifact location of experiment ``name``."""
        return self.artifacts / name

    def experiment(self, name: str) -> Path:
        return self.path / name

    def warmup(self, name: str, key: str) -> Path:
        return self.path / name / "_warmup" / key

    def run(self, name: str, run_name: str) -> RunDir:
        return RunDir(self.path / name / run_name)

    def unused_run(self, name: str, run_name: str) -> RunDir:
        """``run_name``, or the first of ``<run_name>-r2``, ``-r3``, ... without a run.json
        (``--fresh``: start over beside the existing run)."""
        run, n = self.run(name, run_name), 2
        while run.exists():
            run, n = self.run(name, f"{run_name}-r{n}"), n + 1
        return run

    def oss_dir(self, name: str) -> Path:
        """Default output folder of ``detloop oss`` for experiment ``name``."""
        return self.experiment(name) / "oss"

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

    def fault_marker(self, point: str) -> Path:
        """Fault injection (tests): the file that records that ``point`` already fired."""
        return self.path / f".fault_{point.replace(':', '_')}"

    def import_staging_file(self, stem: str) -> Path:
        """Where ``import-labels`` stages a normalised copy of the file it imports."""
        return self.exports / f".import_{stem}.json"

    @staticmethod
    def iteration_name(iteration: int) -> str:
        """``iter_NNNN``: an iteration's folder, and its MLflow artifact folder."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return f"iter_{iteration:04d}"

    def iteration_dir(self, iteration: int) -> Path:
        return self.path / self.iteration_name(iteration)

    @staticmethod
    def artifact_path(iteration: int, sub: str | None = None) -> str:
        """The MLflow artifact folder of an iteration's outputs (mirrors ``iteration_dir``)."""
        name = RunDir.iteration_name(iteration)
        return name if sub is None else f"{name}/{sub}"

    def checkpoint(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "checkpoint"

    def weights_file(self, iteration: int) -> Path:
        """The model weights inside the iteration's checkpoint."""
        return self.checkpoint(iteration) / CHECKPOINT_WEIGHTS

    def predictions_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "predictions.parquet"

    def val_predictions_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "val_predictions.parquet"

    def split_predictions_file(self, iteration: int, split: str) -> Path:
        """Predictions of ``split`` (pool and val: the files above; others ``<split>_...``)."""
        if split == "pool":
            return self.predictions_file(iteration)
        if split == "val":
            return self.val_predictions_file(iteration)
        return self.iteration_dir(iteration) / f"{split}_predictions.parquet"

    def selection_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "selection.parquet"

    def calibration_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "calibration"

    def calibration_report_file(self, iteration: int) -> Path:
        return self.calibration_dir(iteration) / "report.json"

    def calibration_plots_dir(self, iteration: int) -> Path:
        return self.calibration_dir(iteration) / "plots"

    def validation_dir(self, iteration: int) -> Path:
        """Plots of the validation report."""
        return self.iteration_dir(iteration) / "validation"

    def thresholding_dir(self, iteration: int) -> Path:
        """Plots of the thresholding run."""
        return self.iteration_dir(iteration) / "thresholding"

    def eval_dir(self, iteration: int) -> Path:
        """Evaluation curves of ``detloop evaluate`` (JSON and PNG per split)."""
        return self.iteration_dir(iteration) / "eval"

    def curves_file(self, iteration: int, split: str) -> Path:
        return self.eval_dir(iteration) / f"{split}_curves.json"

    def thresholds_file(self, iteration: int) -> Path:
        """The latest thresholding result of the iteration (what the loops read)."""
        return self.iteration_dir(iteration) / "thresholds.json"

    def thresholds_variant_file(self, iteration: int, variant: str) -> Path:
        """The result of one thresholding setting (``ThresholdResult.variant``), kept beside
        the others."""
        return self.thresholding_dir(iteration) / f"thresholds_{variant}.json"

    def metrics_file(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "metrics.json"

    def read_metrics(self, iteration: int) -> dict[str, Any]:
        """The iteration's ``metrics.json`` ({} when it has none yet)."""
        path = self.metrics_file(iteration)
        doc = read_json(path) if path.exists() else {}
        return doc if isinstance(doc, dict) else {}

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

    def pseudo_classes_file(self, iteration: int) -> Path:
        """Per class: labeled boxes, the round's pseudo-labels and, in simulated runs, their
        precision and recall against the hidden gt (``pseudo_quality.pseudo_class_rows``)."""
        return self.iteration_dir(iteration) / "pseudo_classes.json"

    def read_pseudo_classes(self, iteration: int) -> list[dict[str, Any]] | None:
        """The iteration's per-class pseudo-label table (None: it made no pseudo-labels)."""
        path = self.pseudo_classes_file(iteration)
        return list(read_json(path)["classes"]) if path.exists() else None

    def write_pseudo_classes(self, iteration: int, rows: list[dict[str, Any]]) -> None:
        """Keep the iteration's per-class pseudo-label table (``steps.pseudo_label``'s)."""
        write_json({"classes": rows}, self.pseudo_classes_file(iteration))

    def pls_scores_file(self, iteration: int) -> Path:
        """PLS (``ssl.pls``): S, C, D and the verdict of each pseudo-labeled image of a round."""
        return self.iteration_dir(iteration) / "pls.parquet"

    @property
    def pls_root(self) -> Path:
        """Outputs of ``detloop pls`` (the oracle analysis of a round's pseudo-labels)."""
        return self.path / "pls"

    def pls_dir(self, tag: str) -> Path:
        """One ``detloop pls`` analysis: ``images.parquet``, ``report.json``, ``roc.png``."""
        return self.pls_root / tag

    def glc_dir(self, tag: str) -> Path:
        """Where ``detloop glc`` writes one corrected label set (ALGORITHMS §11.5)."""
        return self.path / "glc" / tag

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
            if is_checkpoint(ckpt):
                return ckpt
        return None

    # ---- exports --------------------------------------------------------------------------
    def query_stem(self, iteration: int) -> Path:
        """Human labeling: ``<stem>.coco.json`` and Label Studio files of the queried images."""
        return self.exports / f"query_{self.iteration_name(iteration)}"

    def autolabel_stem(self, iteration: int) -> Path:
        return self.exports / f"autolabel_{self.iteration_name(iteration)}"

    def autolabel_coco_file(self, iteration: int) -> Path:
        """COCO of the images auto-labeled in ``iteration``."""
        return Path(f"{self.autolabel_stem(iteration)}_auto.coco.json")

    def autolabel_examine_stem(self, iteration: int) -> Path:
        """Review exports of the images auto-labeling sent to ``examine``."""
        return Path(f"{self.autolabel_stem(iteration)}_examine")

    def autolabel_renders_dir(self, iteration: int) -> Path:
        return Path(f"{self.autolabel_stem(iteration)}_renders")

    def autolabel_exports(self, iteration: int) -> list[Path]:
        """The export files auto-labeling wrote for ``iteration`` (renderings aside)."""
        stem = self.autolabel_stem(iteration)
        return sorted(p for p in stem.parent.glob(f"{stem.name}_*") if p.is_file())

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

    def class_names(self) -> list[str] | None:
        """Category names in class-id order (None before any data was imported)."""
        if not self.categories_file.exists():
            return None
        cats = self.read_categories().sort_by("class_id")
        return [str(n) for n in cats.column("name").to_pylist()]

    def write_images(self, table: pa.Table) -> pa.Table:
        return write_table(table, schema.IMAGES, self.images_file)

    def write_labels(self, table: pa.Table) -> pa.Table:
        return write_table(table, schema.LABELS, self.labels_file)

    def write_gt(self, table: pa.Table) -> pa.Table:
        return write_table(table, schema.GT, self.gt_file)

    def write_categories(self, table: pa.Table) -> pa.Table:
        return write_table(table, schema.CATEGORIES, self.categories_file)
