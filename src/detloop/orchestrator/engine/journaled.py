"""``JournaledLoop``: what every journaled loop shares (active learning now; the semi-supervised
loop and the auto-labeling run are to be built on it too).

A loop is a plan — a list of ``Step(iteration, phase)``, plain data — and a handler per phase.
The base runs the plan: it journals each step in ``run.json`` (``started`` before the work,
``completed`` with the handler's numbers after it) and skips completed steps on a resume; it
derives every seed from (seed, iteration, stage), injects faults for tests, calls the callbacks
(``on_start``, ``on_iteration``, ``on_end``), and starts and shuts down the workers. A subclass
says only what its steps are and what each phase does::

    class TeachLoop(JournaledLoop):
        def plan(self) -> list[Step]:
            return [Step(r, p) for r in range(3) for p in (Phase.TRAIN, Phase.EVALUATE)]

        def handlers(self) -> Mapping[Phase, Handler]:
            return {Phase.TRAIN: self._train, Phase.EVALUATE: self._evaluate}

Handlers must be idempotent (re-running one that was interrupted half-way gives the same
outputs): a run killed anywhere then resumes at the step it was in (``resume_command``), losing
nothing and doing nothing twice. A handler that must wait for the outside world raises
``Paused``; ``execute`` then returns its status and a later resume continues.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from detloop import console
from detloop.config import ExperimentConfig
from detloop.data.rundir import RunDir
from detloop.orchestrator.engine.journal import Journal, Phase
from detloop.orchestrator.engine.progress import phase_line
from detloop.orchestrator.engine.tracking import LoopCallback
from detloop.orchestrator.engine.workers import Workers
from detloop.seeding import derive_seed

logger = logging.getLogger(__name__)

#: A phase's work for one iteration; returns the numbers to journal with the step (or None).
Handler = Callable[[int], dict[str, Any] | None]
#: Builds a loop's workers from its config (default: Ray actors, ``engine/actors.py``).
WorkersFactory = Callable[[ExperimentConfig], Workers]
#: What an injected fault does at its point (default: SIGKILL this process).
FaultAction = Callable[[str], None]


class Step(NamedTuple):
    """One entry of a loop's plan: ``phase`` of ``iteration`` (or round)."""

    iteration: int
    phase: Phase


class Paused(Exception):
    """Raised by a handler to stop the loop until something outside it happens (people label,
    review); ``execute`` returns ``status`` and callbacks end with ``SCHEDULED``."""

    status = "paused"


def resume_command(run: RunDir) -> str:
    """The command that continues a stopped, failed or killed loop of ``run``."""
    return f"detloop resume {run.path}"


def _sigkill(point: str) -> None:
    logger.warning("fault injection: killing the driver at %s", point)
    os.kill(os.getpid(), signal.SIGKILL)


def default_workers(cfg: ExperimentConfig) -> Workers:
    """Ray actors, or this process with ``ray.in_process``."""
    if cfg.ray.in_process:
        from detloop.orchestrator.engine.local_workers import LocalWorkers

        return LocalWorkers(cfg)
    from detloop.orchestrator.engine.actors import Workers as RayWorkers
    from detloop.orchestrator.engine.actors import check_capacity, ensure_ray

    ensure_ray(cfg.ray, train_workers=cfg.train.workers)
    check_capacity(cfg.ray, train_workers=cfg.train.workers)
    return RayWorkers(cfg)


