"""What a person sees while detloop works: progress lines, live bars, no dependency noise.

The progress mode of a process is the environment variable ``DETLOOP_PROGRESS``, so that the
processes it starts (a local Ray instance's workers, the loops of ``detloop grid``) inherit it:

- ``bar``: live bars on stderr, one line each (for a terminal);
- ``lines``: instead of bars, one line per bar every ``LINE_INTERVAL_S`` seconds (CI logs,
  ``make demo | tee``: a redrawn bar would become thousands of lines there);
- ``auto``: ``bar`` where this process's stderr is a terminal, else ``lines``;
- ``off`` or unset: nothing. Library calls (tests, benchmarks) run with it unset.

The CLI sets it for the command (``session``): ``off`` with ``-q``, else the user's value or
``auto``. Progress lines (a phase starts, an iteration's numbers) are records of the logger
``detloop.progress`` at INFO: the CLI shows them on stderr as bare messages, above any live bar;
elsewhere they are ordinary log records (shown only where logging is configured to show them).

Bars: ``progress_bar(progress, ...)`` returns what a long call (training, prediction) updates.
``progress`` is ``False`` (nothing), ``True`` (a bar in this process, in its mode; nothing with
``DETLOOP_PROGRESS=off``), a ``Reporter`` (the bar's state is published for another process to
draw: how a Ray worker shows progress on the driver, see ``orchestrator/progress.py``), or
``None``: the process default, ``False`` unless the process set one (a predict worker does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Protocol, TextIO

ENV = "DETLOOP_PROGRESS"
LOGGER = "detloop.progress"
LINE_INTERVAL_S = 30.0  # `lines` mode: at most one line per bar this often
PUBLISH_INTERVAL_S = 0.5  # a published bar sends its state at most this often

Mode = Literal["off", "bar", "lines"]
_VALUES = ("off", "bar", "lines", "auto")

log = logging.getLogger(LOGGER)


def _is_tty(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _resolve(value: str) -> Mode:
    if value == "off":
        return "off"
    if value in ("bar", "lines"):
        return "bar" if value == "bar" else "lines"
    return "bar" if _is_tty(sys.stderr) else "lines"


def _env_value() -> str | None:
    value = os.environ.get(ENV, "").strip().lower()
    return value if value in _VALUES else None


def mode() -> Mode:
    """This process's progress mode: ``off`` unless the CLI or the user chose one."""
    value = _env_value()
    return "off" if value is None else _resolve(value)


def say(msg: str, *args: object) -> None:
    """A progress line for a person (``-q`` silences it; library calls do not show it)."""
    log.info(msg, *args)


