"""Atomic writes create files like any ordinary file: mode 0666 less the process umask."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from detloop.data import io, schema
from detloop.data.rundir import RunDir


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after the test (each test sets its own)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_all(directory: Path) -> list[Path]:
    """A table, a JSON document and a plain atomic text file; returns their paths."""
    table = directory / "t.parquet"
    doc = directory / "d.json"
    text = directory / "x.txt"
    io.write_table(schema.CATEGORIES.empty(), schema.CATEGORIES, table)
    io.write_json({"a": 1}, doc)
    with io.atomic_open(text) as fh:
        fh.write("hello\n")
    return [table, doc, text]


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(
    tmp_path: Path, umask: None, mask: int, expected: int
) -> None:
    os.umask(mask)
    for path in _write_all(tmp_path / "out"):
        assert _mode(path) == expected, path.name
    # and when the target already exists (os.replace over an older file)
    for path in _write_all(tmp_path / "out"):
        assert _mode(path) == expected, path.name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d.json", "t.parquet", "x.txt"]


def test_run_directory_state_files_are_readable_by_others(tmp_path: Path, umask: None) -> None:
    os.umask(0o022)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_meta({"kind": "al"})
    run.write_images(schema.IMAGES.empty())
    for path in (run.run_json, *run.path.rglob("*.parquet")):
        assert _mode(path) == 0o644, path
    assert _mode(run.path) == 0o755


def test_temp_dir_honours_the_umask(tmp_path: Path, umask: None) -> None:
    os.umask(0o022)
    first = io.create_temp_dir(tmp_path / "ckpt")
    second = io.create_temp_dir(tmp_path / "ckpt")
    assert first != second and first.parent == tmp_path and first.name.startswith(".ckpt.")
    assert _mode(first) == 0o755
    os.umask(0o077)
    assert _mode(io.create_temp_dir(tmp_path / "ckpt")) == 0o700


def test_failed_write_leaves_no_temporary_file_and_keeps_the_target(tmp_path: Path) -> None:
    target = tmp_path / "d.json"
    io.write_json({"v": 1}, target)
    with pytest.raises(RuntimeError), io.atomic_open(target) as fh:
        fh.write('{"v": 2')
        raise RuntimeError("killed mid-write")
    assert io.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["d.json"]


def test_temp_names_do_not_collide_across_threads(tmp_path: Path) -> None:
    made: list[Path] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(50):
            path = io.create_temp_file(tmp_path / "t.parquet")
            with lock:
                made.append(path)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == len(made) == 200
    assert all(p.name.startswith(".t.parquet.") and p.name.endswith(".tmp") for p in made)
