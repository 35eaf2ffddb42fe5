"""Stages of the selection pipeline, each a small pure function on numpy arrays (§9.4).

Images are identified by their index among the candidate ids sorted ascending ("codes"), so
"ties by image_id" is a stable sort on that index. Detections are grouped per image by runs
of equal codes (predictions are written image by image, so a run is usually a whole image) and
reduced with ``reduceat``; an image split over several runs is merged with ``ufunc.at`` on the
much shorter run arrays. No pandas groupby, nothing quadratic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from detloop.selectors.columns import FloatArray, IntArray
from detloop.selectors.scores import Fusion

BoolArray = npt.NDArray[np.bool_]

#: Number of equal-count score bins of ``nee`` (Roy et al. 2018).
NEE_BINS = 5


def candidate_ids(images: pa.Table) -> pa.Array:
    """Ids of the selectable images (split ``pool``, state ``unlabeled``), sorted ascending."""
    mask = pc.and_(pc.equal(images["split"], "pool"), pc.equal(images["state"], "unlabeled"))
    ids = pc.filter(images["image_id"], mask).combine_chunks()
    return ids.take(pc.sort_indices(ids))


def _run_starts(chunk: pa.Array) -> IntArray:
    """Offsets where a new run of equal ids begins within one chunk (0 always)."""
    n = len(chunk)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    change = pc.not_equal(chunk.slice(1), chunk.slice(0, n - 1))
    inner = np.flatnonzero(change.to_numpy(zero_copy_only=False)) + 1
    return np.concatenate(([0], inner)).astype(np.int64)


def image_codes(pred_ids: pa.ChunkedArray | pa.Array, candidates: pa.Array) -> IntArray:
    """Per prediction row, the index of its image in ``candidates`` (-1: not a candidate).

    Works run by run (rows of one image are usually adjacent) and chunk by chunk, so the 10⁷
    id strings are compared once and never copied; only the run ids are looked up.
    """
    chunks = pred_ids.chunks if isinstance(pred_ids, pa.ChunkedArray) else [pred_ids]
    starts, run_ids, offset = [], [], 0
    for chunk in chunks:
        local = _run_starts(chunk)
        starts.append(local + offset)
        run_ids.append(chunk.take(pa.array(local)))
        offset += len(chunk)
    if offset == 0:
        return np.zeros(0, dtype=np.int32)
    all_starts = np.concatenate(starts)
    ids = pa.concat_arrays(run_ids) if len(run_ids) > 1 else run_ids[0]
    run_codes = pc.fill_null(pc.index_in(ids, value_set=candidates), -1)
    lengths = np.diff(np.append(all_starts, offset))
    return np.repeat(np.asarray(run_codes.to_numpy(), dtype=np.int32), lengths)


def _segments(codes: IntArray) -> tuple[IntArray, IntArray]:
    """Start offsets of runs of equal codes and the code of each run."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero(codes[1:] != codes[:-1]) + 1))
    return starts, codes[starts]


def aggregate(values: FloatArray, codes: IntArray, n_images: int, how: str) -> FloatArray:
    """Per image ``max`` or ``mean`` of detection values (rows or row vectors).

    Args:
        values: shape (n,) or (n, k), one row per kept detection.
        codes: image index of each row (grouped in runs, any order of runs).
        n_images: number of candidate images.
        how: ``max`` or ``mean``.

    Returns:
        shape (n_images,) or (n_images, k); NaN for images without a row.
    """
    if values.ndim == 2:
        cols = [aggregate(values[:, j], codes, n_images, how) for j in range(values.shape[1])]
        return np.stack(cols, axis=1) if cols else np.full((n_images, 0), np.nan)
    starts, seg_codes = _segments(codes)
    shape = (n_images, *values.shape[1:])
    if len(starts) == 0:
        return np.full(shape, np.nan)
    merged = bool(np.any(np.diff(seg_codes) <= 0)) and bool(
        np.bincount(seg_codes, minlength=n_images).max() > 1
    )
    if how == "max":
        seg = np.maximum.reduceat(values, starts, axis=0)
        out = np.full(shape, -np.inf)
        if merged:
            np.maximum.at(out, seg_codes, seg)
        else:
            out[seg_codes] = seg
        out[np.isneginf(out)] = np.nan
        return out
    if how != "mean":
        raise ValueError(f"aggregation must be max or mean, not {how!r}")
    sums = np.add.reduceat(values, starts, axis=0)
    counts = np.bincount(codes, minlength=n_images).astype(np.float64)
    total = np.zeros(shape)
    if merged:
        np.add.at(total, seg_codes, sums)
    else:
        total[seg_codes] = sums
    with np.errstate(invalid="ignore", divide="ignore"):
        mean: FloatArray = total / (counts if values.ndim == 1 else counts[:, None])
    return mean


