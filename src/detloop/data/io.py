"""Validated, atomic reads and writes of Parquet tables and JSON documents.

Every write goes to a temporary file in the target's directory, is fsynced, then moved over
the target with ``os.replace``; a failure at any point leaves the previous file untouched.
Files are created like any ordinary file, mode 0666 less the process umask (0644 under the
usual 022), so that teammates, an MLflow or labeling server running as another user, or a node
with another uid can read a shared run directory; a private umask (077) keeps them private.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
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


def _temp_name(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}")


def create_temp_file(target: str | os.PathLike[str]) -> Path:
    """Create an empty, new file beside ``target`` under a unique hidden name.

    Unlike ``tempfile.mkstemp`` (always 0600) the file gets mode 0666 less the umask, as
    ``open(path, "w")`` would: the kernel applies the umask, so no process-wide umask is read
    or changed (that would race with other threads).
    """
    target = Path(target)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = _temp_name(target, ".tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no unused temporary name beside {target}")


def create_temp_dir(target: str | os.PathLike[str]) -> Path:
    """Create an empty, new directory beside ``target`` under a unique hidden name.

    Mode 0777 less the umask, like ``mkdir`` (``tempfile.mkdtemp`` makes it 0700): for a
    directory that is renamed into place, such as a checkpoint.
    """
    target = Path(target)
    for _ in range(100):
        tmp = _temp_name(target, ".tmpdir")
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no unused temporary name beside {target}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success move it over ``target``.

    The caller writes the complete file to the yielded path. On an exception the temporary
    file is removed and ``target`` is unchanged. The file is created with mode 0666 less the
    process umask (see the module docstring).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = create_temp_file(target)
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


def write_parquet(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write an analysis table (no detloop schema) atomically; returns the path."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_digests(root: Path, skip: str = "manifest.json") -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``root`` (POSIX paths relative to it), but ``skip``:
    the body of a folder's manifest."""
    return {
        p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != skip
    }
