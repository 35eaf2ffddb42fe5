"""``select(predictions, images, spec, budget, ctx)``: one AL query (ALGORITHMS §9, ARCH §8).

prepare columns (calib/norm) → score → per-image aggregation (max/mean) → fusion (vectors) →
class weights (perc) → ordering (top-k/bottom-k/nee), unscored images last. Pure tables in, the
selection table out: every candidate with its score, rank and whether it was selected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from detloop.data import schema
from detloop.data.min_score import DEFAULT_MIN_SCORE
from detloop.selectors.columns import DetColumns, FloatArray, IntArray
from detloop.selectors.scores import ScoreContext, ScoreInfo, get_score
from detloop.selectors.stages import (
    BoolArray,
    aggregate,
    candidate_ids,
    fuse,
    image_codes,
    order_images,
    perc_weights,
)
from detloop.selectors.strategy import StrategySpec, format_strategy, parse_strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectContext:
    """What a selection needs besides the tables (ARCHITECTURE §8).

    Attributes:
        min_score: detections with score > min_score count (§3 consumer filter).
        rng: the stage's generator (random scores, unscored fill).
        iteration: written into the selection table.
        thresholds: thresholding result (§7.4 JSON as a dict), needed by ``combo``.
    """

    min_score: float = DEFAULT_MIN_SCORE
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    iteration: int = 0
    thresholds: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ImageScores:
    """Per-candidate results of the scoring stages."""

    score: FloatArray
    scored: BoolArray
    n_det: IntArray
    components: FloatArray | None


def _kept_rows(
    predictions: pa.Table, cands: pa.Array, min_score: float
) -> tuple[IntArray, IntArray]:
    """Rows of candidate images with score > ``min_score``, and their image codes.

    Raises:
        MissingColumnError, NonFiniteColumnError: a candidate's row has a null, NaN or ±inf
            detection score (NaN would drop the row silently, as ``NaN > min_score`` is false).
    """
    codes = image_codes(predictions.column("image_id"), cands)
    det_score = np.asarray(predictions.column("score").to_numpy(), dtype=np.float32)
    is_cand = codes >= 0
    if not np.isfinite(det_score).all():  # raises for a candidate's row, ignores the others
        DetColumns(predictions, rows=np.flatnonzero(is_cand)).raw("score")
    keep = is_cand & (det_score > np.float32(min_score))
    rows = np.flatnonzero(keep)
    return rows, codes[rows]


def score_images(
    predictions: pa.Table, cands: pa.Array, spec: StrategySpec, ctx: SelectContext
) -> ImageScores:
    """Score every candidate image (the stages before ordering).

    ``random`` draws one uniform value per candidate (images without detections included, so
    the warm-up and the random baseline sample the whole pool); every other score leaves images
    without a detection above ``min_score`` unscored (NaN), as does ``perc`` (its class weight
    is undefined there, even under ``random``). Every image with such a detection is scored,
    and every scored image's score is finite: constant components scale to 0, a single image
    or detection is a constant, and float32-range columns cannot overflow in float64.

    Raises:
        ValueError: a scored image got a non-finite score anyway (a bug, or a table that was
            not validated): refused rather than ranked silently after every scored image.
    """
    info: ScoreInfo = get_score(spec.score)
    n = len(cands)
    rows, codes = _kept_rows(predictions, cands, ctx.min_score)
    n_det = np.bincount(codes, minlength=n).astype(np.int64)
    components: FloatArray | None = None
    cols = DetColumns(predictions, calib=spec.calib, rows=rows)
    if info.kind == "image":  # one value per candidate, images without detections included
        score = info.fn(cols, ScoreContext(rng=ctx.rng, n_images=n))
        scored = np.ones(n, dtype=bool)
    else:
        sctx = ScoreContext(rng=ctx.rng, thresholds=ctx.thresholds, norm=spec.norm)
        values = info.fn(cols, sctx)
        agg = aggregate(values, codes, n, spec.aggregation)
        scored = n_det > 0
        score = np.full(n, np.nan)
        if info.kind == "vector":
            components = agg
            score[scored] = fuse(agg[scored], info.fusion)
        else:
            score[scored] = agg[scored]
    if spec.perc:
        class_ids = np.asarray(predictions.column("class_id").to_numpy(), dtype=np.int64)[rows]
        weights = perc_weights(class_ids, codes, n)
        scored = scored & np.isfinite(weights)
        score = np.where(scored, score * weights, np.nan)
    _check_finite(score, scored, spec)
    return ImageScores(score, scored, n_det, components)


def _check_finite(score: FloatArray, scored: BoolArray, spec: StrategySpec) -> None:
    """Refuse non-finite scores of scored images (``order_images`` would rank NaN last)."""
    bad = scored & ~np.isfinite(score)
    if bad.any():
        n_bad = int(bad.sum())
        raise ValueError(
            f"strategy {format_strategy(spec)!r}: {n_bad} of {int(scored.sum())} scored images "
            "got a non-finite score (inf/NaN); they would rank after every scored image and "
            "never be selected. Validate the predictions table (schema.validate_table)."
        )


def _components_column(comp: FloatArray | None, scored: BoolArray, order: IntArray) -> pa.Array:
    n = len(order)
    if comp is None:
        return pa.nulls(n, pa.list_(pa.float64()))
    comp = comp[order]
    k = comp.shape[1]
    flat = pa.array(comp.reshape(-1), pa.float64())
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    mask = pa.array(~scored[order])
    return pa.ListArray.from_arrays(offsets, flat, mask=mask)


def selection_table(
    cands: pa.Array,
    result: ImageScores,
    rank: IntArray,
    selected: BoolArray,
    strategy: str,
    iteration: int,
) -> pa.Table:
    """The selection table (schema.SELECTION), one row per candidate, ordered by rank."""
    n = len(rank)
    order = np.empty(n, dtype=np.int64)
    order[rank] = np.arange(n)  # rank is a permutation: invert it instead of sorting
    score = result.score[order]
    table = pa.table(
        {
            "image_id": cands.take(pa.array(order)),
            "iteration": pa.array(np.full(n, iteration, dtype=np.int32)),
            "strategy": _repeat(strategy, n),
            "score": pa.array(score, pa.float64(), mask=~result.scored[order]),
            "rank": pa.array(rank[order].astype(np.int32)),
            "selected": pa.array(selected[order]),
            "n_det": pa.array(result.n_det[order].astype(np.int32)),
            "components": _components_column(result.components, result.scored, order),
        }
    )
    return schema.validate_table(table, schema.SELECTION)


def _repeat(value: str, n: int) -> pa.Array:
    dictionary = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), [value])
    return dictionary.cast(pa.string())


def select(
    predictions: pa.Table,
    images: pa.Table,
    spec: StrategySpec | str | Mapping[str, Any],
    budget: int,
    ctx: SelectContext,
) -> pa.Table:
    """Select ``budget`` images of the unlabeled pool by ``spec``.

    Args:
        predictions: predictions table (schema.PREDICTIONS); rows of non-candidate images are
            ignored.
        images: images table; candidates are split ``pool`` with state ``unlabeled``.
        spec: the strategy (parsed or a name/mapping to parse).
        budget: number of images to select (n_i).
        ctx: min_score, generator, iteration and thresholding result.

    Returns:
        The selection table (schema.SELECTION), every candidate, ordered by rank.

    Raises:
        StrategyError: bad strategy. MissingColumnError: a score's column is absent or null.
        NonFiniteColumnError: a score's column holds ±inf (unvalidated table).
        ValueError: negative budget, ``combo`` without a thresholding result, or a scored
            image with a non-finite score.
    """
    spec = parse_strategy(spec)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    cands = candidate_ids(images)
    if budget > len(cands):
        log.warning("budget %d exceeds the %d candidate images; taking all", budget, len(cands))
    result = score_images(predictions, cands, spec, ctx)
    rank, selected = order_images(result.score, result.scored, spec.ordering, budget, ctx.rng)
    n_unscored = int(selected.sum() - (selected & result.scored).sum())
    if n_unscored:
        log.info("%d unscored images drawn at random to fill the budget", n_unscored)
    return selection_table(cands, result, rank, selected, format_strategy(spec), ctx.iteration)
