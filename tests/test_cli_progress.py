"""What a person sees: phase lines, one bar (or an occasional line) per worker, the iteration
line; ``-q`` leaves only the result; no dependency warning; every import reported once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from conftest import ci_overrides
from detloop import console
from detloop.cli.main import build_parser
from detloop.orchestrator.engine.progress import (
    KvReporter,
    ProgressBoard,
    iteration_line,
    phase_line,
)

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListReporter:
    def __init__(self) -> None:
        self.states: list[dict[str, Any]] = []

    def publish(self, state: Mapping[str, Any]) -> None:
        self.states.append(dict(state))


@pytest.fixture
def progress_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No inherited mode, and the process default restored after the test."""
    monkeypatch.delenv(console.ENV, raising=False)
    yield
    console.set_process_default(False)


# ---- modes and the CLI options ------------------------------------------------------------------
def test_library_calls_show_nothing_unless_asked(progress_env: None) -> None:
    assert console.mode() == "off"
    assert isinstance(console.progress_bar(None, total=3, desc="d", unit="u"), console.NullBar)
    assert isinstance(console.progress_bar(False, total=3, desc="d", unit="u"), console.NullBar)
    reporter = ListReporter()
    console.set_process_default(reporter)  # what a predict worker does
    bar = console.progress_bar(None, total=3, desc="predict", unit="img")
    assert isinstance(bar, console.PublishedBar) and reporter.states


def test_session_sets_the_mode_for_the_command_and_restores_it(
    progress_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with console.session(quiet=False) as mode:
        assert os.environ[console.ENV] == "auto"
        assert mode == console.mode() == "lines"  # pytest's stderr is not a terminal
        console.say("shown %d", 1)
    console.say("not shown after the session")
    with console.session(quiet=True) as mode:
        assert mode == "off" and os.environ[console.ENV] == "off"
        console.say("not shown when quiet")
        bar = console.progress_bar(True, total=3, desc="d", unit="u")
        assert isinstance(bar, console.NullBar)  # -q silences a local verb's bar too
    assert console.ENV not in os.environ
    monkeypatch.setenv(console.ENV, "bar")
    with console.session(quiet=False) as mode:
        assert mode == "bar"  # the user's choice wins (e.g. bars in a CI log on purpose)
    assert capsys.readouterr().err == "shown 1\n"


@pytest.mark.parametrize(
    ("argv", "quiet", "verbose"),
    [
        (["-q", "status", "r"], True, None),
        (["status", "-q", "r"], True, None),
        (["-vv", "status", "r"], None, 2),
        (["status", "r", "-v"], None, 1),
        (["status", "r"], None, None),
    ],
)
def test_quiet_and_verbose_before_or_after_the_verb(
    argv: list[str], quiet: bool | None, verbose: int | None
) -> None:
    args = build_parser().parse_args(argv)
    assert getattr(args, "quiet", None) == quiet
    assert getattr(args, "verbose", None) == verbose


def test_quiet_and_verbose_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "-q", "-v", "r"])
    assert "not allowed with" in capsys.readouterr().err


