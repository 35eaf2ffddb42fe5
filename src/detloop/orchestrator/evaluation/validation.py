"""Validation, calibration and thresholding of a trained model (ALGORITHMS §5–§7).

Each step reads what the previous one wrote in the run directory (ARCHITECTURE §8):

* ``validate_model``: predictions and ``reference`` matches of the validation split, runtime,
  mAP, model performance, uncertainty quality (metrics.json + PNGs), decoding methods compared.
* ``calibrate_model``: fit on 80 % of the validation pairs (seeded split by image), report on
  the other 20 % before and after, store the fit on 100 % in ``calibration/``.
* ``threshold_model``: weights and per-IoU thresholds (``thresholds.json``) with plots.

The AL loop calls ``calibrate_iteration`` / ``threshold_iteration`` (model M(i−1), outputs in
iteration i). The verbs live in ``detloop.cli.validation``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.errors import DataError
from detloop.data.io import read_table, write_json, write_table
from detloop.data.min_score import resolve_min_score
from detloop.data.rundir import RunDir
from detloop.learners.calibration import (
    CalibrationSet,
    calibration_pairs,
    fit_calibration_set,
    split_by_image,
)
from detloop.learners.uq_metrics import runtime_stats
from detloop.orchestrator.evaluation.common import (
    DECODE_METHODS,
    ModelRef,
    apply_calibration,
    categories_table,
    eval_split,
    jsonable,
    load_calibration,
    log_run_artifacts,
    mean_matched_score,
    resolve_model,
    update_metrics,
)
from detloop.reports import ep_vs_al, uq_report

logger = logging.getLogger(__name__)


def predict_timed(predictor: Any, images: pa.Table, seed: int) -> tuple[pa.Table, list[float]]:
    """Predict image by image (batch 1), returning the table and per-image times in ms."""
    parts, times = [], []
    for i in range(images.num_rows):
        t0 = predictor.seconds
        parts.append(predictor.predict(images.slice(i, 1), seed=seed, batch_size=1))
        times.append(1000.0 * (predictor.seconds - t0))
    table = pa.concat_tables(parts) if parts else schema.PREDICTIONS.empty()
    return schema.validate_table(table, schema.PREDICTIONS, "predictions"), times


def _evaluate_decoding(
    predictor: Any, cfg: ExperimentConfig, method: str, data: tuple[pa.Table, pa.Table, pa.Table],
    cal: CalibrationSet | None, seed: int,
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:  # fmt: skip
    from detloop.learners.evaluate import coco_map, match_reference, performance_summary

    images, gt, cats = data
    decoding = predictor.with_decoding(method)
    preds, times = predict_timed(decoding, images, seed)
    decoding.log_stats(f"validate ({method} decoding)")
    if cal is not None:
        preds = cal.transform(preds)
    matches = match_reference(preds, gt, assign=cfg.thresholding.assign_gt_box)
    pairs = calibration_pairs(preds, matches)
    summary = {
        "map": coco_map(preds, gt, images, cats),
        "performance": performance_summary(matches, preds, method),
        "runtime_ms": runtime_stats(times),
        "loc_ece": {f"{k}_{'cal' if c else 'uncal'}": uq_report.box_ece(pairs, k, c)
                    for k in uq_report.KINDS for c in (False, True)},
    }  # fmt: skip
    return preds, matches, summary


def validate_model(
    run: RunDir, cfg: ExperimentConfig, ref: ModelRef, seed: int, *, compare: bool = True,
    plots: bool = True, toolbox: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Validation report of one model; writes val predictions, matches, metrics and plots."""
    from detloop.learners.evaluate import background_false_positives
    from detloop.learners.predict import Predictor

    split, images, gt = eval_split(run)
    predictor = Predictor.from_checkpoint(ref.checkpoint, cfg, class_names=run.class_names())
    cats = categories_table(run, predictor.model.spec.num_classes)
    cal = load_calibration(run, ref.iteration)
    method = cfg.predict.uncert_adjust_method
    methods = [method, *(m for m in DECODE_METHODS if m != method)] if compare else [method]
    summaries: dict[str, Any] = {}
    for m in methods:
        out = _evaluate_decoding(predictor, cfg, m, (images, gt, cats), cal, seed)
        summaries[m] = out[2]
        if m == method:
            preds, matches = out[0], out[1]
    write_table(preds, schema.PREDICTIONS, run.val_predictions_file(ref.iteration))
    write_table(matches, schema.MATCHES, run.matches_file(ref.iteration))
    avg = mean_matched_score(preds, matches)
    min_score = resolve_min_score(cfg.predict.min_score, mean_matched=avg)
    pairs = calibration_pairs(preds, matches)
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {
        "split": split, "checkpoint": str(ref.checkpoint), "n_images": images.num_rows,
        "decode_method": method, **summaries[method], "mean_matched_score": avg,
        "min_score": min_score,
        "background_fp": background_false_positives(preds, gt, 0.5, min_score),
        "uncertainty_quality": {
            "class": uq_report.class_report(pairs, cal, cfg.calibration.ece_bins),
            "box": uq_report.box_report(pairs, rng, toolbox),
        },
        "decoding": summaries,
    }  # fmt: skip
    out_dir = run.validation_dir(ref.iteration)
    written = uq_report.write_plots(pairs, cal, out_dir, rng) if plots and len(pairs) else []
    ep_al = ep_vs_al.pair_values(pairs)  # both std families: do they agree, which tracks error
    if ep_al is not None:
        report["ep_vs_al"] = ep_vs_al.quadrant_study(ep_al)
        if plots:
            written.append(ep_vs_al.plot_study(ep_al, report["ep_vs_al"], out_dir / "ep_vs_al.png"))
    if cfg.predict.infer_augment:  # §6.3: the same model on corrupted copies of the split
        from detloop.orchestrator.evaluation.corruption import corruption_report, plot_corruptions

        out_file = out_dir / "corruptions_predictions.parquet"
        decoding = predictor.with_decoding(method)
        report["corruptions"] = corruption_report(
            decoding, cfg, (images, gt, cats), cal, seed, out_file
        )
        written += [out_file] if out_file.exists() else []
        if plots:
            written.append(plot_corruptions(report["corruptions"], out_dir / "corruptions.png"))
    paths = [update_metrics(run, ref.iteration, "validation", report), *written]
    paths += [run.matches_file(ref.iteration), run.val_predictions_file(ref.iteration)]
    log_run_artifacts(run, cfg, paths, run.artifact_path(ref.iteration, "validation"))
    return report


