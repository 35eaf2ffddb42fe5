"""A loop's progress for a person: phase lines, one live line per worker, the iteration line.

Training and prediction run in Ray actors, and Ray forwards an actor's stdout and stderr to the
driver line by line, so a bar that an actor draws itself (carriage returns, redrawn a few times
a second) reaches the driver as one line per redraw. Instead, each worker publishes the state of
its bar (``detloop.console.PublishedBar``) under its own key in Ray's key-value store (in the
GCS, so it works on a cluster and from a ``ray job submit`` driver) at most twice a second, and
while the driver waits on the workers a ``ProgressBoard`` reads those keys twice a second and
draws one line per worker: a live tqdm bar on a terminal, a line every 30 s otherwise.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from detloop import console

logger = logging.getLogger(__name__)

NAMESPACE = "detloop_progress"
POLL_INTERVAL_S = 0.5

Fetch = Callable[[str], Mapping[str, Any] | None]


def new_prefix() -> str:
    """A key prefix of its own for one loop's workers (concurrent loops do not collide)."""
    return f"loop-{uuid.uuid4().hex[:12]}"


class KvReporter:
    """A worker's reporter: publishes its bars' states under ``key`` in Ray's key-value store.

    Adds ``count``, the units of every bar this reporter published (a predict worker opens a
    bar per shard; the driver shows their sum for the phase), and ``source``, which tells a
    restarted worker (whose count starts over) from the one before. A failure to publish never
    stops the work: it is logged once and publishing stops.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.source = uuid.uuid4().hex[:12]
        self._done = 0  # units of closed bars
        self._broken = False

    def counted(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``state`` with ``count`` added (and the count of a closed bar kept)."""
        done = int(state.get("n") or 0) - int(state.get("initial") or 0)
        record = {**state, "count": self._done + done, "source": self.source}
        if state.get("closed"):
            self._done += done
        return record

    def publish(self, state: Mapping[str, Any]) -> None:
        record = self.counted(state)
        if self._broken:
            return
        try:
            from ray.experimental.internal_kv import _internal_kv_put

            _internal_kv_put(self.key, json.dumps(record), overwrite=True, namespace=NAMESPACE)
        except Exception:
            self._broken = True
            logger.warning("progress of %s cannot be published; no more tries", self.key)
            logger.debug("publishing progress failed", exc_info=True)


def _kv_fetch(key: str) -> Mapping[str, Any] | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(key, namespace=NAMESPACE)
    if not raw:
        return None
    state: Mapping[str, Any] = json.loads(raw)
    return state


def forget(prefix: str) -> None:
    """Delete the progress keys of a loop's workers (when they shut down)."""
    try:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(prefix, del_by_prefix=True, namespace=NAMESPACE)
    except Exception:
        logger.debug("cannot delete the progress keys under %s", prefix, exc_info=True)


