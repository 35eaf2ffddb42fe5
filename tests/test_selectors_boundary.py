"""Import boundary: ``detloop.selectors`` never imports torch or Ray (ARCHITECTURE §1)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys


def _modules() -> list[str]:
    """Every module of the package (found on disk, so new ones are checked too)."""
    import detloop.selectors

    names = [
        m.name for m in pkgutil.walk_packages(detloop.selectors.__path__, "detloop.selectors.")
    ]
    return ["detloop.selectors", *sorted(names)]


def test_selectors_import_neither_torch_nor_ray() -> None:
    assert "detloop.selectors.pipeline" in _modules()
    code = (
        "import importlib, sys\n"
        f"for name in {_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"selectors imported {out.stdout.strip()}"
