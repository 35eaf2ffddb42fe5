"""Plain worker classes: what a Ray actor does, testable in-process without Ray.

``orchestrator/actors.py`` alone turns them into actors (``ray.remote(**resources)(cls)``).
Each method delegates to ``detloop.learners`` and reports the compute seconds it spent, so the
loop can tell orchestration overhead from work.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from detloop.config import ExperimentConfig, build_config

logger = logging.getLogger(__name__)
# effdet scripts a few helpers with torch.jit, which torch now flags on every worker start.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


@dataclass(frozen=True)
class ShardResult:
    """Predictions of one shard with the compute time spent on it."""

    key: str
    shard: int
    table: pa.Table
    seconds: float


def _log_to_driver() -> None:
    """Show this actor's progress lines in the driver's output (Ray forwards stderr)."""
    log = logging.getLogger("detloop")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # Ray's root handler would print every line twice


class TrainWorker:
    """Trains one model per call; resumes from a partial checkpoint in ``out_dir``."""

    def __init__(self, config: dict[str, Any], torch_threads: int | None = None) -> None:
        self.cfg: ExperimentConfig = build_config(config)
        _set_threads(torch_threads)
        _log_to_driver()
        import detloop.learners.train  # noqa: F401 - pay the torch/effdet import while idle

    def train(
        self,
        images: pa.Table,
        labels: pa.Table,
        num_classes: int,
        out_dir: str,
        seed: int,
        val: tuple[pa.Table, pa.Table] | None = None,
        init_weights: str | None = None,
    ) -> dict[str, Any]:
        """Train and return the result record (checkpoint path, steps, loss, compute seconds)."""
        from detloop.learners.train import train_model

        t0 = time.perf_counter()

        def on_epoch(epochs: int, _model: Any) -> None:
            logger.info("training: %d epoch(s) done, %.0f s", epochs, time.perf_counter() - t0)

        result = train_model(
            self.cfg,
            images,
            labels,
            num_classes,
            Path(out_dir),
            seed=seed,
            val=val,
            init_weights=Path(init_weights) if init_weights else None,
            progress=False,
            on_epoch=on_epoch,
        )
        return {
            "checkpoint": str(result.checkpoint),
            "steps": int(result.steps),
            "final_loss": float(result.final_loss),
            "monitors": result.monitors,
            "seconds": time.perf_counter() - t0,
        }


class PredictWorker:
    """Predicts shards of images with the model of the current iteration.

    The model is built once per ``key`` (one iteration's weights) and reused for every shard of
    that key; the weights arrive through Ray's object store, not from disk. Constructing a
    worker imports torch and the learner (about 5 s), so an actor created early is ready when
    its first shard arrives; it needs nothing from the data, which may still be importing.
    """

    def __init__(self, config: dict[str, Any], torch_threads: int | None = None) -> None:
        self.cfg: ExperimentConfig = build_config(config)
        self._key: str | None = None
        self._predictor: Any = None
        _set_threads(torch_threads)
        import detloop.learners.predict  # noqa: F401 - pay the torch/effdet import while idle

    def _ensure(self, key: str, weights: bytes, num_classes: int) -> None:
        if key != self._key:
            from detloop.learners.predict import Predictor

            self._predictor = Predictor.from_state(weights, self.cfg, num_classes)
            self._key = key

    def predict_shard(
        self,
        key: str,
        weights: bytes,
        num_classes: int,
        shard: int,
        images: pa.Table,
        seed: int,
        fault_marker: str | None = None,
    ) -> ShardResult:
        """Predict one shard. Idempotent: the same inputs give the same table.

        ``fault_marker`` (tests only): the first call that sees this path absent creates it and
        kills its own process half-way through the shard, as a crashed worker would.
        """
        t0 = time.perf_counter()  # building this iteration's model is part of the work
        self._ensure(key, weights, num_classes)
        if fault_marker and not os.path.exists(fault_marker):
            half = images.slice(0, max(1, images.num_rows // 2))
            self._predictor.predict(half, seed=seed)
            Path(fault_marker).touch()
            logger.warning("fault injection: predict worker exits mid-shard %d", shard)
            os._exit(1)
        table = self._predictor.predict(images, seed=seed)
        return ShardResult(key, shard, table, time.perf_counter() - t0)
