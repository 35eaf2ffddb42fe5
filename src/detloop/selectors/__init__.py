"""Pure functions over prediction tables: AL queries, pseudo-labels, pruning, OSS, thresholds.

Never imports torch or Ray (tests/test_selectors_boundary.py checks it). Public API::

    parse_strategy(name) -> StrategySpec          format_strategy(spec) -> str
    select(predictions, images, spec, budget, ctx: SelectContext) -> selection table
    iteration_sizes(n_pool, budgets)              loop_budgets(spec, budgets, n_orig, n_kept)
    prune_ids(pool, threshold, random, rng)       prune_pool(images, spec, prune_thr, rng)
    select_pseudo_labels(predictions, spec, tau, thresholds)   pls_scores / pls_select
    get_score(name) / list_scores(glob) / register_score(...)
"""

from __future__ import annotations

from detloop.selectors.budgets import iteration_sizes, loop_budgets, rescale_budgets
from detloop.selectors.columns import MissingColumnError, NonFiniteColumnError
from detloop.selectors.pipeline import SelectContext, select
from detloop.selectors.prune import PruneResult, duplicate_mask, prune_ids, prune_pool
from detloop.selectors.pseudo import (
    PseudoSpec,
    parse_pseudo_strategy,
    pls_scores,
    pseudo_labels_table,
    select_pseudo_labels,
)
from detloop.selectors.scores import ScoreInfo, get_score, list_scores, register_score
from detloop.selectors.ssl_pls import pls_select
from detloop.selectors.strategy import StrategyError, StrategySpec, format_strategy, parse_strategy

__all__ = [
    "MissingColumnError",
    "NonFiniteColumnError",
    "PruneResult",
    "PseudoSpec",
    "ScoreInfo",
    "SelectContext",
    "StrategyError",
    "StrategySpec",
    "duplicate_mask",
    "format_strategy",
    "get_score",
    "iteration_sizes",
    "list_scores",
    "loop_budgets",
    "parse_pseudo_strategy",
    "parse_strategy",
    "pls_scores",
    "pls_select",
    "prune_ids",
    "prune_pool",
    "pseudo_labels_table",
    "register_score",
    "rescale_budgets",
    "select",
    "select_pseudo_labels",
]
