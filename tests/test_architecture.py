"""The layering of docs/architecture.md as a checked contract.

import-linter (`[tool.importlinter]` in pyproject.toml, also run by `make lint`) keeps the rooms
layered and the selectors and data pure; a planted forbidden import in a copy of the tree must
break it. grimp's import graph must have no cycle between modules, and no function in `src/`
may grow past 60 lines without a comment that says why.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 60
WHY_LONG = "# long:"  # a function over MAX_LINES says why with a comment starting like this


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over the package under ``root/src`` with ``root``'s contracts."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(SRC, root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_import_contracts_hold() -> None:
    out = lint_imports(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract"),
    [
        ("selectors/scores.py", "import torch", "selectors are pure"),
        ("learners/nms.py", "from detloop.orchestrator.engine import journal", "Rooms are layered"),
        ("data/pool.py", "from detloop.config import ExperimentConfig", "Rooms are layered"),
        ("orchestrator/engine/runs.py", "from detloop.cli.common import UsageError", "layered"),
        ("orchestrator/loops/grid.py", "import ray", "Only the engine imports Ray"),
    ],
)
def test_a_planted_forbidden_import_breaks_the_contracts(
    tree_copy: Path, module: str, planted: str, contract: str
) -> None:
    target = tree_copy / "src" / "detloop" / module
    original = target.read_text()
    try:
        target.write_text(original + f"\n{planted}  # planted by the test\n")
        out = lint_imports(tree_copy)
    finally:
        target.write_text(original)
    assert out.returncode != 0, out.stdout
    broken = out.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and module.replace("/", ".").removesuffix(".py") in broken


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph("detloop")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(imported, module):
                chain = graph.find_shortest_chain(imported, module)
                cycles.append(f"{module} -> {' -> '.join(chain or ())}")
    assert cycles == []


def long_functions(root: Path) -> list[str]:
    """Functions of ``root`` longer than MAX_LINES whose body has no WHY_LONG comment."""
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                body = lines[node.lineno - 1 : node.end_lineno]
                if len(body) > MAX_LINES and not any(WHY_LONG in line for line in body):
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} {len(body)}")
    return found


def test_no_long_function_without_a_reason() -> None:
    assert long_functions(SRC) == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def f() -> None:\n{body}\n\n\ndef g() -> None:\n    pass\n")
    assert long_functions(tmp_path) == [f"m.py:1 f {MAX_LINES + 1}"]
    (tmp_path / "m.py").write_text(f"def f() -> None:\n    {WHY_LONG} a table\n{body}\n")
    assert long_functions(tmp_path) == []