def min_max(x: FloatArray) -> FloatArray:
    """Column-wise (x - min)/(max - min); a constant column maps to 0 (§0).

    Results lie in [0, 1] for finite ``x`` (a single row is constant: 0). float32-range
    inputs (|x| ≤ 3.4e38, or that divided by ``MIN_BOX_SIZE``) cannot overflow in float64.
    """
    if len(x) == 0:
        return np.zeros_like(x, dtype=np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = hi - lo
    out: FloatArray = np.divide(
        x - lo, span, out=np.zeros_like(x, dtype=np.float64), where=span > 0
    )
    return out


def z_score(x: FloatArray) -> FloatArray:
    """Column-wise (x - mean)/std (population std); a constant column maps to 0 (§0).

    "Constant" is decided exactly (max = min), not by ``std > 0``: the float mean of equal
    values can be off by an ulp, which would give a tiny std and a spurious ±1 for every row.
    |z| ≤ sqrt(n - 1), so a finite ``x`` gives finite scores.
    """
    if len(x) == 0:
        return np.zeros_like(x, dtype=np.float64)
    std = x.std(axis=0)
    varies = (x.max(axis=0) > x.min(axis=0)) & (std > 0)
    out: FloatArray = np.divide(
        x - x.mean(axis=0), std, out=np.zeros_like(x, dtype=np.float64), where=varies
    )
    return out


F = TypeVar("F", bound=Callable[..., npt.NDArray[Any]])


def _registrar(table: dict[str, F], kind: str) -> Callable[[str], Callable[[F], F]]:
    """``@register(name)`` for one of the stage registries (fusions, orderings)."""

    def register(name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered")
            table[name] = fn
            return fn

        return deco

    return register


FusionFn = Callable[[FloatArray], FloatArray]
_FUSIONS: dict[str, FusionFn] = {}
#: Decorator adding a fusion rule (per-image component rows → one score) under a name.
register_fusion = _registrar(_FUSIONS, "fusion")


@register_fusion("sum")
def _fuse_sum(components: FloatArray) -> FloatArray:
    """Σ of min-max-scaled components."""
    out: FloatArray = min_max(components).sum(axis=1)
    return out


@register_fusion("highep_lowal")
def _fuse_highep_lowal(components: FloatArray) -> FloatArray:
    """On (rel(mc), rel(al), mc_class): (mcbox + mcclass) - albox after min-max scaling."""
    s = min_max(components)
    out: FloatArray = s[:, 0] + s[:, 2] - s[:, 1]
    return out


@register_fusion("sota")
def _fuse_sota(components: FloatArray) -> FloatArray:
    """Max over z-scored components (Choi et al. 2021)."""
    out: FloatArray = z_score(components).max(axis=1)
    return out


def fuse(components: FloatArray, fusion: Fusion) -> FloatArray:
    """Fuse per-image component vectors (rows: scored images) into one score (§9.4) with the
    registered rule ``fusion``."""
    if fusion not in _FUSIONS:
        raise ValueError(f"no fusion rule {fusion!r} for vector scores")
    if len(components) == 0:
        return np.zeros(0)
    return _FUSIONS[fusion](components)


def perc_weights(class_ids: IntArray, codes: IntArray, n_images: int) -> FloatArray:
    """Class-balancing image weights (``perc``, §9.4).

    w_c = N_det / N_det(c) over all given detections; an image's weight is the mean of w_c over
    the distinct classes predicted in it (NaN for images without detections).
    """
    if len(class_ids) == 0:
        return np.full(n_images, np.nan)
    n_cls = int(class_ids.max()) + 1
    counts = np.bincount(class_ids, minlength=n_cls)
    with np.errstate(divide="ignore"):
        w_c = np.where(counts > 0, len(class_ids) / np.maximum(counts, 1), 0.0)
    keys = codes.astype(np.int64) * n_cls + class_ids
    if n_images * n_cls <= 200_000_000:
        present = np.zeros(n_images * n_cls, dtype=bool)
        present[keys] = True
        pairs = np.flatnonzero(present)
    else:
        pairs = np.unique(keys)
    img, cls = pairs // n_cls, pairs % n_cls
    sums = np.bincount(img, weights=w_c[cls], minlength=n_images)
    n = np.bincount(img, minlength=n_images)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: FloatArray = sums / n
    return out


def _nee_pick(ascending: IntArray, n: int) -> IntArray:
    """``nee`` picks from candidate indices sorted by score ascending (Roy et al. 2018).

    5 equal-count bins; k = n // 5; the k highest of each of the first four bins, the
    k + n mod 5 lowest of the last one. Shortfalls (tiny bins) are filled from the highest
    remaining scores.
    """
    bins = np.array_split(ascending, NEE_BINS)
    k = n // NEE_BINS
    picks = [b[len(b) - min(k, len(b)) :] for b in bins[:-1]]
    picks.append(bins[-1][: k + n % NEE_BINS])
    chosen = np.concatenate(picks)
    if len(chosen) < n:
        rest = ascending[~np.isin(ascending, chosen)][::-1]
        chosen = np.concatenate((chosen, rest[: n - len(chosen)]))
    return chosen


OrderFn = Callable[[FloatArray, IntArray, int], IntArray]
_ORDERINGS: dict[str, OrderFn] = {}
#: Decorator adding an ordering ``fn(scores, scored_idx, budget) -> scored_idx ranked``.
register_ordering = _registrar(_ORDERINGS, "ordering")


def registered_orderings() -> tuple[str, ...]:
    return tuple(_ORDERINGS)


def _descending(scores: FloatArray, idx: IntArray) -> IntArray:
    out: IntArray = idx[np.argsort(-scores[idx], kind="stable")]
    return out


@register_ordering("topk")
def _topk(scores: FloatArray, idx: IntArray, budget: int) -> IntArray:
    """Highest first."""
    return _descending(scores, idx)


@register_ordering("bottomk")
def _bottomk(scores: FloatArray, idx: IntArray, budget: int) -> IntArray:
    """Lowest first."""
    out: IntArray = idx[np.argsort(scores[idx], kind="stable")]
    return out


@register_ordering("nee")
def _nee(scores: FloatArray, idx: IntArray, budget: int) -> IntArray:
    """Its picks over 5 score bins first (highest first), then the rest highest first."""
    desc = _descending(scores, idx)
    if budget >= len(idx):
        return desc
    picks = _nee_pick(idx[np.argsort(scores[idx], kind="stable")], budget)
    picks = picks[np.lexsort((picks, -scores[picks]))]
    rest = desc[~np.isin(desc, picks)]
    out: IntArray = np.concatenate((picks, rest))
    return out


def order_images(
    scores: FloatArray, scored: BoolArray, ordering: str, budget: int, rng: np.random.Generator
) -> tuple[IntArray, BoolArray]:
    """Rank every candidate and mark the first ``budget`` as selected (§9.1, §9.4).

    Scored images come first in the registered ``ordering`` (top-k: highest first; bottom-k:
    lowest first; nee: its picks first, then the rest highest first); ties by image_id (the
    candidate index), so all-equal scores rank by image_id. Unscored images follow in a seeded
    random order and fill the budget only when scored ones run out. Scores of scored images
    must be finite (a NaN would sort after every other score: ``score_images`` refuses to hand
    one over).

    Returns:
        (rank per candidate, selected mask).
    """
    if ordering not in _ORDERINGS:
        raise ValueError(f"ordering must be one of {', '.join(_ORDERINGS)}, not {ordering!r}")
    order = _ORDERINGS[ordering](scores, np.flatnonzero(scored), budget)
    unscored = rng.permutation(np.flatnonzero(~scored))
    full = np.concatenate((order, unscored)).astype(np.int64)
    rank = np.empty(len(scores), dtype=np.int64)
    rank[full] = np.arange(len(full))
    return rank, rank < budget
