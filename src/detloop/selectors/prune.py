"""Redundancy pruning of the pool before the loop (``prune``, ``full_prune``; ALGORITHMS §9.5).

Near duplicates are found on 64-bit perceptual hashes by Hamming distance, computed block-wise
with XOR + popcount: a block of rows against the rest, never an N×N matrix. Exact duplicates
(``prune_thr`` 0) only need grouping of equal hashes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.errors import DataError
from detloop.selectors.columns import IntArray
from detloop.selectors.stages import BoolArray
from detloop.selectors.strategy import StrategySpec

log = logging.getLogger(__name__)

U64Array = npt.NDArray[np.uint64]

#: Cells (rows × columns) of one distance block; bounds the working memory (~9 bytes a cell).
BLOCK_CELLS = 4_000_000
#: Most candidate pairs the single-pass near-duplicate search holds before rescanning.
PAIR_CAP = 20_000_000


def _block_dist(hashes: U64Array, a: int, b: int) -> npt.NDArray[np.uint8]:
    """Hamming distances of rows a..b-1 to rows a..n-1 (upper part only is meaningful)."""
    out: npt.NDArray[np.uint8] = np.bitwise_count(hashes[a:b, None] ^ hashes[None, a:])
    return out


def max_distance(hashes: U64Array) -> int:
    """max over pairs i < j of the Hamming distance (0 for fewer than two hashes)."""
    n = len(hashes)
    best = 0
    step = max(1, BLOCK_CELLS // max(n, 1))
    for a in range(0, n, step):
        best = max(best, int(_block_dist(hashes, a, min(a + step, n)).max(initial=0)))
        if best == 64:
            break
    return best


def _scan(
    hashes: U64Array, max_dist: int, cap: int | None
) -> tuple[int, IntArray, IntArray] | None:
    """One block-wise pass: max distance and the pairs i < j with d ≤ ``max_dist``.

    Returns None when more than ``cap`` pairs turn up (the caller then scans again with a
    tighter limit).
    """
    n = len(hashes)
    step = max(1, BLOCK_CELLS // max(n, 1))
    left: list[IntArray] = []
    right: list[IntArray] = []
    best, found = 0, 0
    for a in range(0, n, step):
        b = min(a + step, n)
        d = _block_dist(hashes, a, b)
        width = n - a
        flat = np.flatnonzero(d <= max_dist)
        r, c = np.divmod(flat, width)
        upper = c > r
        best = max(best, int(d.max(initial=0)))
        left.append(r[upper] + a)
        right.append(c[upper] + a)
        found += int(upper.sum())
        if cap is not None and found > cap:
            return None
    if not left:
        return best, np.zeros(0, np.int64), np.zeros(0, np.int64)
    return best, np.concatenate(left), np.concatenate(right)


def near_pairs(hashes: U64Array, max_dist: int) -> tuple[IntArray, IntArray]:
    """All pairs i < j with Hamming distance ≤ ``max_dist``, block-wise."""
    result = _scan(np.asarray(hashes, dtype=np.uint64), max_dist, None)
    assert result is not None  # no cap
    return result[1], result[2]


def _exact_groups(hashes: U64Array, rng: np.random.Generator) -> tuple[BoolArray, IntArray]:
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    starts = np.concatenate(([0], np.flatnonzero(sorted_h[1:] != sorted_h[:-1]) + 1))
    sizes = np.diff(np.append(starts, len(hashes)))
    keep_pos = starts + np.floor(rng.random(len(starts)) * sizes).astype(np.int64)
    kept_by = np.repeat(order[keep_pos], sizes)[np.argsort(order, kind="stable")]
    removed = kept_by != np.arange(len(hashes))
    return removed, kept_by


def _cascade(
    n: int, i: IntArray, j: IntArray, rng: np.random.Generator
) -> tuple[BoolArray, IntArray]:
    """Visit images in seeded order; each not-yet-removed image with not-removed neighbours
    keeps one seeded-random member of {itself} ∪ neighbours and removes the rest."""
    src = np.concatenate((i, j))
    dst = np.concatenate((j, i))
    order = np.argsort(src, kind="stable")
    dst = dst[order]
    indptr = np.concatenate(([0], np.cumsum(np.bincount(src, minlength=n))))
    removed = np.zeros(n, dtype=bool)
    kept_by = np.arange(n, dtype=np.int64)
    for v in rng.permutation(n):
        if removed[v] or indptr[v] == indptr[v + 1]:
            continue
        nbrs = dst[indptr[v] : indptr[v + 1]]
        group = np.concatenate(([v], nbrs[~removed[nbrs]]))
        if len(group) < 2:
            continue
        keep = group[rng.integers(len(group))]
        removed[group] = True
        removed[keep] = False
        kept_by[group[group != keep]] = keep
    return removed, kept_by


def duplicate_mask(
    hashes: U64Array, prune_thr: float, rng: np.random.Generator
) -> tuple[BoolArray, IntArray]:
    """Which images to remove as (near-)duplicates, and the index of the kept one for each.

    Duplicates are pairs with d ≤ prune_thr·max(d) (Hamming distance; max over all pairs).

    Returns:
        (removed mask, kept_by: the kept image each image stands for; itself when kept).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if not 0 <= prune_thr <= 1:
        raise ValueError(f"prune_thr must be in [0, 1], got {prune_thr}")
    if prune_thr == 0:
        return _exact_groups(hashes, rng)
    # one pass collecting pairs under the largest possible limit (max(d) <= 64), then filter;
    # a second pass only if that superset is too large to hold
    scan = _scan(hashes, int(np.floor(prune_thr * 64)), cap=PAIR_CAP)
    if scan is None:
        limit = int(np.floor(prune_thr * max_distance(hashes)))
        i, j = near_pairs(hashes, limit)
    else:
        best, i, j = scan
        limit = int(np.floor(prune_thr * best))
        close = np.bitwise_count(hashes[i] ^ hashes[j]) <= limit
        i, j = i[close], j[close]
    log.info("near-duplicate pruning: d <= %d, %d close pairs", limit, len(i))
    return _cascade(len(hashes), i, j, rng)


