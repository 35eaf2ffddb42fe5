"""RCF — Rare Class Focus (ALGORITHMS §11.4): class weights, image scores and the rare/common
curriculum batches. Pure: label rows and image ids in, weights, splits and id batches out.

``imscore`` weights each object by its class weight (``object_weights``; applied once, §11.2).
``curriculum_learning`` splits the images by ``image_scores`` into a rare and a common set
(``curriculum_split``) and builds batches of (B − 1) common + 1 rare image, plus two rare
images to augment with ``aug`` (``curriculum_batches``). The STAC student's labeled part uses
the same functions with B = L; ``curr`` applies them to the pseudo-labeled images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from detloop import seeding
from detloop.selectors.columns import FloatArray, IntArray

#: Score of an image without objects: below every class weight, so it falls in the common set.
EMPTY_IMAGE_SCORE = 0.0
#: Rare images added to each batch, for RandAugment, under ``aug``.
AUG_EXTRA = 2


def class_counts(labels: pa.Table, classes: Sequence[int] = ()) -> dict[int, int]:
    """Objects per ``class_id`` of a labels/gt table; ``classes`` are listed even when absent
    (count 0), so classes unseen in the labeled part get a weight too."""
    ids = np.asarray(labels["class_id"].to_numpy(), dtype=np.int64)
    found, counts = np.unique(ids, return_counts=True)
    out = dict.fromkeys((int(c) for c in classes), 0)
    out.update({int(c): int(n) for c, n in zip(found, counts, strict=True)})
    return dict(sorted(out.items()))


def class_weights(
    counts: Mapping[int, int], lowest: float = 1.0, highest: float = 10.0
) -> dict[int, float]:
    """RCF class weights (§11.4) from labeled object counts n_c.

    a_c = 1/ln(n_c) for n_c > 1, min-max scaled over those classes to [lowest, highest];
    classes with n_c ≤ 1 get ``highest``; if all a_c are equal they get ``lowest``.
    """
    if lowest > highest:
        raise ValueError(f"RCF weights: lowest {lowest} > highest {highest}")
    many = {c: 1.0 / math.log(n) for c, n in counts.items() if n > 1}
    weights = {c: float(highest) for c in counts}
    if many:
        lo, hi = min(many.values()), max(many.values())
        for c, a in many.items():
            scaled = (a - lo) / (hi - lo) if hi > lo else 0.0
            weights[c] = lowest + scaled * (highest - lowest)
    return weights


def object_weights(class_ids: Sequence[int] | IntArray, weights: Mapping[int, float]) -> FloatArray:
    """``imscore``: each object's weight is its class weight (for ``labels.weight``)."""
    ids = [int(c) for c in np.asarray(class_ids).reshape(-1)]
    missing = sorted(set(ids) - set(weights))
    if missing:
        raise ValueError(
            f"RCF: no class weight for class ids {missing}; count every class (0 when unseen)"
        )
    return np.array([weights[c] for c in ids], dtype=np.float64)


def image_scores(
    labels: pa.Table, weights: Mapping[int, float], image_ids: Sequence[str]
) -> FloatArray:
    """RCF image score (§11.4): the mean class weight of each image's objects, in the order
    of ``image_ids``; an image without objects scores ``EMPTY_IMAGE_SCORE`` (0)."""
    ids = np.asarray(labels["image_id"].to_numpy(zero_copy_only=False), dtype=object)
    obj = object_weights(np.asarray(labels["class_id"].to_numpy()), weights)
    index = {image_id: k for k, image_id in enumerate(image_ids)}
    rows = np.array([index.get(str(i), -1) for i in ids], dtype=np.int64)
    ok = rows >= 0
    total = np.bincount(rows[ok], weights=obj[ok], minlength=len(image_ids))
    count = np.bincount(rows[ok], minlength=len(image_ids))
    out: FloatArray = np.full(len(image_ids), EMPTY_IMAGE_SCORE)
    return np.divide(total, count, out=out, where=count > 0)