# ---- the CLI's console ------------------------------------------------------------------------
class _ConsoleHandler(logging.Handler):
    """Writes the bare message on the current stderr, above this process's live bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _install(resolved: Mode) -> logging.Handler:
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if resolved == "off" else logging.INFO)
    log.propagate = False  # shown once, as a bare line, whatever the root logger does
    return handler


@contextlib.contextmanager
def session(quiet: bool) -> Iterator[Mode]:
    """Progress for one CLI command: its mode (``off`` when ``quiet``, else the user's
    ``DETLOOP_PROGRESS`` or ``auto``) for this process and the ones it starts, and progress
    lines on stderr. Both are restored afterwards."""
    old_env = os.environ.get(ENV)
    old_state = (log.level, log.propagate)
    value = "off" if quiet else (_env_value() or "auto")
    os.environ[ENV] = value
    handler = _install(_resolve(value))
    try:
        yield _resolve(value)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_state[0])
        log.propagate = old_state[1]
        if old_env is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old_env


def ensure_console() -> None:
    """Show progress lines in a process the CLI did not set up but whose mode is on (a loop of
    ``detloop grid`` running in a Ray task: its stderr reaches the driver line by line)."""
    resolved = mode()
    if resolved != "off" and not log.handlers:
        _install(resolved)


def quiet_dependency_warnings() -> None:
    """Hide warnings of dependencies that a detloop user can do nothing about.

    effdet scripts a few helpers with ``torch.jit.script`` when it is imported, which torch
    now flags with a FutureWarning (as it flags ``trace``/``load``, which the TorchScript
    export needs). Called at the entry points (the CLI, a loop, each worker
    process) rather than when a library module is imported, so that a program that imports
    detloop keeps its own warning filters.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.jit\.(script|trace|trace_method|load)` is deprecated",
        category=FutureWarning,
        module=r"torch\.jit",
    )
    # uncertainty-toolbox's MARPD divides by |prediction| + |truth|, 0 for a box edge on the
    # image border: that one accuracy figure is NaN, the rest of its report stands
    warnings.filterwarnings(
        "ignore",
        message=r"invalid value encountered in divide",
        category=RuntimeWarning,
        module=r"uncertainty_toolbox\.metrics_accuracy",
    )


# ---- bars -------------------------------------------------------------------------------------
class Bar(Protocol):
    """The part of tqdm's interface that training and prediction use."""

    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    """Where a bar publishes its state for another process to draw."""

    def publish(self, state: Mapping[str, Any]) -> None: ...


Progress = bool | Reporter | None

_process_default: Progress = False


def set_process_default(progress: Progress) -> None:
    """What ``progress=None`` means in this process (a worker sets its reporter)."""
    global _process_default
    _process_default = progress


def describe(state: Mapping[str, Any], rate: float | None = None) -> str:
    """One line for a bar's state: ``120/300 step (2.1 step/s), loss 0.432``."""
    unit = str(state.get("unit") or "it")
    n, total = int(state.get("n") or 0), state.get("total")
    text = f"{n}/{int(total)} {unit}" if total else f"{n} {unit}"
    if rate is not None:
        text += f" ({rate:.1f} {unit}/s)"
    postfix = state.get("postfix")
    return f"{text}, {postfix}" if postfix else text


class NullBar:
    """No progress."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class _StateBar:
    """Counts like tqdm and keeps the state a line or a published bar is made of."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str,
        initial: int,
        clock: Callable[[], float],
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.initial = self.n = initial
        self.postfix = ""
        self.clock = clock
        self.started = clock()

    def state(self) -> dict[str, Any]:
        return {
            "desc": self.desc,
            "n": self.n,
            "total": self.total,
            "unit": self.unit,
            "postfix": self.postfix,
        }


class LineBar(_StateBar):
    """A bar as an occasional progress line (``lines`` mode): at most one per interval, with
    the rate since the previous line."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str,
        initial: int = 0,
        interval: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(desc, total, unit, initial, clock)
        self.interval = interval
        self._last, self._last_n = self.started, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.interval:
            rate = (self.n - self._last_n) / (now - self._last)
            self._last, self._last_n = now, self.n
            say("%s: %s", self.desc, describe(self.state(), rate))

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        pass


class PublishedBar(_StateBar):
    """A bar whose state goes to a ``Reporter`` at most every ``interval`` seconds (and when
    it opens and closes)."""

    def __init__(
        self,
        reporter: Reporter,
        desc: str,
        total: int | None,
        unit: str,
        initial: int = 0,
        interval: float = PUBLISH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(desc, total, unit, initial, clock)
        self.reporter, self.interval = reporter, interval
        self.id = uuid.uuid4().hex[:12]
        self.closed = False
        self._last = -float("inf")
        self._publish(force=True)

    def _publish(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        state = {**self.state(), "id": self.id, "initial": self.initial, "closed": self.closed}
        self.reporter.publish(state)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._publish()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._publish(force=True)


def progress_bar(
    progress: Progress, *, total: int | None, desc: str, unit: str, initial: int = 0
) -> Bar:
    """The bar a long call updates (see the module docstring for ``progress``)."""
    if progress is None:
        progress = _process_default
    if progress is False or progress is None:
        return NullBar()
    if progress is True:
        resolved = _resolve(_env_value() or "auto")
        if resolved == "bar":
            from tqdm import tqdm

            bar: Bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            return bar
        if resolved == "lines":
            return LineBar(desc, total, unit, initial)
        return NullBar()
    return PublishedBar(progress, desc, total, unit, initial)
