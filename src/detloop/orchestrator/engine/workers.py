"""What a loop asks of its workers, and the plain worker classes that do it.

``Workers`` is the contract between a loop and its compute: start, train, predict shards, shut
down, with typed results (``TrainOutcome``, ``ShardResult``). ``engine/actors.py`` implements it
with Ray actors built from the plain classes below (``ray.remote(**resources)(cls)``, the only
place that does); tests implement it with in-process fakes. Each worker method delegates to
``detloop.learners`` and reports the compute seconds it spent, so the loop can tell
orchestration overhead from work.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pyarrow as pa

from detloop.config import ExperimentConfig, build_config
from detloop.console import quiet_dependency_warnings, set_process_default

logger = logging.getLogger(__name__)


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(int(n))


@dataclass(frozen=True)
class ShardResult:
    """Predictions of one shard with the compute time spent on it and what the decoding bounds
    changed (``PredictStats`` as a dict: capped stds, dropped degenerate boxes)."""

    key: str
    shard: int
    table: pa.Table
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainJob:
    """One training: the labeled ``images`` and their ``labels``, a ``num_classes`` model, the
    checkpoint directory ``out_dir`` (a partial checkpoint there is resumed), the seed, ``val``
    (images, gt) for early stopping, and the weights to start from."""

    images: pa.Table
    labels: pa.Table
    num_classes: int
    out_dir: str
    seed: int
    val: tuple[pa.Table, pa.Table] | None = None
    init_weights: str | None = None
    # SSL student: (images, pseudo-labels) of the second stream, and the epochs and step cap
    # when they differ from ``train.epochs`` / ``train.max_steps`` (students, self-training)
    pseudo: tuple[pa.Table, pa.Table] | None = None
    epochs: int | None = None
    max_steps: int | None = None
    # early stopping's val interval in steps when it differs from ``train.eval_steps``
    # (``ssl.student_eval_steps``)
    eval_steps: int | None = None
    # early stopping's patience when it differs from ``train.patience`` (``ssl.student_patience``)
    patience: int | None = None
    # the learning-rate schedule when it differs from ``train.lr_schedule``
    # (``ssl.student_lr_schedule``)
    lr_schedule: Literal["cosine", "plateau"] | None = None
    # stop after this step, keeping the partial checkpoint (fault injection: a driver killed
    # mid-training leaves one behind, and the next attempt resumes from it)
    stop_at_step: int | None = None
    # ``ssl.teacher: ema``: the online mean teacher's selection (``pseudo`` holds the
    # unlabeled images; each step's pseudo-labels come from the teacher)
    online: Any = None
    # the data's class names in class-id order (a model bundle in model.weights is matched to
    # them by name)
    class_names: list[str] | None = None
    # ``ssl.method: csd``: the unlabeled images a CSD model trains on beside ``images``
    # (consistency with their flips, ALGORITHMS §11.9); never with ``pseudo``
    unlabeled: pa.Table | None = None


@dataclass(frozen=True)
class PredictJob:
    """One prediction: ``shards`` (id, images, seed) with the model ``weights`` (the bytes of a
    ``model.pt``, ``num_classes`` classes); ``key`` names the weights, so that a worker builds
    each model once."""

    key: str
    weights: bytes
    num_classes: int
    shards: list[tuple[int, pa.Table, int]]


@dataclass(frozen=True)
class TrainOutcome:
    """What one training call produced: the checkpoint directory (``model.pt`` and
    ``metadata.json``), optimizer steps, the last loss, the last epoch's monitors (box RMSE,
    sigma mean and std; absent when undefined) and the compute seconds spent."""

    checkpoint: Path
    steps: int
    final_loss: float
    seconds: float
    monitors: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


class Workers(Protocol):
    """What a loop needs from its compute (``engine/actors.py::Workers`` runs it on Ray)."""

    def start(self) -> None:
        """Start every worker now, so it boots while the driver does other work."""

    def train(self, job: TrainJob) -> TrainOutcome:
        """Run ``job``: train its model into its checkpoint directory."""
        ...

    def predict(
        self,
        job: PredictJob,
        on_result: Callable[[ShardResult], None],
        fault_marker: Callable[[int], str | None] | None = None,
    ) -> float:
        """Run ``job``, handing each finished shard to ``on_result`` as it arrives; returns the
        compute makespan in seconds. ``fault_marker`` (tests): the marker path that makes a
        shard's worker crash, once."""
        ...

    def shutdown(self) -> None:
        """Stop every worker; a later call starts them again."""


def _log_to_driver(info: bool) -> None:
    """Show this actor's log lines (warnings; info too when ``info``) in the driver's output
    (Ray forwards stderr)."""
    log = logging.getLogger("detloop")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO if info else logging.WARNING)
        log.propagate = False  # Ray's root handler would print every line twice


def progress_reporter(progress_key: str | None) -> Any:
    """The worker's progress reporter (``orchestrator/progress.py``), or False for none."""
    if not progress_key:
        return False
    from detloop.orchestrator.engine.progress import KvReporter

    return KvReporter(progress_key)


