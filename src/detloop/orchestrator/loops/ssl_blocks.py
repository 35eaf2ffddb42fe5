"""The SSL loop's teacher building blocks (``ssl.teacher_strategy``, ALGORITHMS §11.3, §11.4).

* ``rcc``: once, right after the labeled split (round 0, before the teacher trains), rare-class
  collages are generated from the labeled images (``detloop.data.collage.run_rcc``) and join
  the labeled part as images of state ``labeled`` with ``gt`` labels, so ``num_labeled`` grows
  and the teacher (and the student's labeled part) trains on them. They are written under the
  tag ``ssl-<default_tag>``; a split phase that runs again after an interruption finds the
  images of its tag in the run and adds no second set (``write_rcc`` writes the images rows
  last, so their presence means the generation is complete). Generated images are never
  predicted, pseudo-labeled or auto-labeled (``unlabeled_images`` leaves them out).
* ``imscore``: each labeled object's weight is its RCF class weight (``class_weights`` from
  the labeled object counts, ``ssl.rcf_lowest`` … ``ssl.rcf_highest``), applied once through
  ``labels.weight`` (§11.2) in every round's labeled part; pseudo-labels keep their own
  weights.
* ``curriculum_learning`` (with ``aug``) and ``curr``: the rare/common curriculum batches of
  the teacher, the student's labeled part and (``curr``) its pseudo-labeled part are built by
  the train bench itself (``learners.curriculum``) from the same class weights; they enter
  the teacher's cache key here.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig
from detloop.data.collage import RccOptions, default_tag, is_generated, rcc_image_id, run_rcc
from detloop.data.errors import DataError
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir
from detloop.selectors.pseudo import TeacherSpec
from detloop.selectors.ssl_rcf import class_counts, class_weights, object_weights
from detloop.selectors.vocabulary import did_you_mean

logger = logging.getLogger(__name__)

#: Prefix of the RCC tag the SSL loop writes under (``detloop rcc`` uses its own tags).
SSL_TAG_PREFIX = "ssl-"


def rcc_options(spec: TeacherSpec) -> RccOptions:
    """The RCC switches of a teacher strategy (``scale``, ``manual_augmentations``,
    ``full_im``)."""
    return RccOptions(
        scale=spec.rcc_scale,
        manual_augmentations=spec.rcc_manual_augmentations,
        full_im=spec.rcc_full_im,
    )


def rcc_tag(cfg: ExperimentConfig) -> str:
    """The tag of the loop's collages, e.g. ``ssl-s42-scale``."""
    return SSL_TAG_PREFIX + default_tag(cfg.ssl.rcc_seed, rcc_options(cfg.ssl.teacher_strategy))


def teacher_ident(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the teacher's training depends on through its blocks (for the warm-up cache key;
    empty for plain STAC, so its key is unchanged)."""
    spec, ssl = cfg.ssl.teacher_strategy, cfg.ssl
    if not spec.blocks:
        return {}
    out: dict[str, Any] = {"teacher_strategy": spec.name}
    if spec.rcc:
        out["rcc"] = {
            "classes": ssl.rcc_classes,
            "k": ssl.rcc_k,
            "seed": ssl.rcc_seed,
            "options": [spec.rcc_scale, spec.rcc_manual_augmentations, spec.rcc_full_im],
        }
    if spec.imscore or spec.curriculum or spec.curriculum_pseudo:
        out["rcf"] = [ssl.rcf_lowest, ssl.rcf_highest]
    return out


def target_classes(cfg: ExperimentConfig, categories: pa.Table) -> list[int] | None:
    """``ssl.rcc_classes`` as class ids (None: the ``rcc_k`` rarest labeled classes).

    Raises:
        DataError: a name that is no category of the run (with close matches).
    """
    names = cfg.ssl.rcc_classes
    if names is None:
        return None
    index = dict(
        zip(categories["name"].to_pylist(), categories["class_id"].to_pylist(), strict=True)
    )
    unknown = [n for n in names if n not in index]
    if unknown:
        known = [str(k) for k in index]
        hint = did_you_mean(unknown[0], known)
        text = f"ssl.rcc_classes: {unknown} are no category of the run{hint}"
        raise DataError("ssl.rcc_classes", None, "name", text)
    return sorted({int(index[n]) for n in names})


def existing_collages(run: RunDir, tag: str) -> list[str]:
    """The image ids of the collages of ``tag`` already in the run."""
    ids = run.read_images()["image_id"]
    prefix = rcc_image_id(tag, 0).rsplit("/", 1)[0] + "/"
    return sorted(ids.filter(pc.starts_with(ids, prefix)).to_pylist())


def add_collages(run: RunDir, cfg: ExperimentConfig, categories: pa.Table) -> dict[str, Any]:
    """RCC once into the labeled part (``rcc`` set); a second call adds nothing."""
    tag = rcc_tag(cfg)
    done = existing_collages(run, tag)
    if done:
        logger.info("%s: the RCC collages of %s are in the run already", run.name, tag)
        return {"rcc_images": len(done), "rcc_reused": 1}
    report = run_rcc(
        run,
        classes=target_classes(cfg, categories),
        k=cfg.ssl.rcc_k,
        seed=cfg.ssl.rcc_seed,
        options=rcc_options(cfg.ssl.teacher_strategy),
        tag=tag,
        iteration=0,
    )
    return {
        "rcc_images": report.rows.images.num_rows,
        "rcc_boxes": report.rows.gt.num_rows,
        "rcc_crops": report.n_crops,
        "rcc_skipped": report.n_skipped,
        "rcc_targets": list(report.targets),
    }


def unlabeled_images(pool: PoolState) -> pa.Table:
    """The unlabeled pool images a model predicts and pseudo-labels: never a generated one."""
    images = pool.images_in("unlabeled")
    return images.filter(pc.invert(is_generated(images["image_id"])))


def imscore_labels(labels: pa.Table, num_classes: int, lowest: float, highest: float) -> pa.Table:
    """``imscore``: every non-pseudo label's ``weight`` set to its RCF class weight, from the
    object counts of those labels (every class counted, 0 when unseen); pseudo rows kept."""
    pseudo = pc.fill_null(pc.equal(labels["source"], "pseudo"), False)
    real = labels.filter(pc.invert(pseudo))
    weights = class_weights(class_counts(real, range(num_classes)), lowest, highest)
    obj = object_weights(np.asarray(labels["class_id"].to_numpy()), weights)
    col = labels.schema.get_field_index("weight")
    field = labels.schema.field(col)
    new = pc.if_else(pseudo, labels["weight"], pa.array(obj, field.type))
    return labels.set_column(col, field, new)
