"""PLS (ALGORITHMS §11.7) and the 3D pseudo-label error study (§11.8) in the SSL loop's
pseudo_label phase: what becomes of the τ-selected pseudo-labels before they are stored.

``refiner`` builds the step that ``steps.pseudo_label`` applies to the kept pseudo-labels
(None when ``ssl.pls`` and ``ssl.oracle_variant`` are both ``none``):

1. PLS (``ssl.pls``): every pseudo-labeled image gets S_i (δ_S = ``ssl.pls_tau``, default
   ``ssl.tau``), C_i and D_i from the round's teacher detections with score ≥ 0.1 and the kept
   pseudo-labels; the images of the variant keep their pseudo-labels (``top``: the
   ceil(pls_top_k·N) highest D, ties by image_id, decision 8; ``bot``: the rest; ``rand``: a
   random set of the top's size from the round's ``pls`` seed), the others leave the
   student's pseudo part. The scores and verdicts go to ``iter_<r>/pls.parquet``
   (``schema.PLS_SCORES``).
2. The 3D study (``ssl.oracle_variant``, simulated runs): the remaining pseudo-labels are
   replaced by ``oracle_variant(match_pseudo_to_gt(pseudo, gt))`` with the pool's ground truth
   of their images. The study acts on the images that hold a pseudo-label: ``fixmd`` adds the
   missed GT there, never on an image without one (it had no detection above τ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import write_table
from detloop.data.rundir import RunDir
from detloop.selectors.pseudo import pls_scores, pls_select
from detloop.selectors.ssl_3d import Variant, match_pseudo_to_gt, oracle_variant
from detloop.selectors.ssl_pls import pls_detections

#: kept pseudo-labels in, (pseudo-labels to store, numbers for the phase's info) out
Refine = Callable[[pa.Table], tuple[pa.Table, dict[str, Any]]]


@dataclass(frozen=True)
class PlsOutcome:
    """What PLS did to one round: the pseudo-labels of the kept images, the per-image table
    (``schema.PLS_SCORES``) and the numbers of the phase's info."""

    kept: pa.Table
    scores: pa.Table
    info: dict[str, Any]


