"""Validated, atomic reads and writes of Parquet tables and JSON documents.

Every write goes to a temporary file in the target's directory, is fsynced, then moved over
the target with ``os.replace``; a failure at any point leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from detloop.data.errors import DataError
from detloop.data.schema import META_TABLE, META_VERSION, SCHEMA_VERSION, TableSpec, validate_table


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success move it over ``target``.

    The caller writes the complete file to the yielded path. On an exception the temporary
    file is removed and ``target`` is unchanged.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``target`` atomically on success."""
    with atomic_path(target) as tmp, open(tmp, mode) as fh:
        yield fh


def write_table(
    table: pa.Table, spec: TableSpec, path: str | os.PathLike[str], *, validate: bool = True
) -> pa.Table:
    """Validate ``table`` against ``spec`` and write it atomically as Parquet.

    Returns:
        The table as written (canonical types, with metadata).
    """
    path = Path(path)
    if validate:
        table = validate_table(table, spec, file=str(path))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table


def read_table(
    spec: TableSpec, path: str | os.PathLike[str], *, columns: list[str] | None = None
) -> pa.Table:
    """Read a Parquet table and validate it against ``spec``.

    Raises:
        DataError: if the file is missing, unreadable, of another table or schema version, or
            does not satisfy the schema.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), None, None, f"{spec.name} table does not exist")
    try:
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        table = pf.read(columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(str(path), None, None, f"unreadable Parquet file: {exc}") from exc
    name = meta.get(META_TABLE)
    if name is not None and name.decode() != spec.name:
        raise DataError(str(path), None, None, f"holds table {name.decode()!r}, not {spec.name!r}")
    version = meta.get(META_VERSION)
    if version is not None and version.decode() != SCHEMA_VERSION:
        raise DataError(
            str(path),
            None,
            None,
            f"schema version {version.decode()} is not the supported {SCHEMA_VERSION}",
        )
    if columns is not None:
        return table
    return validate_table(table, spec, file=str(path))


def write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON document, raising ``DataError`` with the position of a syntax error."""
    path = Path(path)
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise DataError(str(path), None, None, "file does not exist") from exc
    except json.JSONDecodeError as exc:
        raise DataError(
            str(path),
            None,
            None,
            f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
        ) from exc
