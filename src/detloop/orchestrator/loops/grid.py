"""Experiment grids: strategies x seeds (x the values of varied config keys) as concurrent
loops on one Ray cluster.

Each loop is a coordinator task with ``num_cpus=0`` (it only waits on its actors), so loops never
starve behind training actors. Loops of one seed share the warm-up (AL) or the teacher (SSL)
through the warm-up cache: the first computes iteration 0, the others wait for it and copy.
Varied keys (``vary``, ``detloop grid --vary KEY=V1,V2``) are crossed with the rest, e.g. the
3D study's variants (``ssl.oracle_variant``, ALGORITHMS §11.8) or PLS's (``ssl.pls``, §11.7):
one loop and one MLflow run per combination, each with its own run directory.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detloop.config import (
    ConfigError,
    ExperimentConfig,
    build_config,
    config_snapshot,
    load_config,
)
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.actors import check_capacity, coordinator_tasks, ensure_ray
from detloop.orchestrator.engine.runs import (
    check_inputs,
    create_run,
    run_dir_for,
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


#: (config key, its values): one dimension of a grid beyond strategies and seeds
Vary = Sequence[tuple[str, Sequence[str]]]


def grid_configs(
    config: Path,
    overrides: list[str],
    strategies: list[str],
    seeds: list[int],
    vary: Vary = (),
) -> list[ExperimentConfig]:
    """One validated config per (seed, strategy, combination of the ``vary`` values): the AL
    query strategy, or with ``loop: ssl`` the pseudo-label selection strategy; each varied key
    takes each of its values (read as YAML, like ``--set``).

    Raises:
        ConfigError: an invalid config; a varied key that ``strategies`` or ``seeds`` sets or
            that is given twice; two configs that would share a run directory.
    """
    key = (
        "ssl.selection_strategy" if load_config(config, overrides).loop == "ssl" else "al.strategy"
    )
    keys = [k for k, _ in vary]
    clashes = [k for k in keys if k in (key, "seed") or keys.count(k) > 1]
    if clashes:
        why = f"given twice, or set by the grid's strategies ({key}) and seeds"
        raise ConfigError("grid --vary", [(k, why) for k in dict.fromkeys(clashes)])
    dims = [[f"{k}={v}" for v in values] for k, values in vary]
    cfgs: list[ExperimentConfig] = []
    labels: list[str] = []
    for seed in seeds:
        for s in strategies:
            for combo in itertools.product(*dims):
                sets = [f"{key}={s}", f"seed={seed}", *combo]
                cfgs.append(load_config(config, [*overrides, *sets]))
                labels.append(" ".join(sets))
    _check_distinct_runs(cfgs, labels)
    return cfgs


def _check_distinct_runs(cfgs: list[ExperimentConfig], labels: list[str]) -> None:
    """Refuse two loops of one grid in one run directory (they would resume each other)."""
    seen: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for cfg, label in zip(cfgs, labels, strict=True):
        run = run_dir_for(cfg)
        where = str(run.path)
        if where in seen:
            problems.append(
                (
                    f"{cfg.name}/{run.name}",
                    f"{seen[where]!r} and {label!r} would share this run directory: the run name "
                    "holds the strategy, the seed, ssl.pls and ssl.oracle_variant, not every "
                    "varied key (vary `name` alongside to keep them apart)",
                )
            )
        seen.setdefault(where, label)
    if problems:
        raise ConfigError("grid", problems)


def run_grid(
    config: Path,
    overrides: list[str],
    strategies: list[str],
    seeds: list[int],
    vary: Vary = (),
) -> list[LoopOutcome]:
    """Run every (strategy, seed, varied values) loop concurrently; the outcome of each, in
    grid order."""
    return run_configs(grid_configs(config, overrides, strategies, seeds, vary))


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
