"""Where learners run: a torch device from the config or from the Ray resources given."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)


def resolve_device(
    name: str | None = "auto", resources: Mapping[str, float] | None = None
) -> torch.device:
    """The torch device to use.

    Args:
        name: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        resources: Ray resources of the calling worker (e.g. ``{"GPU": 1.0}``); when given
            with ``auto``, a worker without GPUs runs on the CPU even if the host has CUDA.

    Raises:
        ValueError: an unknown name, or CUDA requested where none is available.
    """
    name = (name or "auto").lower()
    if name == "auto":
        wants_gpu = resources is None or float(resources.get("GPU", 0.0)) > 0
        return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} requested but CUDA is not available; use 'auto' or 'cpu'"
            )
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format of images and conv weights (``model.channels_last``)."""
    return torch.channels_last if channels_last else torch.contiguous_format
