"""Import boundary: ``detloop.selectors`` never imports torch or Ray (ARCHITECTURE §1)."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "detloop.selectors",
    "detloop.selectors.pipeline",
    "detloop.selectors.prune",
    "detloop.selectors.pseudo",
    "detloop.selectors.oss",
    "detloop.selectors.oss_run",
    "detloop.selectors.cli",
]


def test_selectors_import_neither_torch_nor_ray() -> None:
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"selectors imported {out.stdout.strip()}"
