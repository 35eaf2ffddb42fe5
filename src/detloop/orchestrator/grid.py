"""Experiment grids: strategies x seeds as concurrent loops on one Ray cluster.

Each loop is a coordinator task with ``num_cpus=0`` (it only waits on its actors), so loops never
starve behind training actors. Loops of one seed share the warm-up through the warm-up cache:
the first computes iteration 0, the others wait for it and copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray

from detloop.config import ExperimentConfig, config_snapshot, load_config
from detloop.orchestrator.actors import check_capacity, ensure_ray
from detloop.orchestrator.tracking import prepare_store

logger = logging.getLogger(__name__)


def _loop_task(config: dict[str, Any]) -> tuple[str, int]:
    """Run (or resume) one loop inside a Ray task; returns (run directory, exit code)."""
    from detloop.config import build_config
    from detloop.orchestrator.cli import execute
    from detloop.orchestrator.runs import create_run, stored_config

    cfg = build_config(config)
    run = create_run(cfg)
    return str(run.path), execute(run, stored_config(run))


def grid_configs(
    config: Path, overrides: list[str], strategies: list[str], seeds: list[int]
) -> list[ExperimentConfig]:
    """One validated config per (strategy, seed)."""
    return [
        load_config(config, [*overrides, f"al.strategy={s}", f"seed={seed}"])
        for seed in seeds
        for s in strategies
    ]


def run_grid(config: Path, overrides: list[str], strategies: list[str], seeds: list[int]) -> int:
    """Run every (strategy, seed) loop concurrently; returns 0 when all succeed."""
    cfgs = grid_configs(config, overrides, strategies, seeds)
    ensure_ray(cfgs[0].ray, loops=len(cfgs))
    check_capacity(cfgs[0].ray, loops=len(cfgs))
    prepare_store(cfgs[0])
    task = ray.remote(num_cpus=0, max_retries=0)(_loop_task)
    refs = [task.remote(config_snapshot(c)) for c in cfgs]
    failed = 0
    for ref, cfg in zip(refs, cfgs, strict=True):
        path, code = ray.get(ref)
        status = "ok" if code == 0 else f"failed (exit {code}); resume: detloop resume {path}"
        print(f"{cfg.al.strategy} seed {cfg.seed}: {path} {status}")  # noqa: T201
        failed += code != 0
    return 1 if failed else 0
