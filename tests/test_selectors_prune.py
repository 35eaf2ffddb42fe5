"""Redundancy pruning (§9.5): planted duplicates, block-wise distances, random pruning."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from detloop.data.errors import DataError
from detloop.data.synthetic import image_ids, synthetic_images
from detloop.selectors import prune
from detloop.selectors.prune import (
    duplicate_mask,
    max_distance,
    near_pairs,
    prune_ids,
    prune_pool,
    random_prune_mask,
)
from detloop.selectors.strategy import parse_strategy


def _hashes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64 - 1, n, dtype=np.uint64)


def _brute(h: np.ndarray) -> np.ndarray:
    return np.bitwise_count(h[:, None] ^ h[None, :]).astype(int)


def test_exact_duplicates_removed_exactly() -> None:
    h = _hashes(200)
    h[150:160] = h[0]  # a group of 11 equal hashes
    h[160:162] = h[5]  # a group of 3
    removed, kept_by = duplicate_mask(h, 0.0, np.random.default_rng(1))
    assert removed.sum() == 10 + 2
    group = [0, *range(150, 160)]
    assert (~removed[group]).sum() == 1 and (~removed[[5, 160, 161]]).sum() == 1
    assert not removed[np.setdiff1d(np.arange(200), [*group, 5, 160, 161])].any()
    keeper = group[int(np.flatnonzero(~removed[group])[0])]
    assert set(kept_by[group].tolist()) == {keeper}
    again, _ = duplicate_mask(h, 0.0, np.random.default_rng(1))
    assert (again == removed).all()


def test_block_distances_equal_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prune, "BLOCK_CELLS", 500)  # many small blocks
    h = _hashes(120, seed=3)
    h[100:110] = h[:10] ^ np.uint64(0b101)  # planted near duplicates (d = 2)
    d = _brute(h)
    assert max_distance(h) == d[np.triu_indices(120, 1)].max()
    i, j = near_pairs(h, 2)
    expected = {(a, b) for a, b in zip(*np.nonzero(np.triu(d <= 2, 1)), strict=True)}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected
    assert len(expected) >= 10


def test_near_duplicates_cascade() -> None:
    h = _hashes(300, seed=4)
    for k in range(20):  # 20 pairs at distance 1
        h[200 + k] = h[k] ^ np.uint64(1 << (k % 64))
    removed, kept_by = duplicate_mask(h, 0.05, np.random.default_rng(0))
    limit = int(np.floor(0.05 * max_distance(h)))
    assert limit >= 1
    d = _brute(h)
    close_pairs = np.argwhere(np.triu(d <= limit, 1))
    # every close pair lost exactly one member... unless other random pairs are close too
    for a, b in close_pairs:
        assert removed[a] != removed[b] or (removed[a] and removed[b])
    kept = np.flatnonzero(~removed)
    sub = d[np.ix_(kept, kept)]
    assert not np.triu(sub <= limit, 1).any()  # nothing close survives
    assert (kept_by[removed] != np.flatnonzero(removed)).all()


def test_random_pruning_keeps_the_share() -> None:
    removed = random_prune_mask(1000, 0.1, np.random.default_rng(0))
    assert (~removed).sum() == 900
    assert (random_prune_mask(1000, 0.1, np.random.default_rng(0)) == removed).all()
    assert not random_prune_mask(10, 0.0, np.random.default_rng(0)).any()


def _pool(n: int, dup: int) -> pa.Table:
    h = _hashes(n, seed=7)
    h[n - dup :] = h[:dup]
    return synthetic_images(image_ids(n), phash=h)


def test_prune_pool_marks_images_and_budgets() -> None:
    images = _pool(50, 5)
    result = prune_pool(images, parse_strategy("prune_entropy"), 0.0, np.random.default_rng(0))
    assert (result.n_original, result.n_kept) == (50, 45)
    pruned = result.images.filter(pc.equal(result.images["state"], "pruned"))
    assert pruned.num_rows == 5
    assert all(r.startswith("duplicate of pool/img_") for r in pruned["reason"].to_pylist())
    assert set(pruned["iteration"].to_pylist()) == {0}
    ids = prune_ids(images, threshold=0.0, random=False, rng=np.random.default_rng(0))
    assert sorted(ids) == sorted(pruned["image_id"].to_pylist())
    rand = prune_pool(images, parse_strategy("prune_rand_random"), 0.2, np.random.default_rng(0))
    assert rand.n_kept == 40
    unchanged = prune_pool(images, parse_strategy("entropy"), 0.1, np.random.default_rng(0))
    assert unchanged.images.equals(images)


def test_missing_hash_is_a_data_error() -> None:
    images = synthetic_images(image_ids(5))
    with pytest.raises(DataError, match="phash"):
        prune_ids(images, threshold=0.0, random=False, rng=np.random.default_rng(0))
    assert len(prune_ids(images, threshold=0.4, random=True, rng=np.random.default_rng(0))) == 2
