"""The loop's journal: which phase of which iteration a run is in, persisted in ``run.json``.

The journal is the loop's only mutable state besides the pool tables. A phase is recorded as
``started`` before its work and ``completed`` after its outputs are written; a resumed run
re-runs the first phase that is not completed. Phases are idempotent, so re-running a phase
that was interrupted half-way produces the same outputs as an uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from detloop.data.rundir import RunDir


class Phase(StrEnum):
    """Loop phases (ARCHITECTURE §8), distinct from image states."""

    IMPORT = "import"
    SPLIT = "split"  # SSL: the labeled part of the pool (ALGORITHMS §11.1)
    PSEUDO_LABEL = "pseudo_label"  # SSL: the teacher's detections kept as pseudo-labels
    TRAIN = "train"
    EVALUATE = "evaluate"
    PREDICT = "predict"
    CALIBRATE = "calibrate"
    THRESHOLD = "threshold"
    SELECT = "select"
    DECIDE = "decide"  # auto-labeling: each frame auto_labeled or sent to examine (§8)
    EXPORT = "export"  # auto-labeling: COCO of the auto-labels, review exports of the rest
    LABEL = "label"
    WAIT_FOR_LABELS = "wait_for_labels"
    LOG = "log"
    DONE = "done"


def iteration_phases(
    iteration: int, *, calibrate: bool, threshold: bool, human: bool, predict: bool = True
) -> list[Phase]:
    """The phases of one iteration, in order.

    Iteration 0 is the warm-up (random selection, no prediction); later iterations predict the
    unlabeled pool with the previous model first (unless nothing reads the predictions:
    ``predict`` false, e.g. ``random``). Human labeling adds a wait after ``label`` (in the
    warm-up too: people label the random first selection).
    """
    phases: list[Phase] = []
    if iteration > 0 and predict:
        phases.append(Phase.PREDICT)
        if calibrate:
            phases.append(Phase.CALIBRATE)
        if threshold:
            phases.append(Phase.THRESHOLD)
    phases += [Phase.SELECT, Phase.LABEL]
    if human:
        phases.append(Phase.WAIT_FOR_LABELS)
    phases += [Phase.TRAIN, Phase.EVALUATE, Phase.LOG]
    return phases


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``phase`` of ``iteration`` is ``status`` (started or completed)."""

    iteration: int
    phase: Phase
    status: str

    def as_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "phase": str(self.phase), "status": self.status}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Position:
        return cls(int(d["iteration"]), Phase(d["phase"]), str(d["status"]))


class Journal:
    """Reads and appends the phase journal of a run directory (``run.json``)."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.meta: dict[str, Any] = run.read_meta()

    @property
    def position(self) -> Position | None:
        pos = self.meta.get("journal")
        return Position.from_dict(pos) if pos else None

    @property
    def history(self) -> list[dict[str, Any]]:
        hist: list[dict[str, Any]] = self.meta.setdefault("history", [])
        return hist

    def is_completed(self, iteration: int, phase: Phase) -> bool:
        return any(
            h["iteration"] == iteration and h["phase"] == phase and h.get("ended") is not None
            for h in self.history
        )

    def start(self, iteration: int, phase: Phase) -> None:
        self.meta["journal"] = Position(iteration, phase, "started").as_dict()
        self.history.append(
            {"iteration": iteration, "phase": str(phase), "started": time.time(), "ended": None}
        )
        self.save()

    def complete(self, iteration: int, phase: Phase, **info: Any) -> None:
        for h in reversed(self.history):
            if h["iteration"] == iteration and h["phase"] == phase and h.get("ended") is None:
                h["ended"] = time.time()
                h["seconds"] = h["ended"] - h["started"]
                h.update(info)
                break
        else:  # completed without a start record (e.g. by `import-labels`)
            now = time.time()
            self.history.append(
                {"iteration": iteration, "phase": str(phase), "started": now, "ended": now, **info}
            )
        self.meta["journal"] = Position(iteration, phase, "completed").as_dict()
        self.save()

    def phase_seconds(self, iteration: int) -> dict[str, float]:
        """Wall seconds of each completed phase of ``iteration`` (last attempt wins)."""
        out: dict[str, float] = {}
        for h in self.history:
            if h["iteration"] == iteration and h.get("seconds") is not None:
                out[h["phase"]] = float(h["seconds"])
        return out

    def iteration_overhead(self, iteration: int) -> dict[str, float]:
        """Wall time of an iteration (first phase start to last phase end), the compute
        measured inside workers and functions, and the orchestration overhead between them."""
        rows = [h for h in self.history if h["iteration"] == iteration and h.get("ended")]
        if not rows:
            return {"wall": 0.0, "compute": 0.0, "overhead": 0.0}
        wall = max(float(h["ended"]) for h in rows) - min(float(h["started"]) for h in rows)
        latest: dict[str, float] = {}
        for h in rows:  # the last attempt of each phase counts
            latest[h["phase"]] = float(h.get("compute") or 0.0)
        compute = sum(latest.values())
        return {"wall": wall, "compute": compute, "overhead": wall - compute}

    def set(self, key: str, value: Any) -> None:
        self.meta[key] = value
        self.save()

    def save(self) -> None:
        self.run.write_meta(self.meta)
