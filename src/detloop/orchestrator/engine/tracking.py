"""MLflow tracking as a loop callback: one MLflow run per loop, reattached on resume.

Store: ``tracking.uri`` or SQLite at ``<runs_root>/mlflow.db`` with artifacts under
``<runs_root>/mlartifacts`` (set explicitly, never ``./mlruns``). Metrics are stepped by
iteration and sent with ``log_batch``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from detloop.config import ExperimentConfig, flatten_config
from detloop.data.rundir import RunDir, RunsRoot

logger = logging.getLogger(__name__)

RUN_DIR_TAG = "detloop.run_dir"


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


def experiment_id(client: Any, cfg: ExperimentConfig) -> str:
    """The experiment named after the config, created with an explicit artifact location."""
    exp = client.get_experiment_by_name(cfg.name)
    if exp is not None:
        return str(exp.experiment_id)
    location = (RunsRoot(cfg.runs_root).artifacts / cfg.name).resolve().as_uri()
    try:
        return str(client.create_experiment(cfg.name, artifact_location=location))
    except Exception:  # created concurrently by another loop of the grid
        exp = client.get_experiment_by_name(cfg.name)
        if exp is None:
            raise
        return str(exp.experiment_id)


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
        if run_id is None:
            from mlflow.entities import Param

            created = self.client.create_run(
                exp_id, run_name=run.name, tags={RUN_DIR_TAG: str(run.path.resolve()), **self.tags}
            )
            run_id = created.info.run_id
            params = [Param(k[:250], v[:6000]) for k, v in flatten_config(self.cfg).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
            for key, value in self.tags.items():
                self.client.set_tag(run_id, key, value)
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
        batch = [Metric(k, float(v), now, iteration) for k, v in sorted(metrics.items())]
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
        batch = [Metric(name, float(v), now, int(step)) for step, v in points]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def on_tag(self, key: str, value: str) -> None:
        assert self.run_id is not None, "on_start was not called"
        self.client.set_tag(self.run_id, key, value[:5000])

    def on_end(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
