"""``LocalWorkers``: a loop's training and prediction in the driver process (``ray.in_process``).

The same ``TrainWorker`` and ``PredictWorker`` code the Ray actors run, called directly: one
model trains, shards are predicted one after the other, each handed to the loop as it finishes
(so a resume skips the persisted ones exactly as with Ray). What it saves is Ray's start-up and
the actors' boot (~10 s), which dominates small jobs — an auto-labeling run on a few hundred
frames, a CI test; what it gives up is parallelism and the restart of a crashed worker (a crash
here is the driver's, and the journal resumes it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from detloop import console
from detloop.config import ExperimentConfig
from detloop.orchestrator.engine.workers import (
    PredictJob,
    ShardPredictor,
    ShardResult,
    TrainJob,
    TrainOutcome,
    run_train_job,
)


class LocalWorkers:
    """``Workers`` (``engine/workers.py``) in this process; the model of the last prediction
    key is kept until the next key or ``shutdown``."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self._shards = ShardPredictor(cfg)

    def start(self) -> None:
        """Nothing to boot ahead: the first call builds what it needs."""

    def train(self, job: TrainJob) -> TrainOutcome:
        if self.cfg.train.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.train.torch_threads)
        return run_train_job(self.cfg, job, console.mode() != "off")

    def predict(
        self,
        job: PredictJob,
        on_result: Callable[[ShardResult], None],
        fault_marker: Callable[[int], str | None] | None = None,
    ) -> float:
        """Predict the shards in order, each handed to ``on_result`` as it is done;
        ``fault_marker`` does not apply (a worker crash here is the driver's own)."""
        t0 = time.perf_counter()
        for sid, images, seed in job.shards:
            on_result(
                self._shards.predict(job.key, job.weights, job.num_classes, sid, images, seed)
            )
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        self._shards = ShardPredictor(self.cfg)