def _per_image(ids: pa.Array, image_col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """How many rows of ``image_col`` belong to each of ``ids``."""
    code = np.asarray(pc.fill_null(pc.index_in(image_col, value_set=ids), -1).to_numpy())
    return np.bincount(code[code >= 0], minlength=len(ids))


def pls_filter(
    kept: pa.Table,
    predictions: pa.Table,
    variant: Literal["top", "bot", "rand"],
    *,
    top_k: float = 0.4,
    tau: float = 0.4,
    beta: float = 0.1,
    rng: np.random.Generator | None = None,
    iteration: int = 0,
) -> PlsOutcome:
    """PLS over the pseudo-labels ``kept`` (image_id, class_id, ...) of one round.

    Args:
        kept: the τ-selected pseudo-labels (``select_pseudo_labels``' rows).
        predictions: the round's teacher predictions (any images; rows with score < 0.1 and
            images without a pseudo-label are not counted).
        variant: ``top``, ``bot`` or ``rand``.
        top_k: fraction of the pseudo-labeled images kept (``top``, ``rand``).
        tau: δ_S of S_i.
        beta: weight of the rarity C_i in D_i.
        rng: the generator of ``rand``.
        iteration: the round, written into the table.
    """
    teacher = pls_detections(predictions)
    scores = pls_scores(teacher, kept, tau=tau, beta=beta)
    ids = scores["image_id"].combine_chunks()
    chosen = pa.array(pls_select(scores, top_k, variant, rng), pa.string())
    mask = np.asarray(pc.is_in(ids, value_set=chosen).to_numpy(zero_copy_only=False), dtype=bool)
    d = np.asarray(scores["D"].to_numpy(), dtype=np.float64)
    order = np.lexsort((np.asarray(ids.to_pylist(), dtype=object).astype(str), -d))
    rank = np.empty(len(d), dtype=np.int32)
    rank[order] = np.arange(len(d), dtype=np.int32)
    n = len(d)
    table = pa.table(
        {
            "image_id": ids,
            "iteration": pa.array(np.full(n, iteration, dtype=np.int32)),
            "n_det": pa.array(_per_image(ids, teacher["image_id"]).astype(np.int32)),
            "n_pseudo": pa.array(_per_image(ids, kept["image_id"]).astype(np.int32)),
            "S": scores["S"],
            "C": scores["C"],
            "D": scores["D"],
            "rank": pa.array(rank),
            "kept": pa.array(mask),
        }
    )
    out = kept.filter(pc.is_in(kept["image_id"], value_set=chosen))
    info: dict[str, Any] = {
        "pls_images_before": n,
        "pls_images_after": int(mask.sum()),
        "pls_labels_before": kept.num_rows,
        "pls_labels_after": out.num_rows,
    }
    if mask.any():
        info["pls_d_kept"] = float(d[mask].mean())
    if (~mask).any():
        info["pls_d_dropped"] = float(d[~mask].mean())
    return PlsOutcome(out, schema.with_metadata(table, schema.PLS_SCORES), info)


def oracle_filter(
    kept: pa.Table, gt: pa.Table, variant: Variant
) -> tuple[pa.Table, dict[str, Any]]:
    """The 3D study's variant of the pseudo-labels ``kept`` against ``gt`` (the ground truth of
    at least their images): the corrected pseudo-labels and what changed."""
    match = match_pseudo_to_gt(kept, gt)
    out = oracle_variant(match, variant)
    origin = np.asarray(out["origin"].to_pylist(), dtype=object)
    info: dict[str, Any] = {
        "oracle_labels_before": kept.num_rows,
        "oracle_labels_after": out.num_rows,
        "oracle_images_after": len(pc.unique(out["image_id"])) if out.num_rows else 0,
        "oracle_false_detections": int((match.gt_row < 0).sum()),
        "oracle_missed_gt": int((~match.gt_matched).sum()),
        "oracle_gt_added": int((origin == "gt").sum()),
        "oracle_boxes_replaced": int((origin == "gt_box").sum()),
    }
    return out.drop_columns(["origin"]), info


def pool_gt(run: RunDir, purpose: str = "ssl.oracle_variant (the 3D study)") -> pa.Table:
    """The ground truth of the run's pool (what the simulated oracle knows).

    Raises:
        DataError: the pool has no ground truth (labels that arrive from people); the message
            names ``purpose``, what needed it.
    """
    gt = run.read_gt()
    images = run.read_images()
    pool = images.filter(pc.equal(images["split"], "pool"))["image_id"]
    gt = gt.filter(pc.is_in(gt["image_id"], value_set=pool.combine_chunks()))
    if gt.num_rows == 0:
        raise DataError(
            str(run.gt_file),
            None,
            "image_id",
            f"{purpose} needs the ground truth of the pool (a simulated run), and this run's "
            "pool has none",
        )
    return gt


def refiner(
    run: RunDir, cfg: ExperimentConfig, predictions: pa.Table, iteration: int, seed: int
) -> Refine | None:
    """The PLS and 3D-study step of one round (see the module docstring); None when neither
    is asked for. ``seed`` seeds PLS ``rand``."""
    ssl = cfg.ssl
    if ssl.pls == "none" and ssl.oracle_variant == "none":
        return None

    def refine(kept: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
        info: dict[str, Any] = {}
        if ssl.pls != "none":
            pls = pls_filter(
                kept,
                predictions,
                ssl.pls,
                top_k=ssl.pls_top_k,
                tau=ssl.pls_delta,
                beta=ssl.pls_beta,
                rng=np.random.default_rng(seed),
                iteration=iteration,
            )
            write_table(pls.scores, schema.PLS_SCORES, run.pls_scores_file(iteration))
            kept, info = pls.kept, dict(pls.info)
        if ssl.oracle_variant != "none":
            kept, more = oracle_filter(kept, pool_gt(run), ssl.oracle_variant)
            info.update(more)
        return kept, info

    return refine
