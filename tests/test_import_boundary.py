"""The pure layers (data, config, selectors) never import torch or ray (in a fresh process)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

PURE_MODULES = ["detloop.data", "detloop.data.cli", "detloop.config", "detloop.selectors"]
HEAVY = ("torch", "ray")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` are in ``sys.modules`` after importing ``module`` in a new process."""
    code = (
        f"import importlib, json, sys; importlib.import_module({module!r}); "
        f"print(json.dumps([m for m in {watched!r} if m in sys.modules]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_does_not_import_torch_or_ray(module: str) -> None:
    if not _importable(module):
        pytest.skip(f"{module} does not exist yet")
    assert _loaded_after_import(module, HEAVY) == []


def test_the_check_sees_what_a_module_imports() -> None:
    assert _loaded_after_import("detloop.data", ("pyarrow", "torch")) == ["pyarrow"]