def within_ray_resources(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` for a Ray worker process: ``train.device: auto`` becomes ``cpu`` when Ray gave
    this worker no GPU. Ray leaves every GPU of the host visible to a worker that reserved
    none (``CUDA_VISIBLE_DEVICES`` is only set for workers holding GPUs), so ``auto`` would
    run on a GPU that other workers reserved."""
    import ray

    if cfg.train.device != "auto" or not ray.is_initialized() or ray.get_gpu_ids():
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})})


class _WorkerProcess:
    """What every worker process does first: quiet the dependencies' warnings, build its
    config and set torch's threads; ``_start`` then readies the worker's own part."""

    def __init__(
        self,
        config: dict[str, Any],
        torch_threads: int | None = None,
        progress_key: str | None = None,
    ) -> None:
        quiet_dependency_warnings()  # an entry point: this is a new worker process
        self.cfg: ExperimentConfig = within_ray_resources(build_config(config))
        _set_threads(torch_threads)
        self._start(progress_key)

    def _start(self, progress_key: str | None) -> None:
        raise NotImplementedError

    def node(self) -> tuple[str, str]:
        """(Ray node id, IP) of the node this worker runs on (an actor's placement)."""
        from detloop.orchestrator.engine.placement import this_node

        return this_node()


class TrainWorker(_WorkerProcess):
    """Trains one model per call; resumes from a partial checkpoint in ``out_dir``.

    ``progress_key``: where its training bar is published for the driver to draw (None: no
    bar, and only warnings reach the driver's output).
    """

    def _start(self, progress_key: str | None) -> None:
        _log_to_driver(info=progress_key is not None)
        self._progress = progress_reporter(progress_key)
        import detloop.learners.train  # noqa: F401 - pay the torch/effdet import while idle

    def train(self, job: TrainJob) -> TrainOutcome:
        """Train and return what it produced (checkpoint, steps, loss, monitors, seconds)."""
        return run_train_job(self.cfg, job, self._progress)


def job_config(cfg: ExperimentConfig, job: TrainJob) -> ExperimentConfig:
    """``cfg`` with the job's ``epochs``, ``max_steps``, ``eval_steps``, ``patience`` and
    ``lr_schedule`` (when set) in place of ``train``'s."""
    update = {
        "epochs": job.epochs,
        "max_steps": job.max_steps,
        "eval_steps": job.eval_steps,
        "patience": job.patience,
        "lr_schedule": job.lr_schedule,
    }
    given = {k: v for k, v in update.items() if v is not None}
    if not given:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=given)})


def run_train_job(
    cfg: ExperimentConfig,
    job: TrainJob,
    progress: Any,
    data_parallel: Any = None,
    torch_threads: int | None = None,
) -> TrainOutcome:
    """``job`` trained with ``cfg`` (``job_config``); what a train worker does, in whichever
    process runs it (``data_parallel``: its rank of a data-parallel
    training, ``learners.data_parallel.DataParallel``)."""
    from detloop.learners.train import train_model

    _set_threads(torch_threads)
    t0 = time.perf_counter()
    cfg = job_config(cfg, job)
    result = train_model(
        cfg,
        job.images,
        job.labels,
        job.num_classes,
        Path(job.out_dir),
        seed=job.seed,
        val=job.val,
        init_weights=Path(job.init_weights) if job.init_weights else None,
        progress=progress,
        pseudo=job.pseudo,
        stop_at_step=job.stop_at_step,
        online=job.online,
        class_names=job.class_names,
        data_parallel=data_parallel,
        unlabeled=job.unlabeled,
    )
    return TrainOutcome(
        checkpoint=Path(result.checkpoint),
        steps=int(result.steps),
        final_loss=float(result.final_loss),
        seconds=time.perf_counter() - t0,
        monitors={k: float(v) for k, v in result.monitors.items()},
        history=list(result.history),
    )


class ShardPredictor:
    """What a predict worker does, in whichever process: the model of one ``key`` (one
    iteration's weights) built on first use and reused for every shard of that key."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.key: str | None = None
        self.predictor: Any = None

    def ensure(self, key: str, weights: bytes, num_classes: int) -> Any:
        """The predictor of ``key``'s weights."""
        if key != self.key:
            from detloop.learners.predict import Predictor

            self.predictor = Predictor.from_state(weights, self.cfg, num_classes)
            self.key = key
        return self.predictor

    def predict(
        self, key: str, weights: bytes, num_classes: int, shard: int, images: pa.Table, seed: int
    ) -> ShardResult:
        """One shard's predictions; building the key's model counts in its seconds."""
        t0 = time.perf_counter()
        predictor = self.ensure(key, weights, num_classes)
        table = predictor.predict(images, seed=seed)
        stats = predictor.last_stats.as_dict()
        return ShardResult(key, shard, table, time.perf_counter() - t0, stats)


class PredictWorker(_WorkerProcess):
    """Predicts shards of images with the model of the current iteration (``ShardPredictor``).

    The weights arrive through Ray's object store, not from disk. Constructing a worker imports
    torch and the learner (about 5 s), so an actor created early is ready when its first shard
    arrives; it needs nothing from the data, which may still be importing.

    ``progress_key``: where the bar of each ``Predictor.predict`` call of this process is
    published for the driver to draw (it becomes the process default; None: no bar).
    """

    def _start(self, progress_key: str | None) -> None:
        self._shards = ShardPredictor(self.cfg)
        set_process_default(progress_reporter(progress_key))
        import detloop.learners.predict  # noqa: F401 - pay the torch/effdet import while idle

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
        if fault_marker and not os.path.exists(fault_marker):
            half = images.slice(0, max(1, images.num_rows // 2))
            self._shards.ensure(key, weights, num_classes).predict(half, seed=seed)
            Path(fault_marker).touch()
            logger.warning("fault injection: predict worker exits mid-shard %d", shard)
            os._exit(1)
        return self._shards.predict(key, weights, num_classes, shard, images, seed)