# ---- bars ---------------------------------------------------------------------------------------
def test_line_bar_prints_at_most_one_line_per_interval(
    progress_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    with console.session(quiet=False):
        bar = console.LineBar("train", 800, "step", interval=30.0, clock=clock)
        for _ in range(800):  # 800 steps over 100 s
            clock.now += 0.125
            bar.set_postfix_str("loss 0.5000")
            bar.update(1)
        bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == "train: 240/800 step (8.0 step/s), loss 0.5000"


def test_published_bar_is_rate_limited_and_always_sends_its_last_state() -> None:
    clock, reporter = Clock(), ListReporter()
    bar = console.PublishedBar(reporter, "predict", 64, "img", interval=0.5, clock=clock)
    for _ in range(64):  # 64 images over 3.2 s
        clock.now += 0.05
        bar.update(1)
    bar.close()
    states = reporter.states
    assert 6 <= len(states) <= 9  # opened, about every 0.5 s, closed
    assert states[0]["n"] == 0 and not states[0]["closed"]
    assert states[-1]["n"] == 64 and states[-1]["closed"]
    assert len({s["id"] for s in states}) == 1


def test_kv_reporter_counts_over_its_bars() -> None:
    """A predict worker opens a bar per shard; ``count`` runs on over them (no Ray needed)."""
    reporter = KvReporter("k")
    counts = []
    for shard in (16, 16, 10):
        for n, closed in ((0, False), (shard // 2, False), (shard, True)):
            state = {"n": n, "initial": 0, "closed": closed}
            counts.append(reporter.counted(state)["count"])
    assert counts == [0, 8, 16, 16, 24, 32, 32, 37, 42]
    resumed = reporter.counted({"n": 7, "initial": 5, "closed": True})  # a resumed training
    assert resumed["count"] == 44


def _states(*counts: int, total: int = 64) -> list[dict[str, Any]]:
    return [
        {"desc": "predict", "n": c, "initial": 0, "total": total, "unit": "img", "count": c}
        for c in counts
    ]


def test_board_lines_mode_adds_up_a_worker_and_stays_occasional(
    progress_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    feeds = {"a": iter(_states(16, *range(16, 200, 2))), "b": iter(_states(0, *range(0, 92)))}
    with console.session(quiet=False):
        board = ProgressBoard(
            {"a": "predict (worker 1)", "b": "predict (worker 2)"},
            mode="lines",
            cumulative=True,
            fetch=lambda key: next(feeds[key], None),
            clock=clock,
            interval=3600.0,  # its thread never polls: the test does, on the fake clock
            line_interval=30.0,
        )
        board.assign("a", 200)
        board.assign("b", 100)
        board.assign("unknown", 5)  # ignored
        with board:  # reads each worker's count so far: 16 for "a" (an earlier phase)
            for _ in range(90):  # 45 s of polls every 0.5 s
                clock.now += 0.5
                board.poll()
    lines = capsys.readouterr().err.splitlines()
    # one line per worker at 30 s, and one each at the end (the phase lasted over 30 s), with
    # the rate since the previous line
    assert lines == [
        "predict (worker 1): 118/200 img (3.9 img/s)",
        "predict (worker 2): 59/100 img (2.0 img/s)",
        "predict (worker 1): 180/200 img (4.1 img/s)",
        "predict (worker 2): 90/100 img (2.1 img/s)",
    ]


def test_board_bar_mode_draws_one_line_per_worker(
    progress_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    state = {"desc": "train", "n": 5, "initial": 0, "total": 20, "unit": "step", "count": 5}
    board = ProgressBoard(
        {"t": "train"}, mode="bar", fetch=lambda key: {**state, "postfix": "loss 1.2345"}
    )
    board.poll()
    board.poll()
    err = capsys.readouterr().err
    assert "train:  25%" in err and "5/20" in err and "loss 1.2345" in err
    assert "\n" not in err.rstrip("\n")  # redrawn in place, not line after line


def test_board_restart_and_off() -> None:
    board = ProgressBoard({"a": "w"}, mode="lines", cumulative=True, fetch=lambda k: None)
    line = board.lines["a"]
    for state in _states(10, 30, 5, 12):  # the worker restarts after 30 (its count too)
        line.observe(state)
    assert line.done(cumulative=True) == 30 + 12
    line.total = 40
    assert line.done(cumulative=True) == 40  # never more than it was given
    line = ProgressBoard({"a": "w"}, mode="lines", cumulative=True, fetch=lambda k: None).lines["a"]
    line.start({"count": 16, "source": "old"})  # 16 from an earlier phase
    line.observe({**_states(24)[0], "source": "old"})
    assert line.done(cumulative=True) == 8
    line.observe({**_states(40)[0], "source": "new"})  # restarted, and already past 24
    assert line.done(cumulative=True) == 8 + 40
    off = ProgressBoard({"a": "w"}, mode="off", fetch=lambda k: pytest.fail("no reads when off"))
    with off:
        off.assign("a", 3)
    assert off._thread is None


def test_board_does_not_show_the_bar_of_an_earlier_phase(
    progress_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    old = {"id": "x", "n": 300, "initial": 0, "total": 300, "unit": "step", "source": "s"}
    new = {**old, "id": "y", "n": 20, "total": 40, "postfix": "loss 0.5000"}
    feed = [old, old, new]
    clock = Clock()
    board = ProgressBoard(
        {"t": "train"},
        mode="lines",
        fetch=lambda key: feed.pop(0) if len(feed) > 1 else feed[0],
        clock=clock,
        interval=3600.0,
        line_interval=10.0,
    )
    with console.session(quiet=False), board:
        clock.now += 10
        board.poll()  # the last training's final state: not shown
        clock.now += 10
        board.poll()
        clock.now += 5
    assert capsys.readouterr().err.splitlines() == [
        "train: 20/40 step (1.0 step/s), loss 0.5000",  # 20 steps in the 20 s of the phase
        "train: 20/40 step (0.0 step/s), loss 0.5000",  # where it got to when the phase ended
    ]


# ---- lines --------------------------------------------------------------------------------------
def test_phase_and_iteration_lines() -> None:
    assert phase_line("entropy-s0", 0, None, "import") == "entropy-s0 | iteration 0 | import"
    assert phase_line("entropy-s0", 1, 3, "predict") == "entropy-s0 | iteration 1/3 | predict"
    numbers = {
        "labeled_images": 12.0,
        "labeled_fraction": 0.1875,
        "map": 0.01234,
        "map50": 0.05,
        "train_loss": 1.5,
        "time_predict": 1.94,
        "time_train": 30.0,
        "selected": 6.0,
    }
    assert iteration_line("entropy-s0", 1, 3, numbers) == (
        "entropy-s0 | iteration 1/3 done | labeled 12 images (18.8 %) | mAP 0.0123 "
        "mAP50 0.0500 | loss 1.5000 | predict 1.9s train 30.0s"
    )
    # a warm-up restored from the cache has no training loss; NaN mAP is left out
    assert iteration_line("r", 0, 0, {"labeled_images": 3.0, "map": float("nan")}) == (
        "r | iteration 0/0 done | labeled 3 images"
    )


# ---- the effdet warning -------------------------------------------------------------------------
def _import_effdet(quiet: bool) -> str:
    """stderr of a new process that imports the model (and so effdet)."""
    lines = ["import warnings", "warnings.simplefilter('default')"]
    if quiet:
        lines += ["from detloop.console import quiet_dependency_warnings"]
        lines += ["quiet_dependency_warnings()"]
    code = "; ".join([*lines, "import detloop.learners.model"])
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return proc.stderr


@pytest.mark.slow
def test_the_torch_jit_warning_is_silenced_at_the_entry_points() -> None:
    if "torch.jit.script" not in _import_effdet(quiet=False):
        pytest.skip("effdet/torch no longer warn about torch.jit.script")
    assert "FutureWarning" not in _import_effdet(quiet=True)


# ---- end to end ---------------------------------------------------------------------------------
@pytest.mark.ray
def test_worker_bars_reach_the_driver_through_ray(
    local_ray: str, progress_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from detloop.orchestrator.engine.progress import forget, new_prefix

    def publish_from_a_worker(key: str, shards: list[int]) -> None:  # sent by value
        reporter = KvReporter(key)
        for units in shards:
            bar = console.PublishedBar(reporter, "predict", units, "img")
            bar.update(units)
            bar.close()

    prefix = new_prefix()
    key = f"{prefix}/predict0"
    task = ray.remote(num_cpus=0)(publish_from_a_worker)
    ray.get(task.remote(key, [16]))  # an earlier phase: not this board's
    board = ProgressBoard({key: "predict (worker 1)"}, mode="lines", cumulative=True)
    board.assign(key, 40)
    with console.session(quiet=False), board:
        ray.get(task.remote(key, [16, 16, 8]))
        board.poll(force=True)
    assert capsys.readouterr().err.startswith("predict (worker 1): 40/40 img (")
    forget(prefix)
    assert ProgressBoard({key: "w"}, mode="lines")._fetch(key) is None


def _cli(args: list[str], **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != console.ENV}
    env.update(PYTHONUNBUFFERED="1", **env_vars)
    cmd = [sys.executable, "-m", "detloop.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.ray
def test_run_shows_progress_and_quiet_shows_only_the_result(
    digits_tiny: Path, local_ray: str, tmp_path: Path
) -> None:
    args = ci_overrides(digits_tiny, tmp_path, f"ray.address={local_ray}")
    res = _cli(["run", str(CI_CONFIG), *args])
    assert res.returncode == 0, res.stderr[-3000:]
    err, out = res.stderr, res.stdout
    lines = err.splitlines()
    plan = [(0, p) for p in ("select", "label", "train", "evaluate", "log")] + [
        (1, p) for p in ("predict", "select", "label", "train", "evaluate", "log")
    ]
    assert "entropy-s0 | iteration 0 | import" in lines
    for it, phase in plan:
        assert f"entropy-s0 | iteration {it}/1 | {phase}" in lines, (it, phase, err)
    for it in (0, 1):
        pattern = (
            rf"entropy-s0 \| iteration {it}/1 done \| labeled \d+ images \([\d.]+ %\) \| "
            r"mAP [\d.]+ mAP50 [\d.]+ \| loss [\d.]+ \| .*train [\d.]+s .*evaluate [\d.]+s"
        )
        assert any(re.fullmatch(pattern, line) for line in lines), err
    assert err.count("imported 64 images") == 1 and err.count("imported 32 images") == 1
    assert "FutureWarning" not in err + out and "torch.jit" not in err + out
    assert "epoch(s) done" not in err
    assert len(lines) < 30, err  # no flood: short phases print no bar lines off a terminal
    assert "iter  labeled fraction" in out and "entropy-s0 |" not in out

    # -q: a second strategy on the same runs root (iteration 0 comes from the warm-up cache);
    # it wins over a mode the user set
    quiet_args = ["-q", "run", str(CI_CONFIG), *args, "--set", "al.strategy=random"]
    quiet = _cli(quiet_args, DETLOOP_PROGRESS="bar")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stderr == ""
    assert quiet.stdout.startswith("random seed 0: ") and "iter  labeled fraction" in quiet.stdout
