"""Run or resume the loop of a run directory: the one entry point every front end uses (the
``run``/``resume``/``grid`` verbs, the grid's Ray tasks, the demo, the benches)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from detloop import console
from detloop.config import ExperimentConfig
from detloop.data.errors import DataError
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.journaled import JournaledLoop, resume_command
from detloop.orchestrator.engine.runs import code_version, ray_job_id, strategy_name, study_tags
from detloop.orchestrator.engine.tracking import LoopCallback, MlflowTracker
from detloop.orchestrator.loops.active_learning import ActiveLearningLoop
from detloop.orchestrator.loops.autolabel_run import AutoLabelRun
from detloop.orchestrator.loops.semi_supervised import SemiSupervisedLoop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopOutcome:
    """How a loop ended: ``done``, ``wait_for_labels``, ``failed`` (resumable) or
    ``bad_input`` (resumable once the input named in ``problem`` is fixed)."""

    run: RunDir
    status: str
    problem: str | None = None

    @property
    def exit_code(self) -> int:
        return {"failed": 1, "bad_input": 2}.get(self.status, 0)

    @property
    def resume_command(self) -> str:
        return resume_command(self.run)

    @property
    def stop_message(self) -> str:
        """How a stopped run continues: once its input is fixed, or as it is."""
        if self.status == "bad_input":
            fix = "fix it, then continue the run with"
            return f"error: {self.problem}\n{fix}\n  {self.resume_command}"
        return f"the run failed; continue it with\n  {self.resume_command}"


def loop_class(cfg: ExperimentConfig) -> type[JournaledLoop]:
    """The loop a config asks for (``loop: al``, ``ssl`` or ``autolabel``)."""
    loops: dict[str, type[JournaledLoop]] = {
        "al": ActiveLearningLoop, "ssl": SemiSupervisedLoop, "autolabel": AutoLabelRun
    }  # fmt: skip
    return loops[cfg.loop]


def execute(run: RunDir, cfg: ExperimentConfig) -> LoopOutcome:
    """Run or resume the loop of ``run``; a failure is logged and reported, never raised
    (a ``DataError`` — a missing or malformed input — as ``bad_input``, without a traceback).

    An entry point: it also runs in a Ray task for each loop of ``detloop grid``, a process
    the CLI did not set up, so it sets up what a person sees there too (``detloop.console``).
    """
    console.quiet_dependency_warnings()
    console.ensure_console()
    callbacks: list[LoopCallback] = []
    if cfg.tracking.enabled:
        tags = {
            "strategy": strategy_name(cfg),
            "loop": cfg.loop,
            "dataset": str(cfg.data.pool.source.name) if cfg.data.pool else "",
            "seed": str(cfg.seed),
            "code_version": code_version(),
            "ray_job_id": ray_job_id() or "",
            **study_tags(cfg),  # an SSL run's PLS and 3D-study variants
        }
        callbacks.append(MlflowTracker(cfg, tags))
    loop = loop_class(cfg)(run, cfg, callbacks)
    try:
        return LoopOutcome(run, loop.execute())
    except DataError as err:  # the user's input, not a bug: no traceback, the journal kept
        logger.debug("the loop of %s stopped on its input", run.path, exc_info=True)
        return LoopOutcome(run, "bad_input", problem=str(err))
    except Exception:
        logger.exception("the loop of %s failed", run.path)
        return LoopOutcome(run, "failed")
