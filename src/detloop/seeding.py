"""Derived random generators: one per (seed, iteration, stage), so a resumed run draws the
same numbers as an uninterrupted one (ARCHITECTURE §8, "Randomness")."""

from __future__ import annotations

import zlib

import numpy as np


def seed_sequence(seed: int, iteration: int, stage: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, iteration, zlib.crc32(stage.encode())])


def derive_seed(seed: int, iteration: int, stage: str) -> int:
    """A 32-bit integer seed for (seed, iteration, stage), e.g. for torch generators."""
    return int(seed_sequence(seed, iteration, stage).generate_state(1)[0])


def rng(seed: int, iteration: int, stage: str) -> np.random.Generator:
    """The generator of one stochastic stage."""
    return np.random.default_rng(seed_sequence(seed, iteration, stage))
