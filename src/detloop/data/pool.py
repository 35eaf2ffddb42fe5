"""``PoolState``: the images and labels of a run as an immutable value.

Every method returns a new state; only the loop persists a state (``save``), at phase
boundaries, after journaling. The images table's ``state`` and ``iteration`` columns are the
single source from which every view (labeled set, unlabeled pool, what changed when) derives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.labels import labels_from_boxes
from detloop.data.rundir import RunDir


def _as_set(values: Iterable[str]) -> pa.Array:
    return pa.array(sorted(set(values)), type=pa.string())


@dataclass(frozen=True)
class PoolState:
    """Images (with their state) and training labels of a run."""

    images: pa.Table
    labels: pa.Table

    @classmethod
    def load(cls, run: RunDir) -> PoolState:
        return cls(run.read_images(), run.read_labels())

    def save(self, run: RunDir) -> None:
        """Persist both tables atomically (each file is replaced whole)."""
        run.write_labels(self.labels)
        run.write_images(self.images)

    # ---- views ----------------------------------------------------------------------------
    def _mask(self, state: str | None = None, split: str | None = None) -> pa.ChunkedArray:
        mask = pc.equal(self.images["split"], split) if split is not None else None
        if state is not None:
            s = pc.equal(self.images["state"], state)
            mask = s if mask is None else pc.and_(mask, s)
        if mask is None:
            return pa.chunked_array([pa.array(np.ones(self.images.num_rows, dtype=bool))])
        return mask

    def images_in(self, state: str | None = None, split: str | None = "pool") -> pa.Table:
        """Rows of the images table in ``state`` (any when None) of ``split`` (any when None)."""
        return self.images.filter(self._mask(state, split))

    def ids(self, state: str | None = None, split: str | None = "pool") -> list[str]:
        """Image ids in ``state`` (any when None) of ``split`` (any when None), sorted."""
        ids = self.images_in(state, split)["image_id"].to_pylist()
        return sorted(ids)

    def counts(self, split: str | None = "pool") -> dict[str, int]:
        """Number of images per state (every state listed, zeros included)."""
        table = self.images if split is None else self.images.filter(self._mask(None, split))
        vc = pc.value_counts(table["state"]).to_pylist()
        found = {d["values"]: int(d["counts"]) for d in vc}
        return {s: found.get(s, 0) for s in schema.IMAGE_STATES}

    def n_labeled_boxes(self) -> int:
        """Label rows that are not pseudo-labels (what people or the oracle gave)."""
        pseudo = pc.fill_null(pc.equal(self.labels["source"], "pseudo"), False)
        return int(self.labels.num_rows - (pc.sum(pseudo).as_py() or 0))

    # ---- transitions ----------------------------------------------------------------------
    def with_state(
        self,
        image_ids: Iterable[str],
        state: str,
        iteration: int | None,
        reason: str | None = None,
    ) -> PoolState:
        """Set the state (and iteration, reason) of ``image_ids``; unknown ids are an error."""
        if state not in schema.IMAGE_STATES:
            raise ValueError(f"unknown image state {state!r}; one of {schema.IMAGE_STATES}")
        wanted = _as_set(image_ids)
        mask = pc.is_in(self.images["image_id"], value_set=wanted)
        n_hit = int(pc.sum(mask).as_py() or 0)
        if n_hit != len(wanted):
            known = set(self.images["image_id"].to_pylist())
            missing = [i for i in wanted.to_pylist() if i not in known][:5]
            raise DataError("images", None, "image_id", f"unknown image ids: {missing}")
        images = self.images
        images = images.set_column(
            images.schema.get_field_index("state"),
            "state",
            pc.if_else(mask, pa.scalar(state), images["state"]),
        )
        images = images.set_column(
            images.schema.get_field_index("iteration"),
            "iteration",
            pc.if_else(mask, pa.scalar(iteration, pa.int32()), images["iteration"]),
        )
        # The reason always follows the state: a new state without a reason clears it.
        images = images.set_column(
            images.schema.get_field_index("reason"),
            "reason",
            pc.if_else(mask, pa.scalar(reason, pa.string()), images["reason"]),
        )
        return PoolState(images, self.labels)

    def with_labels(self, new_labels: pa.Table) -> PoolState:
        """Append label rows (validated against the labels schema)."""
        new_labels = schema.validate_table(new_labels, schema.LABELS, file="new labels")
        labels = pa.concat_tables(
            [schema.validate_table(self.labels, schema.LABELS, "labels"), new_labels]
        )
        return PoolState(self.images, labels)

    def without_labels(
        self,
        source: str,
        *,
        iteration: int | None = None,
        image_ids: Iterable[str] | None = None,
    ) -> PoolState:
        """Drop the label rows of ``source`` (of ``iteration`` and of ``image_ids`` when given).

        What a phase drops before it labels again, so that re-running it after an interruption
        replaces its labels instead of doubling them: this iteration's oracle labels, the
        auto-labels of the frames being auto-labeled, every pseudo-label.
        """
        drop = pc.equal(self.labels["source"], source)
        if iteration is not None:
            drop = pc.and_(drop, pc.equal(self.labels["iteration"], iteration))
        if image_ids is not None:
            drop = pc.and_(drop, pc.is_in(self.labels["image_id"], value_set=_as_set(image_ids)))
        return PoolState(self.images, self.labels.filter(pc.invert(pc.fill_null(drop, False))))

    def reveal(self, gt: pa.Table, image_ids: Iterable[str], iteration: int) -> PoolState:
        """Simulated oracle: copy the ground truth of ``image_ids`` into the labels.

        The images become ``labeled`` at ``iteration``; their boxes get ``source = oracle``
        and weight 1. Revealing an image twice is an error (no label is ever duplicated).
        """
        ids = _as_set(image_ids)
        # a pseudo-label (al.ssl) is not a label: the image may still be revealed
        real = pc.invert(pc.fill_null(pc.equal(self.labels["source"], "pseudo"), False))
        already = pc.and_(pc.is_in(self.labels["image_id"], value_set=ids), real)
        if pc.any(already).as_py():
            dup = self.labels.filter(already)["image_id"][0].as_py()
            raise DataError("labels", None, "image_id", f"image {dup!r} already has labels")
        rows = gt.filter(pc.is_in(gt["image_id"], value_set=ids))
        labels = labels_from_boxes(rows, source="oracle", iteration=iteration)
        return self.with_labels(labels).with_state(ids.to_pylist(), "labeled", iteration)
