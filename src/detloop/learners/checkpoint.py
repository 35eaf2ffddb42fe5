"""Checkpoints: a directory holding ``model.pt`` and ``metadata.json`` (ARCHITECTURE §8).

A directory is written complete into a temporary sibling and moved into place with
``os.replace``; a reader never sees half a checkpoint. Weights load only from local files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from detloop.data.errors import DataError
from detloop.data.io import create_temp_dir
from detloop.learners.model import ModelSpec, UncertainEfficientDet

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
META_FILE = "metadata.json"
STATE_FILE = "train_state.pt"
FORMAT = "detloop-checkpoint"


def write_checkpoint(
    directory: Path,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically (re)place ``directory`` with a checkpoint; returns ``directory``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_dir(directory)  # 0777 less the umask (mkdtemp: 0700, unreadable by others)
    try:
        torch.save(state_dict, tmp / MODEL_FILE)
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        meta = {"format": FORMAT, "version": 1, **metadata}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: Path) -> dict[str, Any]:
    """The metadata of a checkpoint directory.

    Raises:
        DataError: the directory or its metadata is missing or not a detloop checkpoint.
    """
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise DataError(str(directory), None, None, "not a checkpoint directory (no metadata.json)")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(str(meta_path), None, "format", f"not a {FORMAT} metadata file")
    return meta


def weights_file(path: Path) -> Path:
    """The file a weights path names: ``model.pt`` inside a checkpoint directory, else itself."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def load_state_dict(path: Path | bytes | dict[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint directory, a weights file, raw bytes or a dict.

    Accepts a plain state dict, or a mapping holding one under ``state_dict`` or ``model``
    (effdet / timm training checkpoints).

    Raises:
        DataError: the file is missing or unreadable.
    """
    if isinstance(path, dict):
        obj: Any = path
    elif isinstance(path, bytes):
        obj = torch.load(io.BytesIO(path), map_location="cpu", weights_only=True)
    else:
        file = weights_file(path)
        if not file.is_file():
            raise DataError(str(file), None, None, "weights file not found (nothing is downloaded)")
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(str(file), None, None, f"cannot read weights ({exc})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise DataError(str(path)[:200], None, None, "weights hold no state dict")
    return obj


def load_weights(model: UncertainEfficientDet, path: Path, kind: str = "full") -> None:
    """Initialise ``model`` from a local file, as ``kind`` says.

    ``full``: a detloop model of the same spec, every tensor (strict; a model bundle of other
    classes: ``learners.bundle.load_start_weights``). ``backbone`` (the backbone of a detector
    checkpoint, or a plain timm classifier checkpoint) and ``detector`` (every tensor of an
    effdet checkpoint that fits): :mod:`detloop.learners.foreign_weights`, which logs what was
    loaded and skipped.

    Raises:
        DataError: missing file, or weights that do not fit the model.
    """
    state = load_state_dict(path)
    if kind in ("backbone", "detector"):
        from detloop.learners.foreign_weights import load_foreign

        load_foreign(model, state, kind, str(path))
        return
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(str(path), None, None, f"weights do not fit the model: {exc}") from None
    log.info("loaded %s weights from %s", kind, path)


def state_bytes(model: UncertainEfficientDet) -> bytes:
    """The model's weights serialised (for the Ray object store)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def model_from_checkpoint(directory: Path) -> tuple[UncertainEfficientDet, dict[str, Any]]:
    """Rebuild the network stored in a checkpoint directory (weights loaded, eval mode)."""
    meta = read_metadata(directory)
    model = UncertainEfficientDet(ModelSpec.from_json(meta["model_spec"]))
    load_weights(model, Path(directory), "full")
    model.eval()
    return model, meta