class _Line:
    """What the board knows of one worker's progress."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.base = 0  # the worker's ``count`` when the board opened
        self.acc = 0  # units counted before the worker restarted
        self.last_count = 0
        self.source: object = None
        self.stale: object = None  # the bar of an earlier phase, not shown
        self.state: Mapping[str, Any] | None = None
        self.total = 0  # cumulative boards: units assigned to the worker so far
        self.bar: Any = None
        self.printed: int | None = None  # units at the previous line (``lines`` mode)
        self.printed_at = 0.0  # and when (the board's start before the first)

    def start(self, state: Mapping[str, Any] | None) -> None:
        """The board opens: what the worker counted so far belongs to earlier phases."""
        self.base = self.last_count = int(state.get("count") or 0) if state else 0
        self.source = state.get("source") if state else None
        self.stale = state.get("id") if state else None

    def observe(self, state: Mapping[str, Any]) -> None:
        count, source = int(state.get("count") or 0), state.get("source")
        if (source != self.source and self.source is not None) or count < self.last_count:
            self.acc += self.last_count - self.base  # a restarted worker counts from 0
            self.base = 0
        self.last_count, self.source = count, source
        if state.get("id") is None or state.get("id") != self.stale:
            self.state = state

    def done(self, cumulative: bool) -> int:
        if self.state is None:
            return 0
        if cumulative:
            n = self.acc + self.last_count - self.base
            return min(n, self.total) if self.total else n
        return int(self.state.get("n") or 0)

    def shown_total(self, cumulative: bool) -> int | None:
        if cumulative:
            return self.total or None
        total = self.state.get("total") if self.state else None
        return int(total) if total else None


class ProgressBoard:
    """Draws the bars that workers publish under ``labels``' keys while the driver waits.

    ``labels`` maps each key to its line's label. ``cumulative``: a line adds up every bar the
    worker opens while the board is open (prediction: a bar per shard), out of the units
    assigned to it with ``assign``; otherwise a line shows the worker's current bar (training).
    A context manager: the drawing thread runs inside the ``with`` block; on exit the live
    bars are removed (the iteration line sums up). The keys stay (a worker's ``count`` runs
    on over boards) until ``forget``.
    """

    def __init__(
        self,
        labels: Mapping[str, str],
        *,
        mode: console.Mode | None = None,
        cumulative: bool = False,
        fetch: Fetch | None = None,
        interval: float = POLL_INTERVAL_S,
        line_interval: float = console.LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = console.mode() if mode is None else mode
        self.cumulative = cumulative
        self._fetch = fetch or _kv_fetch
        self.interval, self.line_interval, self.clock = interval, line_interval, clock
        self.lines: dict[str, _Line] = {key: _Line(label) for key, label in labels.items()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = self._last_line = clock()
        self._broken = False

    @property
    def active(self) -> bool:
        return self.mode != "off" and bool(self.lines)

    def assign(self, key: str | None, units: int) -> None:
        """``units`` more are on their way to the worker of ``key`` (cumulative boards)."""
        if key in self.lines:
            self.lines[key].total += units

    def __enter__(self) -> ProgressBoard:
        if not self.active:
            return self
        for key, line in self.lines.items():
            line.start(self._safe_fetch(key))
        self._started = self._last_line = self.clock()
        self._thread = threading.Thread(target=self._run, name="detloop-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.mode == "lines" and self.clock() - self._started >= self.line_interval:
            self.poll(force=True)  # a long phase ends with where each worker got to
        with self._lock:
            for line in self.lines.values():
                if line.bar is not None:
                    line.bar.close()
                    line.bar = None

    def _safe_fetch(self, key: str) -> Mapping[str, Any] | None:
        if self._broken:
            return None
        try:
            return self._fetch(key)
        except Exception:
            self._broken = True  # progress never fails the work it shows
            logger.debug("cannot read progress; the board stops", exc_info=True)
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self, force: bool = False) -> None:
        """Read every worker's state once and draw (``bar``) or, when due or ``force``d,
        print (``lines``)."""
        with self._lock:
            for key, line in self.lines.items():
                state = self._safe_fetch(key)
                if state is not None:
                    line.observe(state)
            if self.mode == "bar":
                self._draw()
            elif self.mode == "lines" and (
                force or self.clock() - self._last_line >= self.line_interval
            ):
                self._print()

    def _draw(self) -> None:
        from tqdm import tqdm

        for line in self.lines.values():
            if line.state is None:
                continue
            n, total = line.done(self.cumulative), line.shown_total(self.cumulative)
            if line.bar is None:
                line.bar = tqdm(
                    total=total,
                    initial=n,
                    desc=line.label,
                    unit=str(line.state.get("unit") or "it"),
                    leave=False,
                    file=sys.stderr,
                    dynamic_ncols=True,
                )
            bar = line.bar
            if total != bar.total:
                bar.total = total
            bar.set_postfix_str(str(line.state.get("postfix") or ""), refresh=False)
            if n > bar.n:
                bar.update(n - bar.n)  # draws (polls are further apart than its mininterval)
            else:
                bar.n = n
                bar.refresh()

    def _print(self) -> None:
        """A line per worker, with its rate since its previous line (or the start)."""
        now = self._last_line = self.clock()
        for line in self.lines.values():
            if line.state is None:
                continue
            n = line.done(self.cumulative)
            if line.printed is None:  # a training resumed at step k starts at k
                line.printed = 0 if self.cumulative else int(line.state.get("initial") or 0)
                line.printed_at = self._started
            elapsed = now - line.printed_at
            rate = (n - line.printed) / elapsed if elapsed > 0 else None
            line.printed, line.printed_at = n, now
            state = {**line.state, "n": n, "total": line.shown_total(self.cumulative)}
            console.say("%s: %s", line.label, console.describe(state, rate))


# ---- lines for a person -------------------------------------------------------------------------
def phase_line(
    run_name: str, iteration: int, last: int | None, phase: str, unit: str = "iteration"
) -> str:
    """``entropy-s0 | iteration 1/3 | predict``: a phase starts (``last`` None: not known yet,
    as during the import; ``unit``: what the loop calls its iterations, e.g. ``round``)."""
    of = "" if last is None else f"/{last}"
    return f"{run_name} | {unit} {iteration}{of} | {phase}"


def _num(numbers: Mapping[str, float], key: str, fmt: str) -> str | None:
    value = numbers.get(key)
    return None if value is None or value != value else format(value, fmt)


def _label_parts(numbers: Mapping[str, float]) -> list[str]:
    """Labels a loop made without people: SSL's pseudo-labels, auto-labeling's verdicts (with
    their precision where ground truth is known)."""
    parts: list[str] = []
    pseudo = _num(numbers, "pseudo_label_pseudo_labels", ".0f")
    if pseudo is not None:  # SSL: the pseudo-labels and, simulated, their precision/recall
        precision = _num(numbers, "pseudo_label_pseudo_precision", ".3f")
        recall = _num(numbers, "pseudo_label_pseudo_recall", ".3f")
        known = f" (precision {precision} recall {recall})" if precision and recall else ""
        parts.append(f"pseudo-labels {pseudo}{known}")
    frames = _num(numbers, "autolabel_frames", ".0f")
    if frames is not None:  # auto-labeling: its verdicts and, with ground truth, their quality
        auto, examine = (
            _num(numbers, f"autolabel_{k}", ".0f") for k in ("auto_labeled", "examine")
        )
        precision = _num(numbers, "autolabel_image_precision", ".3f")
        known = f" (image precision {precision})" if precision is not None else ""
        parts.append(f"auto-labeled {auto}/{frames}{known}, to review {examine}")
    return parts


def iteration_line(
    run_name: str,
    iteration: int,
    last: int,
    numbers: Mapping[str, float],
    unit: str = "iteration",
) -> str:
    """The numbers of a finished iteration in one line: labeled images and fraction, mAP and
    mAP50 of its model, its final training loss, its pseudo-labels (SSL), and the seconds of
    each of its phases."""
    parts = [f"{run_name} | {unit} {iteration}/{last} done"]
    images = _num(numbers, "labeled_images", ".0f")
    fraction = numbers.get("labeled_fraction")
    if images is not None:
        parts.append(
            f"labeled {images} images"
            + (f" ({100 * fraction:.1f} %)" if fraction is not None else "")
        )
    quality = [
        f"{name} {text}"
        for name, key in (("mAP", "map"), ("mAP50", "map50"))
        if (text := _num(numbers, key, ".4f")) is not None
    ]
    if quality:
        parts.append(" ".join(quality))
    loss = _num(numbers, "train_loss", ".4f")
    if loss is not None:
        parts.append(f"loss {loss}")
    parts += _label_parts(numbers)
    bounds = [  # what the decoding bounds changed (§2.1, §3), shown only when they did
        f"{int(value)} {label}"
        for key, label in (
            ("predict_capped_al_std", "al std capped"),
            ("predict_capped_mc_std", "mc std capped"),
            ("predict_dropped_boxes", "degenerate boxes dropped"),
        )
        if (value := numbers.get(key, 0.0)) > 0
    ]
    if bounds:
        parts.append(", ".join(bounds))
    times = [
        f"{key.removeprefix('time_')} {value:.1f}s"
        for key, value in numbers.items()
        if key.startswith("time_") and value == value
    ]
    if times:
        parts.append(" ".join(times))
    return " | ".join(parts)