def curriculum_split(
    image_ids: Sequence[str], scores: FloatArray | Sequence[float], batch_size: int
) -> tuple[list[str], list[str]]:
    """(rare, common) image ids: sorted by descending score (ties by image_id), the top
    ⌊N/B⌋ images are rare, the rest common; both lists in that order."""
    if batch_size < 1:
        raise ValueError(f"curriculum batch size must be ≥ 1, not {batch_size}")
    s = np.asarray(scores, dtype=np.float64)
    if len(s) != len(image_ids):
        raise ValueError(f"{len(image_ids)} image ids but {len(s)} scores")
    ids = np.asarray([str(i) for i in image_ids], dtype=object)
    order = np.lexsort((ids.astype(str), -s)) if len(ids) else np.zeros(0, np.int64)
    ranked = [str(i) for i in ids[order]]
    n_rare = len(ranked) // batch_size
    return ranked[:n_rare], ranked[n_rare:]


@dataclass(frozen=True)
class CurriculumBatch:
    """One curriculum batch: ``common`` images, its ``rare`` image (None only when the rare
    set is empty) and the rare images to RandAugment (``aug``; empty otherwise)."""

    common: tuple[str, ...]
    rare: str | None
    augmented: tuple[str, ...] = ()

    @property
    def image_ids(self) -> list[str]:
        """Every image of the batch (an augmented image may repeat ``rare``)."""
        return [*self.common, *([self.rare] if self.rare else []), *self.augmented]


def _stream(ids: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` ids drawn by passes over a fresh permutation of ``ids`` each (cycling)."""
    out: list[str] = []
    while len(out) < n and ids:
        out += [ids[k] for k in rng.permutation(len(ids))]
    return out[:n]


def curriculum_steps(n_rare: int, n_common: int, batch_size: int) -> int:
    """Batches per epoch: enough for both sets to be traversed, the shorter one cycling
    (as the STAC steps of §11.1); without rare images, plain batches of B common images."""
    if n_rare == 0:
        return math.ceil(n_common / batch_size)
    per_common = batch_size - 1
    return max(n_rare, math.ceil(n_common / per_common) if per_common else 0)


def curriculum_batches(
    rare: Sequence[str],
    common: Sequence[str],
    batch_size: int,
    seed: int,
    epoch: int,
    aug: bool = False,
    steps: int | None = None,
) -> list[CurriculumBatch]:
    """One epoch of RCF curriculum batches (§11.4): each holds B − 1 common images and one
    rare image (with ``aug`` two more rare images, to RandAugment: B + 2 images).

    Both sets are shuffled per epoch from ``seeding.rng(seed, epoch, "rcf_curriculum")``;
    the shorter stream cycles (``curriculum_steps``) unless ``steps`` fixes the count. With
    B = 1 (a STAC labeled part of L = 1) each batch is one rare image and the common set is
    not drawn. An empty rare set gives plain batches of B common images.
    """
    if batch_size < 1:
        raise ValueError(f"curriculum batch size must be ≥ 1, not {batch_size}")
    rng = seeding.rng(seed, epoch, "rcf_curriculum")
    n = curriculum_steps(len(rare), len(common), batch_size) if steps is None else steps
    if not rare:
        pool = _stream(list(common), n * batch_size, rng)
        return [
            CurriculumBatch(tuple(pool[k : k + batch_size]), None)
            for k in range(0, len(pool), batch_size)
        ]
    per_common = batch_size - 1
    commons = _stream(list(common), n * per_common, rng)
    rares = _stream(list(rare), n, rng)
    batches = []
    for k in range(n):
        extra: tuple[str, ...] = ()
        if aug:
            picks = rng.choice(len(rare), size=AUG_EXTRA, replace=len(rare) < AUG_EXTRA)
            extra = tuple(rare[int(j)] for j in picks)
        batches.append(
            CurriculumBatch(tuple(commons[k * per_common : (k + 1) * per_common]), rares[k], extra)
        )
    return batches
