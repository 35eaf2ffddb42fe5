"""Experiment grids: strategies x seeds as concurrent loops on one Ray cluster.

Each loop is a coordinator task with ``num_cpus=0`` (it only waits on its actors), so loops never
starve behind training actors. Loops of one seed share the warm-up (AL) or the teacher (SSL)
through the warm-up cache: the first computes iteration 0, the others wait for it and copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from detloop.config import ExperimentConfig, build_config, config_snapshot, load_config
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.actors import check_capacity, coordinator_tasks, ensure_ray
from detloop.orchestrator.engine.runs import (
    check_inputs,
    create_run,
    stored_config,
    strategy_name,
)
from detloop.orchestrator.engine.tracking import prepare_store
from detloop.orchestrator.loops.execute import LoopOutcome, execute

logger = logging.getLogger(__name__)


def _loop_task(config: dict[str, Any]) -> tuple[str, str, str | None]:
    """Run (or resume) one loop inside a Ray task; returns (run directory, final status, the
    input problem that stopped it)."""
    cfg = build_config(config)
    run = create_run(cfg)
    outcome = execute(run, stored_config(run))
    return str(run.path), outcome.status, outcome.problem


def grid_configs(
    config: Path, overrides: list[str], strategies: list[str], seeds: list[int]
) -> list[ExperimentConfig]:
    """One validated config per (strategy, seed): the AL query strategy, or with ``loop: ssl``
    the pseudo-label selection strategy."""
    key = (
        "ssl.selection_strategy" if load_config(config, overrides).loop == "ssl" else "al.strategy"
    )
    return [
        load_config(config, [*overrides, f"{key}={s}", f"seed={seed}"])
        for seed in seeds
        for s in strategies
    ]


def run_grid(
    config: Path, overrides: list[str], strategies: list[str], seeds: list[int]
) -> list[LoopOutcome]:
    """Run every (strategy, seed) loop concurrently; the outcome of each, in grid order."""
    return run_configs(grid_configs(config, overrides, strategies, seeds))


def run_configs(cfgs: list[ExperimentConfig]) -> list[LoopOutcome]:
    """Run (or resume) one loop per config concurrently on one Ray cluster, sized for all of
    them when it is started here; the outcome of each, in order."""
    if not cfgs:
        return []
    for cfg in {str(c.model.weights): c for c in cfgs}.values():
        check_inputs(cfg)  # model.weights: each distinct file once
    workers = cfgs[0].train.workers
    ensure_ray(cfgs[0].ray, loops=len(cfgs), train_workers=workers)
    check_capacity(cfgs[0].ray, loops=len(cfgs), train_workers=workers)
    for cfg in {(str(c.runs_root), c.tracking.uri, c.name): c for c in cfgs}.values():
        prepare_store(cfg)
    results = coordinator_tasks(_loop_task, [config_snapshot(c) for c in cfgs])
    outcomes = [LoopOutcome(RunDir(Path(p)), status, why) for p, status, why in results]
    for cfg, outcome in zip(cfgs, outcomes, strict=True):
        logger.info(
            "%s seed %d: %s %s", strategy_name(cfg), cfg.seed, outcome.run.path, outcome.status
        )
    return outcomes
