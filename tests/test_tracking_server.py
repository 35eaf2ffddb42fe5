"""MLflow through a tracking server, and no secret in what a run stores or shows.

A real ``mlflow server`` (started by ``detloop tracking-server`` on 127.0.0.1, a free port,
SQLite in a temporary folder, proxied artifacts) serves an AL loop of configs/ci.yaml run
in-process (``ray.in_process``) on digits-det tiny: a driver SIGKILLed after iteration 1's
selection, then ``detloop resume``. The loop must leave one MLflow run, reattached by the
resume, with its params, the metrics stepped by iteration and by labeled images, the
experiment marked as a model-training one, and its artifacts downloadable through the
server; ``detloop report --tracking-uri`` draws the AL curve from the server alone.

A token planted in ``MLFLOW_TRACKING_TOKEN`` (the way credentials reach MLflow) must appear in
none of the run's files, its log output, or its MLflow params and tags; a ``tracking.uri``
with the token in its user info is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import ci_overrides
from detloop.cli.main import main
from detloop.cli.tracking_server import is_loopback, server_command
from detloop.config import ExperimentConfig, TrackingConfig, build_config
from detloop.data.rundir import RunDir, RunsRoot
from detloop.orchestrator.engine.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    curve_metrics,
    local_artifacts,
    prepare_store,
    run_params,
)

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "configs" / "ci.yaml"
TOKEN = "dl-planted-7f3c9a1e5b"  # a credential that must never be stored or shown
FAST = ["ray.in_process=true", "model.mc_dropoutsamp=2"]


# ---- without a server -------------------------------------------------------------------------
def test_uri_credentials_are_found_and_redacted() -> None:
    assert TrackingConfig.credentials_in("http://127.0.0.1:5000") is None
    assert TrackingConfig.credentials_in(f"http://u:{TOKEN}@h:5000") == "a user or password"
    assert TrackingConfig.credentials_in(f"https://{TOKEN}@h") == "a user or password"
    assert "api_key" in str(TrackingConfig.credentials_in(f"https://h/?api_key={TOKEN}"))
    assert TrackingConfig.credentials_in("sqlite:////data/a@b/mlflow.db") is None
    assert TrackingConfig.redact(f"http://u:{TOKEN}@h:5000/p?token={TOKEN}&a=1") == (
        "http://h:5000/p?a=1"
    )
    for plain in ("http://h:5000", "sqlite:////x/mlflow.db", "databricks", "not a url"):
        assert TrackingConfig.redact(plain) == plain


def test_config_refuses_credentials_in_the_uri() -> None:
    for uri in (f"http://detloop:{TOKEN}@127.0.0.1:5000", f"http://h:5000/?token={TOKEN}"):
        with pytest.raises(Exception) as err:
            build_config({}, [f"tracking.uri={uri}"])
        text = str(err.value)
        assert "tracking.uri" in text and "MLFLOW_TRACKING_TOKEN" in text
        assert "MLFLOW_TRACKING_PASSWORD" in text and TOKEN not in text


def test_params_show_urls_without_credentials() -> None:
    cfg = build_config({"tracking": {"uri": "http://127.0.0.1:5000"}})
    cfg.labeling.document_root = Path("/data")
    cfg.labeling.url_prefix = f"https://ls:{TOKEN}@labels.example/data"
    params = run_params(cfg)
    assert params["tracking.uri"] == "http://127.0.0.1:5000"
    assert params["labeling.url_prefix"] == "https://labels.example/data"
    assert TOKEN not in json.dumps(params)


def test_curve_metrics_step_by_labeled_images() -> None:
    numbers = {"map": 0.25, "map50": 0.5, "labeled_images": 20.0, "selected": 10.0}
    assert sorted(curve_metrics("al", numbers)) == [
        ("map50_vs_labeled", 0.5, 20),
        ("map_vs_labeled", 0.25, 20),
    ]
    assert curve_metrics("ssl", numbers) == []  # its labeled set does not grow
    assert curve_metrics("al", {"autolabel_share": 0.5}) == []  # the auto-labeling after it
    assert local_artifacts("sqlite:////x/mlflow.db")
    assert not local_artifacts("http://127.0.0.1:5000")
    assert not local_artifacts("https://mlflow.example")


def test_tracking_server_command_and_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmd = server_command(tmp_path, "127.0.0.1", 5123)
    assert cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == RunsRoot(tmp_path).tracking_uri
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path.resolve() / "mlartifacts")
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5")
    assert main(["tracking-server", "--runs-root", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--allow-remote" in err and "not a loopback address" in err
    assert not (tmp_path / "mlflow.db").exists()


# ---- a real server ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@dataclass(frozen=True)
class Server:
    url: str
    root: Path  # its SQLite store and artifacts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``detloop tracking-server`` on a free loopback port; its process group is ended after
    the module's tests."""
    root = tmp_path_factory.mktemp("tracking_server")
    port = _free_port()
    cmd = [sys.executable, "-m", "detloop.cli", "tracking-server", "--runs-root", str(root)]
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the tracking server did not answer /health"
            time.sleep(0.5)
        yield Server(url, root)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)  # the group of the server this fixture started
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


@dataclass(frozen=True)
class ServedRun:
    run: RunDir
    output: str  # everything both drivers printed (stdout and stderr, with -v logs)


