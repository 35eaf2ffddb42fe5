"""What every benchmark script shares: paths and the local-only Ray/MLflow environment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detloop.runtime_env import apply_local_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def local_env() -> None:
    """Keep Ray on loopback without tokens or telemetry, and MLflow quiet."""
    apply_local_env()


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
