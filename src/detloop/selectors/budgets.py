"""Iteration budgets (ALGORITHMS §9.1) and their rescaling after pruning (§9.5)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from detloop.selectors.strategy import StrategySpec


def _exact(b: float) -> Fraction:
    """A budget percentage as the decimal it was written as (5.1 is 51/10, not a binary float)."""
    return Fraction(repr(float(b)))


def iteration_sizes(n_pool: int, budgets: Sequence[float]) -> list[int]:
    """Images to select per iteration: n_i = int(N·b_i/100), the last absorbing the remainder.

    The last entry takes int(N·Σb/100) minus the others, so a list summing to 100 ends at
    exactly N (N = 5 985, [5, 5, 5, 10, 20, 30, 25] → [299, 299, 299, 598, 1197, 1795, 1498]).

    Raises:
        ValueError: negative pool size, empty list, non-positive entries or a sum above 100.
    """
    if n_pool < 0:
        raise ValueError(f"pool size must be >= 0, got {n_pool}")
    if not budgets or any(b <= 0 for b in budgets):
        raise ValueError(f"budgets must be a non-empty list of positive percentages: {budgets}")
    exact = [_exact(b) for b in budgets]
    total = sum(exact, Fraction(0))
    if total > 100:
        raise ValueError(f"budgets sum to {float(total)} %, more than the whole pool")
    sizes = [math.floor(n_pool * b / 100) for b in exact[:-1]]
    sizes.append(math.floor(n_pool * total / 100) - sum(sizes))
    return sizes


def rescale_budgets(budgets: Sequence[float], n_original: int, n_kept: int) -> list[float]:
    """Budgets of the pruned pool that keep iterations at 5 %, 10 %, … of the original (§9.5).

    Every entry is multiplied by N_original/N_kept; entries are kept while the cumulative sum
    stays ≤ 100.

    Raises:
        ValueError: sizes that are not 0 < n_kept ≤ n_original.
    """
    if not 0 < n_kept <= n_original:
        raise ValueError(f"need 0 < kept ({n_kept}) <= original ({n_original})")
    factor = Fraction(n_original, n_kept)
    out: list[float] = []
    cumulative = Fraction(0)
    for b in budgets:
        scaled = _exact(b) * factor
        if cumulative + scaled > 100:
            break
        cumulative += scaled
        out.append(float(scaled))
    return out


def loop_budgets(
    spec: StrategySpec, budgets: Sequence[float], n_original: int, n_kept: int
) -> list[float]:
    """The budget list a loop runs with after the strategy's pruning (if any).

    ``prune``: rescaled (``rescale_budgets``); ``full_prune``: ``[100]``, one training on the
    whole pruned pool; otherwise unchanged.
    """
    if spec.prune == "full_prune":
        return [100.0]
    if spec.prune == "prune":
        return rescale_budgets(budgets, n_original, n_kept)
    return [float(b) for b in budgets]