def _driver(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "detloop.cli", "-v", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def served_run(
    server: Server, digits_tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> ServedRun:
    """The ci loop through the server: SIGKILLed after iteration 1's select, then resumed;
    both drivers have the planted token in MLFLOW_TRACKING_TOKEN."""
    root = tmp_path_factory.mktemp("runs_served")
    kill = "fault.kill_at=[1:select]"
    args = ci_overrides(digits_tiny, root, *FAST, f"tracking.uri={server.url}", kill)
    first = _driver(["run", str(CI_CONFIG), *args])
    assert first.returncode == -9, first.stderr[-3000:]
    run = RunsRoot(root).run("ci", "entropy-s0")
    assert (run.path / ".fault_1_select").exists()
    second = _driver(["resume", str(run.path)])
    assert second.returncode == 0, second.stderr[-3000:]
    return ServedRun(run, first.stdout + first.stderr + second.stdout + second.stderr)


def _client(server: Server) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.url)


@pytest.mark.slow
def test_loop_tracks_through_the_server_and_resume_reattaches(
    server: Server, served_run: ServedRun
) -> None:
    run = served_run.run
    meta = run.read_meta()
    assert meta["journal"]["phase"] == "done"
    client = _client(server)
    exp = client.get_experiment_by_name("ci")
    assert exp is not None and exp.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND
    # the server places the artifacts (its proxy), not a path of the loop's machine
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the resume created a second MLflow run"
    tracked = runs[0]
    assert tracked.info.run_id == meta["mlflow_run_id"]
    assert tracked.info.status == "FINISHED"
    assert f"MLflow run {tracked.info.run_id} (reattached)" in served_run.output
    assert tracked.data.params["tracking.uri"] == server.url
    assert tracked.data.params["al.strategy"] == "entropy"
    assert tracked.data.tags["strategy"] == "entropy"
    # nothing went to a local store beside the runs
    assert not RunsRoot(run.path.parents[1]).mlflow_db.exists()
    assert not RunsRoot(run.path.parents[1]).artifacts.exists()


@pytest.mark.slow
def test_metrics_stepped_by_iteration_and_by_labeled_images(
    server: Server, served_run: ServedRun
) -> None:
    client = _client(server)
    run_id = served_run.run.read_meta()["mlflow_run_id"]

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    labeled = history("labeled_images")
    assert [s for s, _ in labeled] == [0, 1]
    counts = [int(v) for _, v in labeled]
    assert counts[0] < counts[1]
    for key in ("map", "map50"):
        by_iteration = history(key)
        assert [s for s, _ in by_iteration] == [0, 1]
        by_labeled = history(f"{key}_vs_labeled")
        assert by_labeled == [(c, v) for c, (_, v) in zip(counts, by_iteration, strict=True)]


@pytest.mark.slow
def test_artifacts_download_through_the_server(
    server: Server, served_run: ServedRun, tmp_path: Path
) -> None:
    client = _client(server)
    run = served_run.run
    run_id = run.read_meta()["mlflow_run_id"]
    for it in (0, 1):
        names = {a.path for a in client.list_artifacts(run_id, RunDir.artifact_path(it))}
        remote = f"{RunDir.artifact_path(it)}/{run.metrics_file(it).name}"
        assert remote in names
        local = client.download_artifacts(run_id, remote, str(tmp_path / f"it{it}"))
        assert json.loads(Path(local).read_text()) == json.loads(run.metrics_file(it).read_text())
    # stored by the server, under its own root
    assert list((server.root / "mlartifacts").rglob(run.metrics_file(1).name))


@pytest.mark.slow
def test_report_reads_the_experiment_from_the_server(
    server: Server, served_run: ServedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "no_runs_here"  # the curve comes from the server alone
    out = tmp_path / "report"
    args = ["report", "--experiment", "ci", "--runs-root", str(empty), "--out", str(out)]
    assert main([*args, "--tracking-uri", server.url]) == 0
    text = capsys.readouterr().out
    assert "| entropy | 1 |" in text
    assert (out / "al_curves.png").stat().st_size > 1000
    assert main(["report", "--experiment", "nope", "--tracking-uri", server.url]) == 2
    bad = server.url.replace("://", f"://me:{TOKEN}@")
    assert main([*args, "--tracking-uri", bad]) == 2
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_TOKEN" in err and TOKEN not in err


@pytest.mark.slow
def test_an_existing_experiment_is_marked_on_first_use(server: Server, tmp_path: Path) -> None:
    client = _client(server)
    exp_id = client.create_experiment("made-by-hand")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(exp_id).tags
    cfg: ExperimentConfig = build_config(
        {"name": "made-by-hand", "runs_root": str(tmp_path), "tracking": {"uri": server.url}}
    )
    prepare_store(cfg)
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


@pytest.mark.slow
def test_no_secret_in_the_run_its_logs_or_mlflow(
    server: Server,
    served_run: ServedRun,
    digits_tiny: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The token of MLFLOW_TRACKING_TOKEN is nowhere the run wrote or showed; a URI with it
    in its user info or query is refused before anything is written, without echoing it."""
    assert TOKEN not in served_run.output
    assert "MLflow run" in served_run.output  # the -v logs were there to scan
    for path in [*served_run.run.path.rglob("*"), *(server.root / "mlartifacts").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    client = _client(server)
    run_id = served_run.run.read_meta()["mlflow_run_id"]
    data = client.get_run(run_id).data
    exp = client.get_experiment_by_name("ci")
    shown = json.dumps([data.params, data.tags, exp.tags])
    assert TOKEN not in shown and server.url in shown
    host = server.url.removeprefix("http://")
    for uri in (f"http://detloop:{TOKEN}@{host}", f"{server.url}/?access_token={TOKEN}"):
        args = ci_overrides(digits_tiny, tmp_path, *FAST, f"tracking.uri={uri}")
        assert main(["run", str(CI_CONFIG), *args]) == 2
        out = capsys.readouterr()
        assert "MLFLOW_TRACKING_TOKEN" in out.err
        assert TOKEN not in out.out + out.err
        assert not (tmp_path / "ci").exists()