def random_prune_mask(n: int, prune_thr: float, rng: np.random.Generator) -> BoolArray:
    """Random pruning (``rand``): remove a seeded-random set, keeping int(N·(1 − prune_thr))."""
    n_keep = int(np.floor(n * (1.0 - prune_thr) + 1e-9))
    removed = np.ones(n, dtype=bool)
    removed[rng.choice(n, size=n_keep, replace=False)] = False
    return removed


def _removed(
    images: pa.Table, idx: IntArray, random: bool, prune_thr: float, rng: np.random.Generator
) -> tuple[BoolArray, IntArray]:
    """Removed mask and representative (index into ``idx``) for candidates ``idx``."""
    n = len(idx)
    if random:
        return random_prune_mask(n, prune_thr, rng), np.arange(n, dtype=np.int64)
    phash = images["phash"].take(pa.array(idx))
    if phash.null_count:
        row = int(idx[int(pc.index(phash.is_null(), True).as_py())])
        raise DataError("images", row, "phash", "no perceptual hash; hash the pool first")
    return duplicate_mask(np.asarray(phash.to_numpy()), prune_thr, rng)


def _candidates(images: pa.Table) -> IntArray:
    cand = pc.and_(pc.equal(images["split"], "pool"), pc.equal(images["state"], "unlabeled"))
    return np.flatnonzero(np.asarray(cand.to_numpy(zero_copy_only=False), dtype=bool))


def prune_ids(
    pool: pa.Table, threshold: float, random: bool, rng: np.random.Generator
) -> list[str]:
    """Ids of the unlabeled pool images that pruning removes (§9.5).

    Args:
        pool: images table (rows of other splits or states are ignored).
        threshold: ``prune_thr``: near-duplicate distance fraction, or (``random``) the
            fraction removed at random.
        random: ``rand`` pruning instead of perceptual-hash duplicates.
        rng: the pruning stage's generator.

    Raises:
        DataError: hash pruning while a candidate image has no ``phash``.
    """
    idx = _candidates(pool)
    if len(idx) == 0:
        return []
    removed, _ = _removed(pool, idx, random, threshold, rng)
    ids = pool["image_id"].take(pa.array(idx[removed]))
    return [str(x) for x in ids.to_pylist()]


@dataclass(frozen=True)
class PruneResult:
    """Images table with pruned images marked, and the pool sizes before and after."""

    images: pa.Table
    n_original: int
    n_kept: int


def prune_pool(
    images: pa.Table, spec: StrategySpec, prune_thr: float, rng: np.random.Generator
) -> PruneResult:
    """Mark pruned pool images (state ``pruned``, iteration 0, ``reason``) as ``spec`` says.

    Only unlabeled pool images take part. Without ``prune``/``full_prune`` nothing changes.

    Raises:
        DataError: hash pruning while a candidate image has no ``phash``.
    """
    idx = _candidates(images)
    n = len(idx)
    if not spec.prunes or n == 0:
        return PruneResult(images, n, n)
    removed, kept_by = _removed(images, idx, spec.prune_random, prune_thr, rng)
    rep = images["image_id"].take(pa.array(idx[kept_by])).to_pylist()
    state = images["state"].to_pylist()
    iteration = images["iteration"].to_pylist()
    reason = images["reason"].to_pylist()
    for k in np.flatnonzero(removed):
        why = "pruned at random" if spec.prune_random else f"duplicate of {rep[k]}"
        state[idx[k]], iteration[idx[k]], reason[idx[k]] = "pruned", 0, why
    out = images
    for name, values in (
        ("state", pa.array(state, pa.string())),
        ("iteration", pa.array(iteration, pa.int32())),
        ("reason", pa.array(reason, pa.string())),
    ):
        out = out.set_column(out.schema.get_field_index(name), name, values)
    n_kept = n - int(removed.sum())
    log.info("pruned %d of %d pool images", n - n_kept, n)
    return PruneResult(out, n, n_kept)
