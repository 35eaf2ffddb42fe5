"""Which images each training step takes: one stream (supervised) or a labeled and a
pseudo-labeled stream (the STAC student, ALGORITHMS §11.1).

With n_u pseudo-labeled images beside n_l labeled ones, a batch of B holds

    L = max(1, ceil(B·n_l/(n_l + n_u)))      U = max(1, floor(B·n_u/(n_l + n_u)))

images of each, and an epoch has ceil(max(n_l/L, n_u/U)) steps (detloop decision: the shorter
stream cycles, so both sets are traversed every epoch; the reference replaced one count by the
other in one branch). Integer arithmetic throughout, so the pins hold exactly (B = 8,
n_l = 598, n_u = 5 387: L = 1, U = 7, 770 steps). Orders are seeded by (seed, epoch, stream,
cycle), so a resumed run takes the same batches, and the one-stream order is the one a
supervised run always had. CSD (§11.9, ``Streams.csd``) fills the second stream with
unlabeled images and takes B // (ratio + 1) labeled images per batch instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from detloop.selectors.ssl_csd import csd_split

_LABELED, _PSEUDO = 7, 8  # stream tags in the seeds (7: the supervised order since day one)


@dataclass(frozen=True)
class Streams:
    """The batch composition of a training: ``labeled`` + ``pseudo`` images per step."""

    n_labeled: int
    n_pseudo: int
    labeled: int
    pseudo: int
    steps_per_epoch: int

    @classmethod
    def of(
        cls, batch_size: int, n_labeled: int, n_pseudo: int = 0, labeled: int | None = None
    ) -> Streams:
        """The §11.1 arithmetic (one stream of ``batch_size`` when ``n_pseudo`` is 0); with
        ``labeled`` (``ssl.labeled_per_batch``) L = labeled and U = B − L instead."""
        if n_labeled < 1 or n_pseudo < 0 or batch_size < 1:
            raise ValueError(f"no batches for n_l={n_labeled}, n_u={n_pseudo}, B={batch_size}")
        if n_pseudo == 0:
            return cls(n_labeled, 0, batch_size, 0, math.ceil(n_labeled / batch_size))
        n = n_labeled + n_pseudo
        n_l = max(1, -(-batch_size * n_labeled // n))
        n_u = max(1, batch_size * n_pseudo // n)
        if labeled is not None:
            if not 1 <= labeled < batch_size:
                raise ValueError(f"labeled per batch {labeled} outside 1..{batch_size - 1}")
            n_l, n_u = labeled, batch_size - labeled
        steps = max(-(-n_labeled // n_l), -(-n_pseudo // n_u))
        return cls(n_labeled, n_pseudo, n_l, n_u, steps)

    @classmethod
    def csd(cls, batch_size: int, n_labeled: int, n_unlabeled: int, ratio: int) -> Streams:
        """CSD's batches (ALGORITHMS §11.9): B // (ratio + 1) labeled images, the rest
        unlabeled (``ratio`` is unlabeled : labeled; the unlabeled stream takes the place of the
        pseudo-labeled one). An epoch traverses both streams, as the student's (§11.1)."""
        per = csd_split(n_labeled + n_unlabeled, batch_size, ratio)
        if n_labeled < 1 or n_unlabeled < 1 or per.labeled_per_batch < 1:
            raise ValueError(
                f"no CSD batches for n_l={n_labeled}, n_u={n_unlabeled}, B={batch_size}, "
                f"ratio={ratio} (each batch needs a labeled and an unlabeled image)"
            )
        n_l, n_u = per.labeled_per_batch, per.unlabeled_per_batch
        steps = max(-(-n_labeled // n_l), -(-n_unlabeled // n_u))
        return cls(n_labeled, n_unlabeled, n_l, n_u, steps)

    @property
    def batch_size(self) -> int:
        return self.labeled + self.pseudo

    def epoch_batches(self, seed: int, epoch: int) -> list[list[int]]:
        """Dataset indices of every step of ``epoch``: labeled images are 0..n_l-1, pseudo
        ones n_l..n_l+n_u-1; each batch lists its labeled part first."""
        if self.n_pseudo == 0:
            order = _cycled(self.n_labeled, self.n_labeled, seed, epoch, _LABELED)
            b = self.labeled
            return [order[i : i + b].tolist() for i in range(0, self.n_labeled, b)]
        steps = self.steps_per_epoch
        lab = _cycled(self.n_labeled, steps * self.labeled, seed, epoch, _LABELED)
        pse = _cycled(self.n_pseudo, steps * self.pseudo, seed, epoch, _PSEUDO) + self.n_labeled
        return [
            [
                *lab[s * self.labeled : (s + 1) * self.labeled].tolist(),
                *pse[s * self.pseudo : (s + 1) * self.pseudo].tolist(),
            ]
            for s in range(steps)
        ]


def _cycled(n: int, length: int, seed: int, epoch: int, stream: int) -> np.ndarray:
    """``length`` indices of 0..n-1: seeded permutations, one after the other (a new one per
    pass), so every index appears once before any appears twice."""
    parts = [np.random.default_rng([seed, epoch, stream]).permutation(n)]
    cycle = 1
    while len(parts) * n < length:
        parts.append(np.random.default_rng([seed, epoch, stream, cycle]).permutation(n))
        cycle += 1
    return np.concatenate(parts)[:length]
