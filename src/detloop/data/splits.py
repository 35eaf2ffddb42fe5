"""Views of a run directory's splits: the pool that takes part in the loop, a split's images
with their ground truth, and the split models are evaluated on."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from detloop.data.errors import DataError
from detloop.data.rundir import RunDir


def _pool_mask(images: pa.Table) -> pa.ChunkedArray:
    return pc.and_(pc.equal(images["split"], "pool"), pc.not_equal(images["state"], "pruned"))


def count_pool(images: pa.Table) -> int:
    """Pool images that take part in the loop (pruned ones excluded)."""
    return int(pc.sum(_pool_mask(images)).as_py() or 0)


def has_split(run: RunDir, split: str) -> bool:
    images = run.read_images()
    return bool(pc.any(pc.equal(images["split"], split)).as_py())


def split_tables(run: RunDir, split: str) -> tuple[pa.Table, pa.Table]:
    """Images of ``split`` (quarantined ones excluded) and their ground truth."""
    images = run.read_images()
    images = images.filter(
        pc.and_(pc.equal(images["split"], split), pc.not_equal(images["state"], "examine"))
    )
    gt = run.read_gt()
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=images["image_id"].combine_chunks()))
    return images, gt


def eval_split(run: RunDir) -> tuple[str, pa.Table, pa.Table]:
    """The validation split (``val``, else ``test``) with its images and ground truth."""
    for split in ("val", "test"):
        if has_split(run, split):
            images, gt = split_tables(run, split)
            return split, images, gt
    raise DataError(str(run.images_file), None, "split", "the run has no val or test images")
