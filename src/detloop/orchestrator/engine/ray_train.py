"""Data-parallel training through Ray Train (``train.workers > 1``).

A ``ray.train.torch.TorchTrainer`` runs ``train.workers`` copies of the train bench
(``learners.train.train_model`` with a ``learners.data_parallel.DataParallel`` rank): gloo on
CPU, nccl on GPU, each worker holding ``ray.train_num_cpus``/``ray.train_num_gpus`` and
``ray.train_resources``. The global batch stays ``train.batch_size``, so the learning rate and
schedule are those of one worker.

Checkpoints: rank 0 writes the partial checkpoint into the run directory's iteration folder
(``<checkpoint>.partial``, what a resumed driver reads) and every rank reports it to Ray Train
(``ray.train.report``), which keeps the last one under ``<iteration>/ray_train/`` until the
training is done. A worker that dies restarts the worker group (``train.max_failures`` times);
the new group resumes from the last reported checkpoint (``ray.train.get_checkpoint``). The
driver owns the MLflow run; the workers never log to MLflow, so a restart adds no run.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from detloop.config import ExperimentConfig, build_config, config_snapshot
from detloop.orchestrator.engine.placement import actor_demand
from detloop.orchestrator.engine.workers import TrainJob, TrainOutcome

logger = logging.getLogger(__name__)


def train_data_parallel(
    cfg: ExperimentConfig, job: TrainJob, progress_key: str | None = None
) -> TrainOutcome:
    """Train ``job`` on ``train.workers`` Ray Train workers; the checkpoint rank 0 wrote.

    Raises:
        RuntimeError: the training failed more than ``train.max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(job.out_dir)
    storage = (out.parent / "ray_train").resolve()
    rc = cfg.ray
    resources = actor_demand(rc.train_num_cpus, rc.train_num_gpus, rc.train_resources)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": config_snapshot(cfg),
            "job": job,
            "progress_key": progress_key,
            # fault injection fires once per run (the run directory holds the iterations)
            "kill_marker": str(out.parent.parent / ".fault_train_worker"),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.workers,
            use_gpu=rc.train_num_gpus > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=out.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"data-parallel training failed: {result.error}") from result.error
    outcome = _outcome(out, time.perf_counter() - t0)
    if outcome.checkpoint == out:  # done: Ray Train's copies of the partial checkpoints go
        shutil.rmtree(storage / out.name, ignore_errors=True)
    return outcome


def _outcome(out: Path, seconds: float) -> TrainOutcome:
    """What rank 0 wrote: the checkpoint in ``out`` with its metadata, or the partial one
    next to it when training stopped at ``stop_at_step``; ``seconds``: the wall time of the
    whole fit (worker start-up included)."""
    from detloop.learners.checkpoint import META_FILE, read_metadata
    from detloop.learners.train import MONITORS

    if not (out / META_FILE).is_file():
        partial = out.with_name(out.name + ".partial")
        return TrainOutcome(partial, int(read_metadata(partial)["step"]), float("nan"), seconds)
    meta = read_metadata(out)
    history = list(meta.get("history", []))
    last = history[-1] if history else {}
    return TrainOutcome(
        checkpoint=out,
        steps=int(meta["steps"]),
        final_loss=float(meta["final_loss"]),
        seconds=seconds,
        monitors={k: float(last[k]) for k in MONITORS if k in last},
        history=history,
    )


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its rank of the train bench, then a last report (every rank
    reports as often as the others: ``ray.train.report`` is a barrier; the driver reads the
    checkpoint rank 0 wrote, not the metrics)."""
    import ray.train

    from detloop.console import quiet_dependency_warnings
    from detloop.orchestrator.engine.workers import (
        progress_reporter,
        run_train_job,
        within_ray_resources,
    )

    quiet_dependency_warnings()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = within_ray_resources(build_config(config["config"]))
    job: TrainJob = config["job"]
    threads = cfg.train.torch_threads or max(1, int(cfg.ray.train_num_cpus))
    progress = progress_reporter(config["progress_key"]) if rank == 0 else False
    with _last_checkpoint() as resume_from:
        dp = _rank(cfg, rank, world, resume_from, Path(config["kill_marker"]))
        outcome = run_train_job(cfg, job, progress, data_parallel=dp, torch_threads=threads)
    ray.train.report({"steps": outcome.steps, "final_loss": outcome.final_loss})


@contextmanager
def _last_checkpoint() -> Iterator[Path | None]:
    """The directory of the last checkpoint reported to Ray Train before a restart, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as directory:
        logger.info("resuming data-parallel training from %s", checkpoint.path)
        yield Path(directory)


def _rank(
    cfg: ExperimentConfig, rank: int, world: int, resume_from: Path | None, marker: Path
) -> Any:
    """This worker's ``DataParallel``: reports to Ray Train, the fault hook of the config."""
    import ray.train

    from detloop.learners.data_parallel import DataParallel

    def report(step: int, directory: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report({"step": step}, checkpoint=checkpoint)

    return DataParallel(
        rank,
        world,
        report=report,
        resume_from=resume_from,
        after_step=_kill_hook(cfg, rank, world, marker),
        sync_bn=cfg.train.sync_bn,
    )


def _kill_hook(
    cfg: ExperimentConfig, rank: int, world: int, marker: Path
) -> Callable[[int], None] | None:
    """``fault.kill_train_worker_at_step`` (tests): the last rank exits after that step, once
    per run (the ``marker`` file remembers)."""
    at = cfg.fault.kill_train_worker_at_step
    if at is None or rank != world - 1:
        return None

    def hook(step: int) -> None:
        if step == at and not marker.exists():
            marker.touch()
            logger.warning("fault injection: train worker %d exits after step %d", rank, step)
            time.sleep(0.5)  # let the log line out
            os._exit(1)

    return hook
