"""The environment that keeps Ray on loopback without tokens or telemetry, and MLflow quiet.

Set by the CLI, the demo, the actors' driver, the benchmarks and the tests, from this one place.
"""

from __future__ import annotations

import os
from typing import Final

LOCAL_ENV: Final = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # progress lines of concurrent loops (a grid) look alike; Ray must not merge them
    "RAY_DEDUP_LOGS": "0",
}


def apply_local_env() -> None:
    """Set every variable of ``LOCAL_ENV`` that the user has not set."""
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
