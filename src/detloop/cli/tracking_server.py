"""``detloop tracking-server``: an MLflow tracking server for loops whose processes do not
share the SQLite file (a cluster), or for a team's UI.

It replaces itself with ``mlflow server`` of this interpreter, with a SQLite backend at
``DIR/mlflow.db`` and artifacts proxied by the server (``--serve-artifacts``) into
``DIR/mlartifacts``, so the loops need only ``tracking.uri: http://HOST:PORT`` and
never the server's disk. Bound to 127.0.0.1 unless told otherwise: the server has no
authentication of its own, so any other address needs ``--allow-remote`` (and a proxy or
network that restricts who reaches it).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from detloop.cli.common import UsageError
from detloop.data.rundir import RunsRoot


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tracking-server",
        help="start an MLflow tracking server (SQLite + proxied artifacts) for the loops",
        description="Start `mlflow server` with a SQLite backend at DIR/mlflow.db and "
        "artifacts proxied into DIR/mlartifacts; loops reach it with "
        "`--set tracking.uri=http://HOST:PORT`. Stops with Ctrl-C.",
    )
    p.add_argument(
        "--runs-root", type=Path, required=True, metavar="DIR", help="where the server keeps "
        "its store and artifacts (e.g. the runs root whose mlflow.db the loops used so far)"
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server worker processes (default 1: SQLite serialises the writes anyway)",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="bind an address other than loopback (the server has no authentication: put it "
        "behind a proxy or a network that does)",
    )
    p.set_defaults(func=cmd_tracking_server)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def server_command(runs_root: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line of this interpreter for ``runs_root``."""
    root = RunsRoot(runs_root)
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", root.tracking_uri,
        "--serve-artifacts",
        "--artifacts-destination", str(root.artifacts.resolve()),
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip


def cmd_tracking_server(args: argparse.Namespace) -> int:
    if not is_loopback(args.host) and not args.allow_remote:
        raise UsageError(
            f"--host {args.host} is not a loopback address: the MLflow server has no "
            "authentication, so anyone who reaches it can read and write every experiment. "
            "Give --allow-remote to bind it anyway (behind a proxy or firewall), or keep "
            "127.0.0.1 and reach it through an SSH tunnel"
        )
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1..65535, got {args.port}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    root = Path(args.runs_root)
    root.mkdir(parents=True, exist_ok=True)
    command = server_command(root, args.host, args.port, args.workers)
    host = f"[{args.host}]" if ":" in args.host else args.host
    sys.stderr.write(
        f"detloop: MLflow tracking server for {root} on http://{host}:{args.port}\n"
        f"  loops: --set tracking.uri=http://{host}:{args.port}\n"
        f"  report: detloop report --experiment NAME --tracking-uri http://{host}:{args.port}\n"
    )
    sys.stderr.flush()
    sys.stdout.flush()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # the GenAI job runner (scorers, trace roll-ups: a process per queue) serves nothing of
    # detloop's; set it to true to have it anyway
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(command[0], command)  # replaces this process: Ctrl-C and signals reach MLflow
    return 0  # pragma: no cover - execv does not return
