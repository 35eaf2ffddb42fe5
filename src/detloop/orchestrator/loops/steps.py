"""The work of each loop phase, as functions over the run directory and its tables.

The loop (``active_learning.py``) decides *when*; these functions say *what*, delegating the
methods to ``detloop.selectors`` (selection, budgets, pruning), ``detloop.learners``
(evaluation, calibration) and the workers (training, prediction).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_json, read_table, write_json
from detloop.data.pool import PoolState
from detloop.data.rundir import RunDir
from detloop.data.splits import count_pool, eval_split
from detloop.learners.predict_stats import PredictStats
from detloop.orchestrator.engine.journal import Journal
from detloop.orchestrator.engine.workers import PredictJob, ShardResult, Workers
from detloop.selectors.pseudo import with_ignore_regions
from detloop.selectors.pseudo_quality import (
    PseudoQuality,
    pseudo_class_rows,
    pseudo_quality_by_class,
)
from detloop.selectors.strategy import StrategySpec

if TYPE_CHECKING:
    from detloop.selectors.pseudo_correctness import CorrectnessModel
    from detloop.selectors.pseudo_ranking import TauFit

#: the round's ``pcorrect`` model, in its iteration directory
CORRECTNESS_FILE = "pseudo_correctness.json"

logger = logging.getLogger(__name__)


# ---- budgets, pruning, selection ---------------------------------------------------------------
def budget_sizes(
    cfg: ExperimentConfig, spec: StrategySpec, images: pa.Table, n_pool: int
) -> list[int]:
    """Images to select per iteration (ALGORITHMS §9.1, with §9.5's rescaling under pruning)."""
    from detloop.selectors.budgets import iteration_sizes, loop_budgets

    n_original = int(pc.sum(pc.equal(images["split"], "pool")).as_py() or 0)
    budgets = loop_budgets(spec, cfg.al.al_budgets, n_original, n_pool)
    return [int(n) for n in iteration_sizes(n_pool, budgets)]


def prune_pool(
    cfg: ExperimentConfig, spec: StrategySpec, images: pa.Table, seed: int
) -> pa.Table | None:
    """Mark redundant pool images ``pruned`` when the strategy asks; None when it does not."""
    if not spec.prunes or pc.any(pc.equal(images["state"], "pruned")).as_py():
        return None  # nothing to do, or already pruned by an interrupted attempt
    from detloop.selectors.prune import prune_pool as mark_pruned

    result = mark_pruned(images, spec, cfg.al.prune_thr, np.random.default_rng(seed))
    logger.info("pruned %d of %d pool images", result.n_original - result.n_kept, result.n_original)
    return result.images


def select(
    cfg: ExperimentConfig,
    run: RunDir,
    spec: StrategySpec,
    predictions: pa.Table,
    unlabeled: pa.Table,
    budget: int,
    iteration: int,
    seed: int,
) -> pa.Table:
    """The selection table of one iteration (ARCHITECTURE §8, "Selectors' input")."""
    from detloop.selectors.pipeline import SelectContext
    from detloop.selectors.pipeline import select as run_select

    thresholds = None
    if run.thresholds_file(iteration).exists():
        thresholds = read_json(run.thresholds_file(iteration))
    ctx = SelectContext(
        min_score=min_score(cfg, run, iteration),
        thresholds=thresholds,
        rng=np.random.default_rng(seed),
        iteration=iteration,
    )
    return run_select(predictions, unlabeled, spec, budget, ctx)


def min_score(cfg: ExperimentConfig, run: RunDir, iteration: int) -> float:
    """The consumer score floor (ALGORITHMS §3, ``data.min_score``): ``al.min_score`` or
    ``predict.min_score`` when set; else from the mean matched score of the latest validation
    (M(i-1) on val); else the default."""
    from detloop.data.min_score import resolve_min_score
    from detloop.orchestrator.evaluation.common import mean_matched_score

    configured = (cfg.al.min_score, cfg.predict.min_score)
    avg = None
    val_file = run.val_predictions_file(iteration - 1) if iteration > 0 else None
    if configured == (None, None) and val_file is not None and val_file.exists():
        from detloop.learners.evaluate import match_reference

        _, _, gt = eval_split(run)
        preds = read_table(schema.PREDICTIONS, val_file)
        avg = mean_matched_score(preds, match_reference(preds, gt))
    return resolve_min_score(*configured, mean_matched=avg)


# ---- prediction ---------------------------------------------------------------------------------
def shard_tables(images: pa.Table, shard_size: int) -> list[pa.Table]:
    """Deterministic shards: images sorted by id, cut every ``shard_size`` rows."""
    images = images.sort_by("image_id")
    return [images.slice(i, shard_size) for i in range(0, images.num_rows, shard_size)]


def predict_sharded(
    run: RunDir,
    cfg: ExperimentConfig,
    workers: Workers,
    *,
    key: str,
    weights: bytes,
    num_classes: int,
    images: pa.Table,
    iteration: int,
    stage: str,
    seed: int,
    on_first_shard: Callable[[], None] | None = None,
) -> tuple[pa.Table, float, dict[str, int]]:
    """Predict ``images`` shard by shard over the predict workers.

    Finished shards are persisted under the iteration's shard directory as they arrive (with
    what the decoding bounds changed in them) and skipped on a resume; results are keyed by
    (iteration, image_id), so a retried shard replaces rather than duplicates. Returns the
    merged, validated table, compute seconds and the summed bound statistics (capped stds,
    dropped degenerate boxes), which are logged when not zero.
    """
    shard_dir = run.shard_dir(iteration, stage)
    shards = shard_tables(images, cfg.ray.shard_size)
    todo = []
    for sid, table in enumerate(shards):
        if not run.shard_file(iteration, stage, sid).exists():
            todo.append((sid, table, seed + sid))
    fault = cfg.fault

    def marker(sid: int) -> str | None:
        """Fault injection (tests): the pool prediction's shard that kills its worker, once."""
        if stage != "predict" or fault.kill_worker_at_shard != sid:
            return None
        return str(run.fault_marker(f"worker_shard_{sid}"))

    arrived: dict[int, pa.Table] = {}  # this attempt's shards, validated when persisted
    arrived_stats: dict[int, dict[str, int]] = {}

    def persist(result: ShardResult) -> None:
        from detloop.data.io import write_json, write_table

        # the statistics first: a shard file on disk always has its statistics beside it
        write_json(result.stats, run.shard_stats_file(iteration, stage, result.shard))
        arrived[result.shard] = write_table(
            result.table, schema.PREDICTIONS, run.shard_file(iteration, stage, result.shard)
        )
        arrived_stats[result.shard] = result.stats
        if len(arrived) == 1 and on_first_shard is not None:
            on_first_shard()

    job = PredictJob(key, weights, num_classes, todo)
    seconds = workers.predict(job, persist, marker) if todo else 0.0
    table, totals = _merge_shards(run, iteration, stage, len(shards), arrived, arrived_stats)
    shutil.rmtree(shard_dir, ignore_errors=True)
    return table, seconds, totals


def _merge_shards(
    run: RunDir,
    iteration: int,
    stage: str,
    n_shards: int,
    arrived: dict[int, pa.Table],
    arrived_stats: dict[int, dict[str, int]],
) -> tuple[pa.Table, dict[str, int]]:
    """This attempt's shards from memory, an interrupted attempt's from disk: one validated
    table in (image_id, det_id) order and the summed bound statistics (logged when not 0)."""
    parts, stats = [], []
    for sid in range(n_shards):
        if sid in arrived:
            parts.append(arrived[sid])
            stats.append(arrived_stats[sid])
        else:
            parts.append(read_table(schema.PREDICTIONS, run.shard_file(iteration, stage, sid)))
            stats.append(read_json(run.shard_stats_file(iteration, stage, sid)))
    table = pa.concat_tables(parts) if parts else schema.PREDICTIONS.empty()
    table = table.sort_by([("image_id", "ascending"), ("det_id", "ascending")])
    table = schema.validate_table(table, schema.PREDICTIONS, file=stage)
    totals = PredictStats.total(stats)
    if totals:
        logger.info("%s: %s", stage, totals.describe())
    return table, totals.as_dict()


# ---- evaluation and logging ---------------------------------------------------------------------
def evaluate(
    predictions: pa.Table, gt: pa.Table, images: pa.Table, categories: pa.Table
) -> dict[str, Any]:
    """COCO mAP and per-class AP of one model on one split."""
    from detloop.learners.evaluate import coco_map

    return dict(coco_map(predictions, gt, images, categories))


def iteration_metrics(
    metrics: dict[str, Any],
    pool: PoolState,
    journal: Journal,
    iteration: int,
    budgets: list[int],
) -> dict[str, float]:
    """The numbers logged for an iteration: model quality, label counts, phase durations."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    labeled = pool.images_in("labeled")
    n_pool = count_pool(pool.images)
    out["labeled_images"] = float(labeled.num_rows)
    out["labeled_fraction"] = labeled.num_rows / n_pool if n_pool else 0.0
    out["labeled_boxes"] = float(pool.n_labeled_boxes())
    out["selected"] = float(budgets[iteration]) if iteration < len(budgets) else 0.0
    for phase, seconds in journal.phase_seconds(iteration).items():
        out[f"time_{phase}"] = seconds
    return out


def calibrate(run: RunDir, cfg: ExperimentConfig, iteration: int, seed: int) -> dict[str, Any]:
    """Fit calibrators on M(i-1)'s validation predictions; add ``*_cal`` to the pool's."""
    from detloop.orchestrator.evaluation.validation import calibrate_iteration

    return dict(calibrate_iteration(run, cfg, iteration, seed))


def threshold(run: RunDir, cfg: ExperimentConfig, iteration: int, seed: int) -> dict[str, Any]:
    """Cost-sensitive thresholds of M(i-1) on validation (for ``combo``)."""
    from detloop.orchestrator.evaluation.validation import threshold_iteration

    return dict(threshold_iteration(run, cfg, iteration, seed))


# ---- human labeling -----------------------------------------------------------------------------
def export_query(
    run: RunDir, cfg: ExperimentConfig, pool: PoolState, ids: list[str], iteration: int
) -> None:
    """Export the queried images for people: COCO and Label Studio tasks (images referenced
    as ``cfg.labeling`` says), pre-annotated with M(i-1)'s detections above the run's score
    floor (§3)."""
    from detloop.data.review_export import export_review

    predictions = None
    if run.predictions_file(iteration).exists():
        predictions = read_table(schema.PREDICTIONS, run.predictions_file(iteration))
    export_review(
        run,
        image_ids=ids,
        predictions=predictions,
        out_stem=run.query_stem(iteration),
        min_score=min_score(cfg, run, iteration),
        document_root=cfg.labeling.document_root,
        url_prefix=cfg.labeling.url_prefix,
    )


# ---- semi-supervised learning ---------------------------------------------------------------
def training_labels(labels: pa.Table) -> pa.Table:
    """The labels a model trains on as ground truth: every source but ``pseudo``."""
    return labels.filter(pc.invert(pc.fill_null(pc.equal(labels["source"], "pseudo"), False)))


def pseudo_rows(labels: pa.Table, iteration: int) -> pa.Table:
    """The pseudo-labels made in ``iteration`` (round)."""
    mask = pc.and_(pc.equal(labels["source"], "pseudo"), pc.equal(labels["iteration"], iteration))
    return labels.filter(pc.fill_null(mask, False))


def pseudo_needs_calibration(cfg: ExperimentConfig) -> bool:
    """Whether the teacher must be calibrated before pseudo-labeling: calibrated columns asked
    for (``calib``, a ``*_cal`` column), or ``combo``, whose thresholds (§7) live on the
    calibrated columns unless calibration is switched off."""
    spec, c = cfg.ssl.selection_strategy, cfg.calibration
    thresholds_calibrated = c.calibrate_classification and c.calibrate_regression
    combo = spec.needs_thresholds and thresholds_calibrated
    return spec.needs_calibration or combo or c.always


def pseudo_stream(
    pool: PoolState, iteration: int, cfg: ExperimentConfig, predictions: Path
) -> tuple[pa.Table, pa.Table] | None:
    """(images, pseudo-labels) of the student's second stream for ``iteration``; None when
    no image has a pseudo-label (images without a surviving detection are dropped, §11.1).
    Under ``ssl.rejected: ignore`` the teacher's detections on those images (``predictions``,
    those the pseudo-labels were selected from) follow as ignore regions."""
    rows = pseudo_rows(pool.labels, iteration)
    if rows.num_rows == 0:
        return None
    ids = pc.unique(rows["image_id"].combine_chunks())
    images = pool.images.filter(pc.is_in(pool.images["image_id"], value_set=ids))
    if cfg.ssl.rejected == "ignore":
        preds = read_table(schema.PREDICTIONS, predictions)
        rows = with_ignore_regions(rows, preds, cfg.ssl.teacher_min_score)
    return images.sort_by("image_id"), rows


def validation_detections(
    run: RunDir, cfg: ExperimentConfig, iteration: int
) -> tuple[pa.Table, pa.Table] | None:
    """The validation detections (score ≥ ``ssl.teacher_min_score``) of the model that labels
    ``iteration`` (model ``iteration − 1``, kept by its evaluation) and the validation gt;
    None when that model kept none."""
    path = run.val_predictions_file(iteration - 1)
    if not path.exists():
        return None
    val = read_table(schema.PREDICTIONS, path)
    val = val.filter(pc.greater_equal(val["score"], cfg.ssl.teacher_min_score))
    return val, eval_split(run)[2]


def fit_pseudo_correctness(
    validation: tuple[pa.Table, pa.Table], calib: bool, iou: float | Literal["coco"] = 0.5
) -> CorrectnessModel:
    """``pcorrect``'s model: the validation detections labeled right or wrong (matched in
    descending score order at IoU ``iou``, ``ssl.pcorrect_iou``; with ``coco`` the fraction
    of COCO's IoU thresholds at which they match), fitted on their (calibrated with
    ``calib``) columns."""
    from detloop.selectors.columns import DetColumns
    from detloop.selectors.pseudo_correctness import fit_correctness
    from detloop.selectors.pseudo_ranking import rank_true, rank_true_coco

    val, gt = validation
    score = DetColumns(val).get("score")
    right = rank_true_coco(val, score, gt) if iou == "coco" else rank_true(val, score, gt, iou)
    return fit_correctness(DetColumns(val, calib=calib), right)


def fit_pseudo_tau(
    cfg: ExperimentConfig,
    validation: tuple[pa.Table, pa.Table],
    predictions: pa.Table,
    thresholds: Mapping[str, Any] | None,
    correctness: CorrectnessModel | None,
) -> TauFit:
    """``ssl.target_precision``: the selection rule's τ fitted on the ``validation``
    detections against their gt, the certainty on ``predictions``' scale (the pool's)."""
    from detloop.selectors.pseudo import selection_signal
    from detloop.selectors.pseudo_ranking import fit_tau, rank_true

    ssl = cfg.ssl
    assert ssl.target_precision is not None
    val, gt = validation
    spec = ssl.selection_strategy
    signal = selection_signal(val, spec, thresholds, predictions, correctness)
    return fit_tau(signal, rank_true(val, signal, gt), gt.num_rows, ssl.target_precision)


def fit_selection_rule(
    run: RunDir,
    cfg: ExperimentConfig,
    iteration: int,
    validation: tuple[pa.Table, pa.Table] | None,
    predictions: pa.Table,
    thresholds: Mapping[str, Any] | None,
) -> tuple[float, CorrectnessModel | None, dict[str, float]]:
    """What the selection rule fits on validation before it selects: ``pcorrect``'s model
    (stored beside the round) and, with ``ssl.target_precision``, τ; with their numbers.

    Raises:
        DataError: either is asked for and the labeling model kept no validation predictions.
    """
    ssl = cfg.ssl
    spec = ssl.selection_strategy
    tau, correctness, numbers = ssl.tau, None, dict[str, float]()
    if ssl.target_precision is None and not spec.needs_correctness:
        return tau, correctness, numbers
    if validation is None:
        raise DataError(
            str(run.val_predictions_file(iteration - 1)), None, None,
            "ssl.target_precision and 'pcorrect' need the labeling model's validation "
            "predictions",
        )  # fmt: skip
    if spec.needs_correctness:
        correctness = fit_pseudo_correctness(validation, spec.calib, cfg.ssl.pcorrect_iou)
        write_json(correctness.as_dict(), run.iteration_dir(iteration) / CORRECTNESS_FILE)
        numbers.update(correctness.numbers())
    if ssl.target_precision is not None:
        fit = fit_pseudo_tau(cfg, validation, predictions, thresholds, correctness)
        tau = fit.tau
        numbers.update(fit.as_dict())
    return tau, correctness, numbers


def pseudo_label(
    run: RunDir,
    cfg: ExperimentConfig,
    pool: PoolState,
    predictions: pa.Table,
    candidates: pa.Table,
    iteration: int,
    refine: Callable[[pa.Table], tuple[pa.Table, dict[str, Any]]] | None = None,
) -> tuple[PoolState, dict[str, Any]]:
    """Select the pseudo-labels of ``iteration`` from the teacher's ``predictions`` of the
    ``candidates`` images (ALGORITHMS §11.1-11.2) and put them in the pool's labels (source
    ``pseudo``; this iteration's earlier ones replaced, nothing else touched).

    ``refine`` (the SSL loop's PLS and 3D study, ``pseudo_refine.refiner``) gets the selected
    pseudo-labels (with their scores) and returns those to store and its numbers.

    Returns the new pool state and the numbers: pseudo-labels, images with one, per image,
    what the rule fitted on validation and — when the pool's gt is known (simulated runs) —
    their precision and recall at IoU 0.5 and the signals' rankings (``_ranking_numbers``);
    under ``classes`` the per-class table (``pseudo_class_rows``), for the caller to keep
    (``RunDir.write_pseudo_classes``).
    """
    from detloop.data.labels import next_box_id
    from detloop.selectors import pseudo as rules

    ssl = cfg.ssl
    ids = candidates["image_id"].combine_chunks()
    preds = predictions.filter(pc.is_in(predictions["image_id"], value_set=ids))
    preds = preds.filter(pc.greater_equal(preds["score"], ssl.teacher_min_score))
    thr_file = run.thresholds_file(iteration)
    thresholds = read_json(thr_file) if thr_file.exists() else None
    validation = validation_detections(run, cfg, iteration)
    tau, model, fitted = fit_selection_rule(run, cfg, iteration, validation, preds, thresholds)
    spec = ssl.selection_strategy
    kept = rules.select_pseudo_labels(preds, spec, tau, thresholds, ssl.consistency_filter, model)
    kept = rules.cap_per_image(kept, ssl.max_per_image)
    refined: dict[str, Any] = {}
    if refine is not None:
        kept, refined = refine(kept)
    pool = pool.without_labels("pseudo", iteration=iteration)
    gt = run.read_gt()
    first = next_box_id(pool.labels, gt)
    pool = pool.with_labels(rules.pseudo_labels_table(kept, iteration, first_box_id=first))
    n_images = len(pc.unique(kept["image_id"])) if kept.num_rows else 0
    info: dict[str, Any] = {
        "candidates": candidates.num_rows,
        "pseudo_labels": kept.num_rows,
        "pseudo_images": n_images,
        "pseudo_per_image": kept.num_rows / n_images if n_images else 0.0,
        **{k: v for k, v in fitted.items() if math.isfinite(v)},
        **refined,
    }
    by_class = _hidden_quality(kept, gt, ids)
    info["classes"] = _class_rows(run, pool, kept, by_class)
    if by_class is not None:
        quality = PseudoQuality.total(by_class.values())
        info.update({k: v for k, v in quality.as_dict().items() if v == v})
        model = None if spec.calib else model  # the ranking reads the stored columns
        info.update(_ranking_numbers(cfg, preds, gt, thresholds, validation, model))
    return pool, info


def _hidden_quality(kept: pa.Table, gt: pa.Table, ids: pa.Array) -> dict[int, PseudoQuality] | None:
    """Per class, the ``kept`` pseudo-labels against the pool's hidden gt of the candidate
    ``ids`` — None outside simulated runs (no gt on those images). One matching per round: the
    per-class table and the round's totals (their sum) both read it."""
    if not pc.any(pc.is_in(gt["image_id"], value_set=ids)).as_py():
        return None
    return pseudo_quality_by_class(kept, gt, ids.to_pylist())


def _class_rows(
    run: RunDir, pool: PoolState, kept: pa.Table, quality: Mapping[int, PseudoQuality] | None
) -> list[dict[str, Any]]:
    """The per-class table of the ``kept`` pseudo-labels (``pseudo_class_rows``) beside the
    pool's labeled boxes, with their ``quality`` against the hidden gt when known."""
    cats = run.read_categories()
    names = dict(zip(cats["class_id"].to_pylist(), cats["name"].to_pylist(), strict=True))
    return pseudo_class_rows(kept, training_labels(pool.labels), names, quality)


def _ranking_numbers(
    cfg: ExperimentConfig,
    candidates: pa.Table,
    gt: pa.Table,
    thresholds: Mapping[str, Any] | None,
    validation: tuple[pa.Table, pa.Table] | None,
    correctness: CorrectnessModel | None,
) -> dict[str, float]:
    """How well each selection signal ranks the ``candidates`` against the hidden ``gt``, at
    STAC's count (simulated runs); ``pcorrect`` on the stored columns — ``correctness`` when
    given, else fitted on ``validation`` when there is one."""
    from detloop.selectors.pseudo_ranking import ranking_report

    if correctness is None and validation is not None:
        correctness = fit_pseudo_correctness(validation, False, cfg.ssl.pcorrect_iou)
    report = ranking_report(candidates, gt, cfg.ssl.tau, thresholds, correctness=correctness)
    out: dict[str, float] = {}
    for name, ranked in report.items():
        out.update({k: v for k, v in ranked.as_dict(name).items() if v == v})
    return out