def _methods(cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    c = cfg.calibration
    return {
        "class_method": c.calib_method_class if c.calibrate_classification else None,
        "box_method": c.calib_method_box if c.calibrate_regression else None,
        "objective": c.box_ts_objective, "min_pairs": c.min_pairs, "n_samples": c.unc_samples,
        "random_state": seed % 2**31,
    }  # fmt: skip


def compare_methods(fit: Any, held: Any, cfg: ExperimentConfig, seed: int) -> dict[str, Any]:
    """Held-out ECE of every box method (al and mc stds) and every class method, in memory."""
    from detloop.learners.calibration import BOX_CALIBRATORS, CLASS_CALIBRATORS

    kw = _methods(cfg, seed)
    out: dict[str, Any] = {"box": {}, "class": {}}
    for name in BOX_CALIBRATORS:
        cs = fit_calibration_set(fit, None, name, objective=kw["objective"],
                                 min_pairs=kw["min_pairs"])  # fmt: skip
        h = uq_report.with_calibration(held, cs)
        out["box"][name] = {k: uq_report.box_ece(h, k, True) for k in uq_report.KINDS}
    labels = held["gt_class"].to_numpy(np.int64)
    for name in CLASS_CALIBRATORS:
        if name.startswith("unc_") and fit["mc_class_vec"].isna().any():
            continue
        cs = fit_calibration_set(fit, name, None, n_samples=kw["n_samples"],
                                 random_state=kw["random_state"])  # fmt: skip
        p = uq_report.class_probs(held, cs).get("calibrated")
        if p is not None:
            from detloop.learners.uq_metrics import class_metrics

            m = class_metrics(p, labels, cfg.calibration.ece_bins)
            out["class"][name] = {k: m[k] for k in ("ece", "mce", "sce", "brier", "nll")}
    return out


def calibrate_model(
    run: RunDir, cfg: ExperimentConfig, model_iter: int, out_iter: int, seed: int,
    *, plots: bool = True, toolbox: bool = True, checkpoint: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fit on 80 %, report on 20 % (before/after), store the 100 % fit; fill ``*_cal``.
    ``checkpoint``: the model to calibrate when not the run's own of ``model_iter``."""
    c = cfg.calibration
    preds, matches = load_validation(run, cfg, model_iter, seed, checkpoint)
    preds = preds.drop_columns([n for n in schema.CAL_COLS if n in preds.column_names])
    pairs = calibration_pairs(preds, matches)
    if len(pairs) < 2:
        raise DataError(str(run.val_predictions_file(model_iter)), None, None,
                        f"only {len(pairs)} matched predictions: too few to calibrate")  # fmt: skip
    rng = np.random.default_rng(seed)
    fit, held = split_by_image(pairs, c.calib_split, rng, c.calib_split_mode)
    cal80 = fit_calibration_set(fit, **_methods(cfg, seed))
    held_cal = uq_report.with_calibration(held, cal80)
    report: dict[str, Any] = {
        "model_iteration": model_iter, "n_pairs": len(pairs), "n_fit": len(fit),
        "n_report": len(held), "calibrators": sorted(cal80.calibrators),
        "class": uq_report.class_report(held_cal, cal80, c.ece_bins),
        "box": uq_report.box_report(held_cal, rng, toolbox),
        "methods": compare_methods(fit, held, cfg, seed),
    }  # fmt: skip
    cal = fit_calibration_set(pairs, **_methods(cfg, seed))
    cal_dir = run.calibration_dir(out_iter)
    paths = cal.save(cal_dir)
    apply_calibration(run.val_predictions_file(model_iter), cal)
    if plots and len(held):
        plots_dir = run.calibration_plots_dir(out_iter)
        paths += uq_report.write_plots(held_cal, cal80, plots_dir, rng, c.ece_bins)
    write_json(jsonable(report), run.calibration_report_file(out_iter))
    paths.append(update_metrics(run, out_iter, "calibration", _headline(report)))
    log_run_artifacts(run, cfg, [cal_dir, run.metrics_file(out_iter)], run.artifact_path(out_iter))
    return report


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth a glance: ECE before/after per family."""
    out: dict[str, Any] = {k: report[k] for k in ("n_pairs", "n_fit", "n_report", "calibrators")}
    for k, v in report["class"].items():
        out[f"class_ece_{k}"] = v["ece"]
    for k, v in report["box"].items():
        out[f"box_ece_{k}"] = v["pooled"]["ece"]
    return out


def calibrate_iteration(
    run: RunDir, cfg: ExperimentConfig, iteration: int, seed: int
) -> dict[str, Any]:
    """AL loop: calibrate M(i−1) on validation, store in iteration i, fill the pool's ``*_cal``."""
    report = calibrate_model(run, cfg, iteration - 1, iteration, seed, plots=False, toolbox=False)
    cal = load_calibration(run, iteration)
    if cal is not None:
        apply_calibration(run.predictions_file(iteration), cal)
    return _headline(report)


def threshold_model(
    run: RunDir, cfg: ExperimentConfig, model_iter: int, out_iter: int, seed: int,
    *, plots: bool = True, diagnostics: bool = False, checkpoint: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Cost-sensitive thresholds of ``model_iter``'s model on validation → thresholds.json (the
    latest) and ``thresholding/thresholds_<setting>.json`` (one per (CD/FD, b, IoU range, unit,
    calibration, uncertainties), so settings compared one after the other are all kept)."""
    from detloop.selectors.threshold import CostSensitiveThresholder, threshold_rows

    t, c = cfg.thresholding, cfg.calibration
    calibrated = c.calibrate_classification and c.calibrate_regression
    preds, matches = load_validation(run, cfg, model_iter, seed, checkpoint)
    if calibrated and "entropy_cal" not in preds.column_names:
        calibrate_model(run, cfg, model_iter, out_iter, seed, plots=False, toolbox=False,
                        checkpoint=checkpoint)  # fmt: skip
        preds = read_table(schema.PREDICTIONS, run.val_predictions_file(model_iter))
    avg = mean_matched_score(preds, matches)
    min_score = resolve_min_score(cfg.predict.min_score, mean_matched=avg)
    pdf = preds.drop_columns(["logits", "mc_class_vec"]).to_pandas()
    rows = threshold_rows(pdf, matches.to_pandas(), t.fd_scope, min_score)
    if len(rows) == 0:
        raise DataError(str(run.matches_file(model_iter)), None, "iou", "no matched detections")
    th = CostSensitiveThresholder(
        t.thr_sel_uncert, t.thr_iou_thrs, t.thr_fpr_tpr, t.thr_cd, calibrated,
        seed=t.thr_seed if t.thr_seed is not None else seed, n_trials=t.n_trials,
        patience=t.patience, thr_pick=t.thr_pick, thr_interp=t.thr_interp, per_cls=t.per_cls,
        fd_scope=t.fd_scope, unit=t.thr_unit, min_score=min_score,
        calib_method_class=c.calib_method_class if calibrated else None,
        calib_method_box=c.calib_method_box if calibrated else None,
    ).fit(rows)  # fmt: skip
    result = th.result()
    result.save(run.thresholds_file(out_iter))
    result.save(run.thresholds_variant_file(out_iter, result.variant))  # kept per setting
    paths = [run.thresholds_file(out_iter), run.thresholds_variant_file(out_iter, result.variant)]
    if plots:
        from detloop.reports.threshold_report import write_threshold_plots

        out_dir = run.thresholding_dir(out_iter)
        paths += write_threshold_plots(run, rows, th, out_dir, np.random.default_rng(seed),
                                       diagnostics)  # fmt: skip
    combo = result.metrics["combination"]
    headline = {
        "metric": combo["metric"], "auroc": combo["auroc"], "jsd": combo["jsd"],
        "weights": result.weights, "threshold_mean": result.threshold_mean, "n_rows": len(rows),
        "n_trials": result.n_trials, "min_score": min_score, "model_iteration": model_iter,
    }  # fmt: skip
    paths.append(update_metrics(run, out_iter, "thresholding", headline))
    log_run_artifacts(run, cfg, paths, run.artifact_path(out_iter, "thresholding"))
    return headline


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths (checkpoints) name the same file or directory."""
    return _key(a) == _key(b)


def validated_by(run: RunDir, iteration: int) -> str | None:
    """The checkpoint the stored validation predictions of ``iteration`` came from, when a
    ``validate`` recorded it (the AL loop's evaluation of its own model records none)."""
    ckpt = run.read_metrics(iteration).get("validation", {}).get("checkpoint")
    return _key(Path(ckpt)) if ckpt else None


def threshold_iteration(
    run: RunDir, cfg: ExperimentConfig, iteration: int, seed: int
) -> dict[str, Any]:
    """AL loop: thresholds of M(i−1) on validation, stored in iteration i."""
    return threshold_model(run, cfg, iteration - 1, iteration, seed, plots=False)


def load_validation(
    run: RunDir, cfg: ExperimentConfig, model_iter: int, seed: int,
    checkpoint: Path | None = None,
) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    """Validation predictions and matches of ``model_iter``'s model — of ``checkpoint`` when
    given (``--checkpoint``) — computed when missing or made by another checkpoint."""
    from detloop.learners.evaluate import match_reference

    preds_file = run.val_predictions_file(model_iter)
    if checkpoint is not None and same_path(checkpoint, run.checkpoint(model_iter)):
        checkpoint = None  # the run's own model of that iteration
    wanted = _key(checkpoint if checkpoint is not None else run.checkpoint(model_iter))
    recorded = validated_by(run, model_iter)
    # a given checkpoint must be the one recorded; the run's own is assumed unless another is
    stale = recorded != wanted if checkpoint is not None else recorded not in (None, wanted)
    if not preds_file.exists() or stale:
        ref = resolve_model(run, model_iter if checkpoint is None else None, checkpoint)
        # a prerequisite of calibration/thresholding: the predictions and matches, without
        # the plots and toolbox metrics of the full report (`detloop validate` makes those)
        model = ModelRef(model_iter, ref.checkpoint)
        validate_model(run, cfg, model, seed, compare=False, plots=False, toolbox=False)
    preds = read_table(schema.PREDICTIONS, preds_file)
    mfile = run.matches_file(model_iter)
    if mfile.exists():
        return preds, read_table(schema.MATCHES, mfile)
    _, _, gt = eval_split(run)
    matches = match_reference(preds, gt, assign=cfg.thresholding.assign_gt_box)
    return preds, write_table(matches, schema.MATCHES, mfile)