class JournaledLoop:
    """The journaled state machine of one run; subclasses give ``plan`` and ``handlers``.

    ``unit`` is what progress lines call an iteration (``round`` for SSL).

    Args:
        run: the run directory (with its ``run.json``).
        cfg: the run's config.
        callbacks: hooks called at start, after each logged iteration and at the end.
        workers_factory: builds the workers on first use (default: Ray actors, or this
            process with ``ray.in_process``).
        fault_action: what a fault point of ``cfg.fault.kill_at`` does once it fires
            (default: SIGKILL; in-process tests raise instead).
    """

    unit = "iteration"

    def __init__(
        self,
        run: RunDir,
        cfg: ExperimentConfig,
        callbacks: Sequence[LoopCallback] = (),
        workers_factory: WorkersFactory | None = None,
        fault_action: FaultAction | None = None,
    ) -> None:
        self.run = run
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.journal = Journal(run)
        self._workers_factory = workers_factory or default_workers
        self._workers: Workers | None = None
        self._fault_action = fault_action or _sigkill
        self.set_up()

    # ---- what a subclass provides ---------------------------------------------------------
    def set_up(self) -> None:
        """The subclass's own state from ``run`` and ``cfg`` (called at the end of ``__init__``,
        so subclasses keep the base constructor)."""

    def plan(self) -> list[Step]:
        """Every step after the prologue, in order (may read what the prologue produced)."""
        raise NotImplementedError

    def handlers(self) -> Mapping[Phase, Handler]:
        """The handler of each phase of ``prologue`` and ``plan``."""
        raise NotImplementedError

    def prologue(self) -> list[Step]:
        """Steps run first, beside the workers' start-up (e.g. importing the data)."""
        return []

    def last_iteration(self) -> int | None:
        """The last iteration, for progress lines (None: not known yet)."""
        return None

    def close(self) -> None:
        """Release what the subclass holds; called once whenever ``execute`` ends."""

    # ---- services for the handlers ---------------------------------------------------------
    @property
    def workers(self) -> Workers:
        """The loop's workers, built on first use."""
        if self._workers is None:
            self._workers = self._workers_factory(self.cfg)
        return self._workers

    def seed(self, iteration: int, stage: str) -> int:
        """The seed of one stochastic stage (ARCHITECTURE §8), recorded in ``run.json``."""
        value = derive_seed(self.cfg.seed, iteration, stage)
        seeds = self.journal.meta.setdefault("seeds", {})
        seeds[f"{iteration}/{stage}"] = value
        return value

    def fault_pending(self, iteration: int, phase: Phase, where: str) -> bool:
        """Whether the fault point ``ITERATION:PHASE[:mid]`` is configured and has not fired."""
        point = f"{iteration}:{phase}" + (":mid" if where == "mid" else "")
        return point in self.cfg.fault.kill_at and not self.run.fault_marker(point).exists()

    def _fault(self, iteration: int, phase: Phase, where: str) -> None:
        """Fault injection (tests): fire once at a configured point, ``ITERATION:PHASE`` at the
        end of a phase or ``ITERATION:PHASE:mid`` half-way (where a handler calls this)."""
        point = f"{iteration}:{phase}" + (":mid" if where == "mid" else "")
        if point not in self.cfg.fault.kill_at:
            return
        marker = self.run.fault_marker(point)
        if marker.exists():
            return
        marker.touch()
        self._fault_action(point)

    def notify_iteration(
        self, iteration: int, metrics: dict[str, float], artifacts: list[Path]
    ) -> None:
        """Hand an iteration's numbers and files to the callbacks (e.g. MLflow)."""
        for cb in self.callbacks:
            cb.on_iteration(iteration, metrics, artifacts)

    def notify_series(self, name: str, points: list[tuple[int, float]]) -> None:
        """Hand a metric over steps (e.g. a loss per epoch) to the callbacks."""
        for cb in self.callbacks:
            cb.on_series(name, points)

    def warn(self, key: str, message: str) -> None:
        """A health warning: a log line and a tag ``warning.<key>`` on the tracked run."""
        logger.warning("%s: %s", self.run.name, message)
        for cb in self.callbacks:
            cb.on_tag(f"warning.{key}", message)

    @property
    def resume_command(self) -> str:
        return resume_command(self.run)

    # ---- driver ----------------------------------------------------------------------------
    def execute(self) -> str:
        """Run (or resume) to the end; returns ``done`` or the status of a ``Paused``."""
        try:
            self._set_up()
            plan = self.plan()
            for step in plan:
                if not self.journal.is_completed(*step):
                    self.run_step(step)
            self.journal.complete(plan[-1].iteration if plan else 0, Phase.DONE)
        except Paused as paused:
            self._end("SCHEDULED")
            return paused.status
        except BaseException:
            self._end("FAILED")
            raise
        finally:
            self.close()
            if self._workers is not None:
                self._workers.shutdown()
        self._end("FINISHED")
        return str(Phase.DONE)

    def _end(self, status: str) -> None:
        for cb in self.callbacks:
            cb.on_end(status)

    def _completed(self, steps: list[Step]) -> bool:
        return all(self.journal.is_completed(*s) for s in steps)

    def _set_up(self) -> None:
        """Start-up work, side by side where it is independent.

        Starting Ray (~4 s) and booting the actors (each imports torch and the learner, ~5 s)
        need nothing from the tracking store or the data, so they run in this thread (Ray wants
        the main thread) while a helper thread starts the callbacks (MLflow: ~2 s of imports
        on first use) and runs the prologue; the actors keep booting through the first steps.
        Only the helper touches the journal until it is joined.
        """
        started = self._completed(self.prologue())
        finished = started and self._completed(self.plan())
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="detloop-setup") as pool:
            job = pool.submit(self._start_and_prologue)
            try:
                if not finished:
                    self.workers.start()
            finally:
                job.result()  # its error, if any, wins: it names the bad file or store

    def _start_and_prologue(self) -> None:
        for cb in self.callbacks:
            cb.on_start(self.run, self.journal.meta)
        self.journal.save()
        for step in self.prologue():
            if not self.journal.is_completed(*step):
                self.run_step(step)

    def run_step(self, step: Step) -> None:
        """Journal ``step`` as started, run its handler, journal it completed with the
        handler's numbers, then fire a fault configured at its end."""
        iteration, phase = step
        last = self.last_iteration()
        console.say(phase_line(self.run.name, iteration, last, str(phase), self.unit))
        self.journal.start(iteration, phase)
        info = self.handlers()[phase](iteration) or {}
        self.journal.complete(iteration, phase, **info)
        self._fault(iteration, phase, "end")
