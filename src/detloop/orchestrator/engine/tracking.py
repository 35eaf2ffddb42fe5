"""MLflow tracking as a loop callback: one MLflow run per loop, reattached on resume.

Store: ``tracking.uri`` or SQLite at ``<runs_root>/mlflow.db``. Experiments created on a
database store (SQLite, ...) keep their artifacts under ``<runs_root>/mlartifacts`` (set
explicitly, never ``./mlruns``); on a tracking server (``http://``, ``detloop tracking-server``)
the server places them (its artifact proxy, ``mlflow-artifacts:/``), so no node needs the
server's disk. Experiments are marked as model-training ones (``mlflow.experimentKind``), so
MLflow's UI opens them on runs and charts, not on its GenAI views.

Metrics are stepped by iteration and sent with ``log_batch``; the AL loop's curve metrics go
again as ``<name>_vs_labeled``, stepped by the number of labeled images, so that MLflow's own
chart of them is the AL curve and the runs of several strategies overlay on one axis.

The tracking URI is shown (params, log lines) without credentials (``TrackingConfig.redact``);
a config cannot hold any (``TrackingConfig`` refuses them: MLflow's environment variables
carry them).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from pathlib import Path
from typing import Any

from detloop.config import ExperimentConfig, TrackingConfig, flatten_config
from detloop.data.rundir import RunDir, RunsRoot

logger = logging.getLogger(__name__)

RUN_DIR_TAG = "detloop.run_dir"
# the experiment tag MLflow's UI reads to choose its views; the model-training kind
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# metrics of the AL curve, logged again stepped by the labeled image count as ``<name>_vs_labeled``
CURVE_METRICS = ("map", "map50", "test_map", "test_map50")
VS_LABELED = "_vs_labeled"
# stores the driver opens itself (SQLAlchemy URIs): artifacts beside the runs root
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


class LoopCallback:
    """Hooks the loop calls; every hook is a no-op here."""

    def on_start(self, run: RunDir, meta: dict[str, Any]) -> None:
        """The loop starts or resumes."""

    def on_iteration(
        self, iteration: int, metrics: dict[str, float], artifacts: list[Path]
    ) -> None:
        """An iteration completed its ``log`` phase."""

    def on_series(self, name: str, points: list[tuple[int, float]]) -> None:
        """A metric over steps (e.g. a loss per epoch of one training)."""

    def on_tag(self, key: str, value: str) -> None:
        """Something a person should see on the run (e.g. a health warning)."""

    def on_end(self, status: str) -> None:
        """The loop finished (``FINISHED``) or failed (``FAILED``)."""


def tracking_uri(cfg: ExperimentConfig) -> str:
    return cfg.tracking.uri or RunsRoot(cfg.runs_root).tracking_uri


def _client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def local_artifacts(uri: str) -> bool:
    """Whether experiments created on ``uri`` get an artifact location of their own under the
    runs root: a database store the driver opens itself does; a tracking server (``http://``,
    ``https://``, ``databricks``, ...) places the artifacts itself (its proxy)."""
    from urllib.parse import urlsplit

    return urlsplit(uri).scheme.split("+")[0] in DATABASE_SCHEMES


def experiment_id(client: Any, cfg: ExperimentConfig) -> str:
    """The experiment named after the config, created with an explicit artifact location on a
    database store (none on a tracking server) and marked as a model-training experiment (an
    existing one without a kind is marked when detloop first uses it)."""
    exp = client.get_experiment_by_name(cfg.name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        if not local_artifacts(client.tracking_uri) and exp.artifact_location.startswith("file:"):
            logger.warning(
                "experiment %r was created on its SQLite file: its artifacts go to %s on the "
                "machine that logs them, not through the tracking server (a new experiment name "
                "gets the server's artifact proxy)",
                cfg.name,
                exp.artifact_location,
            )
        return str(exp.experiment_id)
    location = None
    if local_artifacts(client.tracking_uri):
        location = (RunsRoot(cfg.runs_root).artifacts / cfg.name).resolve().as_uri()
    try:
        return str(
            client.create_experiment(
                cfg.name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        )
    except Exception:  # created concurrently by another loop of the grid
        exp = client.get_experiment_by_name(cfg.name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def run_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The config as MLflow params: dotted keys, string values, any URL in them without
    credentials (``tracking.uri`` is refused with any; a label server's URL may have some)."""
    return {
        k: TrackingConfig.redact(v) if "://" in v else v for k, v in flatten_config(cfg).items()
    }


_NOT_IN_KEYS = re.compile(r"[^/\w.\- ]")


def metric_key(name: str) -> str:
    """``name`` as an MLflow metric key: a character MLflow refuses in one (it allows
    letters, digits, ``_ - . /`` and spaces) becomes ``_``, and a key that is not a plain
    relative path (``a/../b``, ``a//b``) has its slashes replaced too. Per-class metrics carry
    the dataset's class names (``test_ap/<class>``), which may hold any character."""
    key = _NOT_IN_KEYS.sub("_", name)
    norm = posixpath.normpath(key)
    if norm != key or norm.startswith(("..", "/")) or norm == ".":
        key = key.replace("/", "_")
    return key


def curve_metrics(loop: str, metrics: dict[str, float]) -> list[tuple[str, float, int]]:
    """The AL curve's points of one iteration as ``(<name>_vs_labeled, value, labeled
    images)``: of the AL loop only (an SSL loop's labeled set does not grow), and none for an
    iteration without a model's numbers (the auto-labeling after the loop)."""
    if loop != "al" or "labeled_images" not in metrics:
        return []
    step = int(metrics["labeled_images"])
    return [(k + VS_LABELED, float(metrics[k]), step) for k in CURVE_METRICS if k in metrics]


def prepare_store(cfg: ExperimentConfig) -> None:
    """Create the store and the experiment once, before concurrent loops open them (SQLite
    schema creation is not safe to race)."""
    if cfg.tracking.enabled:
        experiment_id(_client(tracking_uri(cfg)), cfg)


class MlflowTracker(LoopCallback):
    """Logs a loop to MLflow; the run id lives in ``run.json`` so a resume reattaches."""

    def __init__(self, cfg: ExperimentConfig, tags: dict[str, str]) -> None:
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.tags = tags
        self.client: Any = None
        self.run_id: str | None = None

    def on_start(self, run: RunDir, meta: dict[str, Any]) -> None:
        self.client = _client(self.uri)
        exp_id = experiment_id(self.client, self.cfg)
        run_id = meta.get("mlflow_run_id") or self._find(exp_id, run)
        reattached = run_id is not None
        if run_id is None:
            from mlflow.entities import Param

            created = self.client.create_run(
                exp_id, run_name=run.name, tags={RUN_DIR_TAG: str(run.path.resolve()), **self.tags}
            )
            run_id = created.info.run_id
            params = [Param(k[:250], v[:6000]) for k, v in run_params(self.cfg).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
            for key, value in self.tags.items():
                self.client.set_tag(run_id, key, value)
        logger.info(
            "%s: MLflow run %s (%s) in experiment %s at %s",
            run.name,
            run_id,
            "reattached" if reattached else "new",
            exp_id,
            TrackingConfig.redact(self.uri),
        )
        self.run_id = run_id
        meta["mlflow_run_id"] = run_id

    def _find(self, exp_id: str, run: RunDir) -> str | None:
        """A run created for this directory before a crash could record its id."""
        path = str(run.path.resolve()).replace("'", "\\'")
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{path}'")
        return str(found[0].info.run_id) if found else None

    def on_iteration(
        self, iteration: int, metrics: dict[str, float], artifacts: list[Path]
    ) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None, "on_start was not called"
        now = int(time.time() * 1000)
        points = [(k, float(v), iteration) for k, v in sorted(metrics.items())]
        points += curve_metrics(self.cfg.loop, metrics)
        batch = [Metric(metric_key(k), v, now, step) for k, v, step in points]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])
        for path in artifacts:
            if path.is_dir():
                self.client.log_artifacts(
                    self.run_id, str(path), RunDir.artifact_path(iteration, path.name)
                )
            elif path.exists():
                self.client.log_artifact(self.run_id, str(path), RunDir.artifact_path(iteration))

    def on_series(self, name: str, points: list[tuple[int, float]]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None, "on_start was not called"
        now = int(time.time() * 1000)
        key = metric_key(name)
        batch = [Metric(key, float(v), now, int(step)) for step, v in points]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def on_tag(self, key: str, value: str) -> None:
        assert self.run_id is not None, "on_start was not called"
        self.client.set_tag(self.run_id, key, value[:5000])

    def on_end(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
