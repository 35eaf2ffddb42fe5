"""CSD schedule pieces (ALGORITHMS §11.9): the labeled/unlabeled split and per-batch counts,
and the consistency-loss ramp w(t). Pure arithmetic; the losses live with the trainer.

``ratio`` is **unlabeled : labeled** (B = 8, ratio 3 → 2 labeled + 6 unlabeled per batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

#: Ramp breakpoints as fractions of the N total iterations (the reference's 32k, 100k and
#: 20k of 120k iterations).
RAMP_UP: Final = Fraction(32_000, 120_000)
RAMP_DOWN: Final = Fraction(100_000, 120_000)
RAMP_TAIL: Final = Fraction(20_000, 120_000)


@dataclass(frozen=True)
class CsdSplit:
    """``num_labeled`` images of the pool are labeled; each batch of ``batch_size`` holds
    ``labeled_per_batch`` of them and ``unlabeled_per_batch`` unlabeled ones."""

    num_labeled: int
    labeled_per_batch: int
    unlabeled_per_batch: int


def csd_split(n: int, batch_size: int, ratio: int) -> CsdSplit:
    """num_labeled = int((N // B)·B/(ratio + 1)); per batch B // (ratio + 1) labeled."""
    if batch_size < 1 or ratio < 0 or n < 0:
        raise ValueError(
            f"CSD split needs N ≥ 0, B ≥ 1, ratio ≥ 0 (got {n}, {batch_size}, {ratio})"
        )
    num_labeled = int((n // batch_size) * batch_size / (ratio + 1))
    per_batch = batch_size // (ratio + 1)
    return CsdSplit(num_labeled, per_batch, batch_size - per_batch)


def csd_ramp(t: float, n_total: float) -> float:
    """Consistency weight w(t) at iteration t of N (§11.9)::

        w(0) = 0;  exp(−5·(1 − t/t_up)²) for t < t_up;  1 for t_up ≤ t ≤ t_down;
        exp(−12.5·(1 − (N − t)/((20k/120k)·N))²) for t > t_down

    with t_up = (32k/120k)·N, t_down = (100k/120k)·N. The breakpoints are compared exactly
    (rationals), so t = t_up and t = t_down give 1.
    """
    if n_total <= 0 or not 0 <= t <= n_total:
        raise ValueError(f"CSD ramp: need 0 ≤ t ≤ N and N > 0 (got t={t}, N={n_total})")
    if t == 0:
        return 0.0
    tq, nq = Fraction(t), Fraction(n_total)
    if tq < RAMP_UP * nq:
        return math.exp(-5.0 * float(1 - tq / (RAMP_UP * nq)) ** 2)
    if tq <= RAMP_DOWN * nq:
        return 1.0
    return math.exp(-12.5 * float(1 - (nq - tq) / (RAMP_TAIL * nq)) ** 2)
