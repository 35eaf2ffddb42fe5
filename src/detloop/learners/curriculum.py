"""RCF curriculum batches in the train bench (ALGORITHMS §11.4, ``teacher_strategy``
``curriculum_learning``, ``aug``, ``curr``).

The class weights come from the labeled part's object counts (``selectors.ssl_rcf``); an image
scores the mean class weight of its objects. Sorted by that score, the top ⌊N/b⌋ images of a
stream with b images per batch are its **rare** set, the rest its **common** set, and each
batch takes b − 1 common images and one rare image. The labeled stream's b is the batch size of
a supervised training (the teacher) or L of the STAC student (§11.1; with L = 1 every labeled
image is "rare" and the stream is the plain one); ``curr`` splits the pseudo-labeled stream the
same way with its U, scored with the same (labeled) class weights.

``aug`` adds two rare images per batch, RandAugment-ed (box-aware, ``learners.box_augment``):
the dataset gets one strongly augmented copy of each rare image, placed right after the labeled
images (so they count as labeled in the loss and in a data-parallel shard), and a batch names
the copies of its two picks.

Dataset layout: [labeled images | copies of the rare ones (``aug``) | pseudo-labeled images].
Steps per epoch: ``curriculum_steps`` for a supervised training; the STAC count for a student
(both streams traversed, the shorter cycling).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from detloop import seeding
from detloop.data.labels import IGNORE_CLASS_ID
from detloop.learners.streams import Streams
from detloop.selectors.pseudo import TeacherSpec
from detloop.selectors.ssl_rcf import (
    class_counts,
    class_weights,
    curriculum_batches,
    curriculum_split,
    curriculum_steps,
    image_scores,
)


@dataclass(frozen=True)
class CurriculumStreams:
    """A ``Streams`` (same interface) whose batches follow the RCF curriculum.

    Attributes:
        base: the plain composition over the real images (L, U and the STAC step count).
        ids: the dataset's image ids, labeled then pseudo-labeled (copies not included).
        rare, common: the labeled stream's split (image ids), both empty when only ``curr``.
        pseudo_rare, pseudo_common: the pseudo stream's split (``curr``), else empty.
        aug: two RandAugment-ed rare images per batch.
    """

    base: Streams
    ids: tuple[str, ...]
    rare: tuple[str, ...] = ()
    common: tuple[str, ...] = ()
    pseudo_rare: tuple[str, ...] = ()
    pseudo_common: tuple[str, ...] = ()
    aug: bool = False

    @property
    def labeled_curriculum(self) -> bool:
        return bool(self.rare or self.common)

    @property
    def pseudo_curriculum(self) -> bool:
        return bool(self.pseudo_rare or self.pseudo_common)

    @property
    def n_copies(self) -> int:
        """Augmented copies in the dataset: one per rare labeled image under ``aug``."""
        return len(self.rare) if self.aug else 0

    @property
    def n_labeled(self) -> int:
        return self.base.n_labeled + self.n_copies

    @property
    def n_pseudo(self) -> int:
        return self.base.n_pseudo

    @property
    def labeled(self) -> int:
        return self.base.labeled + (2 if self.aug and self.rare else 0)

    @property
    def pseudo(self) -> int:
        return self.base.pseudo

    @property
    def batch_size(self) -> int:
        return self.labeled + self.pseudo

    @property
    def steps_per_epoch(self) -> int:
        if self.base.n_pseudo or not self.labeled_curriculum:
            return self.base.steps_per_epoch
        return curriculum_steps(len(self.rare), len(self.common), self.base.labeled)

    def summary(self) -> dict[str, int]:
        """The split and batch composition (for the checkpoint's metadata)."""
        return {
            "rare": len(self.rare),
            "common": len(self.common),
            "copies": self.n_copies,
            "pseudo_rare": len(self.pseudo_rare),
            "pseudo_common": len(self.pseudo_common),
            "batch_labeled": self.labeled,
            "batch_pseudo": self.pseudo,
        }

    def copy_rows(self) -> list[int]:
        """Dataset rows (of the labeled images) the augmented copies repeat, in copy order."""
        index = {image_id: k for k, image_id in enumerate(self.ids)}
        return [index[r] for r in self.rare] if self.aug else []

    def epoch_batches(self, seed: int, epoch: int) -> list[list[int]]:
        """Dataset indices of every step of ``epoch``, the labeled part (with its copies) first."""
        steps = self.steps_per_epoch
        plain = self.base.epoch_batches(seed, epoch) if not self.labeled_curriculum else []
        shift = self.n_copies
        labeled = self._labeled_parts(seed, epoch, steps, plain)
        pseudo = self._pseudo_parts(seed, epoch, steps, plain)
        return [[*lab, *(i + shift for i in pse)] for lab, pse in zip(labeled, pseudo, strict=True)]

    def _labeled_parts(
        self, seed: int, epoch: int, steps: int, plain: list[list[int]]
    ) -> list[list[int]]:
        n_l = self.base.n_labeled
        if not self.labeled_curriculum:
            return [[i for i in b if i < n_l] for b in plain]
        index = {image_id: k for k, image_id in enumerate(self.ids[:n_l])}
        copy = {image_id: n_l + j for j, image_id in enumerate(self.rare)}
        batches = curriculum_batches(
            self.rare, self.common, self.base.labeled, seed, epoch, aug=self.aug, steps=steps
        )
        return [
            [*(index[i] for i in b.common), *([index[b.rare]] if b.rare else [])]
            + [copy[i] for i in b.augmented]
            for b in batches
        ]

    def _pseudo_parts(
        self, seed: int, epoch: int, steps: int, plain: list[list[int]]
    ) -> list[list[int]]:
        n_l = self.base.n_labeled
        if not self.base.n_pseudo:
            return [[] for _ in range(steps)]
        if not self.pseudo_curriculum:
            if not plain:  # the labeled part follows the curriculum: the plain pseudo order
                plain = self.base.epoch_batches(seed, epoch)
            return [[i for i in b if i >= n_l] for b in plain]
        index = {image_id: n_l + k for k, image_id in enumerate(self.ids[n_l:])}
        pseudo_seed = seeding.derive_seed(seed, epoch, "rcf_curriculum_pseudo")
        batches = curriculum_batches(
            self.pseudo_rare, self.pseudo_common, self.base.pseudo, pseudo_seed, epoch, steps=steps
        )
        return [[index[i] for i in b.image_ids] for b in batches]


def curriculum_streams(
    spec: TeacherSpec,
    base: Streams,
    images: pa.Table,
    labels: pa.Table,
    num_classes: int,
    weight_range: tuple[float, float],
) -> Streams | CurriculumStreams:
    """``base`` itself when ``spec`` has no curriculum block, else its curriculum version.

    ``images``/``labels``: the training's rows, labeled images first (``base.n_labeled``),
    then the pseudo-labeled ones; class weights from the labeled rows' counts.
    """
    labeled_on = spec.curriculum
    pseudo_on = spec.curriculum_pseudo and base.n_pseudo > 0
    if not (labeled_on or pseudo_on):
        return base
    ids = [str(i) for i in images["image_id"].to_pylist()]
    n_l = base.n_labeled
    in_labeled = pa.array(ids[:n_l], pa.string())
    lab_rows = labels.filter(pc.is_in(labels["image_id"], value_set=in_labeled))
    weights = class_weights(class_counts(lab_rows, range(num_classes)), *weight_range)
    rare: list[str] = []
    common: list[str] = []
    if labeled_on:
        rare, common = curriculum_split(
            ids[:n_l], image_scores(lab_rows, weights, ids[:n_l]), base.labeled
        )
    p_rare: list[str] = []
    p_common: list[str] = []
    if pseudo_on:
        p_ids = ids[n_l:]
        p_rows = labels.filter(pc.invert(pc.is_in(labels["image_id"], value_set=in_labeled)))
        p_rows = p_rows.filter(pc.not_equal(p_rows["class_id"], IGNORE_CLASS_ID))
        p_rare, p_common = curriculum_split(
            p_ids, image_scores(p_rows, weights, p_ids), base.pseudo
        )
    return CurriculumStreams(
        base,
        tuple(ids),
        tuple(rare),
        tuple(common),
        tuple(p_rare),
        tuple(p_common),
        aug=spec.curriculum_aug and labeled_on,
    )


def copy_range(streams: Streams | CurriculumStreams) -> tuple[int, int]:
    """The dataset rows [lo, hi) of the augmented rare copies ((0, 0) when none)."""
    if not isinstance(streams, CurriculumStreams) or not streams.n_copies:
        return 0, 0
    return streams.base.n_labeled, streams.n_labeled


def with_copies(images: pa.Table, streams: Streams | CurriculumStreams) -> pa.Table:
    """The training's images table with the augmented copies inserted after the labeled rows
    (``images`` itself when there are none)."""
    if not isinstance(streams, CurriculumStreams) or not streams.n_copies:
        return images
    n_l = streams.base.n_labeled
    rows = pa.array(streams.copy_rows(), pa.int64())
    return pa.concat_tables(
        [images.slice(0, n_l), images.take(rows), images.slice(n_l)]
    ).combine_chunks()
