"""Derived random generators: one per (seed, iteration, stage), so a resumed run draws the
same numbers as an uninterrupted one (ARCHITECTURE §8, "Randomness").

This module is the one place that turns a seed into a generator. A stage outside the loop's
iterations (dataset generation, one draw per image) passes ``iteration=None``: its entropy is
``[seed, crc32(stage)]``.
"""

from __future__ import annotations

import zlib

import numpy as np


def seed_sequence(seed: int, iteration: int | None, stage: str) -> np.random.SeedSequence:
    """``SeedSequence([seed, iteration, crc32(stage)])`` (without the iteration when None)."""
    key = zlib.crc32(stage.encode())
    return np.random.SeedSequence([seed, key] if iteration is None else [seed, iteration, key])


def derive_seed(seed: int, iteration: int | None, stage: str) -> int:
    """A 32-bit integer seed for (seed, iteration, stage), e.g. for torch generators."""
    return int(seed_sequence(seed, iteration, stage).generate_state(1)[0])


def rng(seed: int, iteration: int | None, stage: str) -> np.random.Generator:
    """The generator of one stochastic stage."""
    return np.random.default_rng(seed_sequence(seed, iteration, stage))
