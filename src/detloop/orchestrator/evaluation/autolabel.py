"""Auto-labeling (ALGORITHMS §8): ``detloop autolabel CONFIG --run RUN_DIR --images DIR
[--first N --last M] [--iteration N | --checkpoint PATH] [--set k=v]...``.

validate → calibrate → threshold (each only when its output is missing or does not match the
config) → predict the frames → per-detection rule → images ``auto_labeled`` / ``examine``,
auto-labels (source ``auto``), the selection table with u, δ̄ and verdicts, COCO of the
auto-labeled images, COCO + Label Studio review exports of the ``examine`` images, optional
renderings, and the quality report when ground truth exists for the frames. This module also
registers ``validate``, ``calibrate`` and ``threshold`` (``validation_cli``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig
from detloop.data import schema
from detloop.data.io import write_table
from detloop.data.rundir import RunDir
from detloop.orchestrator.evaluation.common import ModelRef

logger = logging.getLogger(__name__)
REASON = "autolabel: uncertain detection"


def _under(file: str, root: Path) -> bool:
    try:
        Path(file).resolve().relative_to(root)
    except ValueError:
        return False
    return True


def frame_images(
    run: RunDir, images_dir: Path, first: int | None, last: int | None, lenient: bool = False
) -> pa.Table:
    """Images under ``images_dir`` (imported as a ``pool`` folder when the run lacks them),
    sorted by id and sliced to frames [first, last); quarantined images are left out."""
    from detloop.data.importer import import_source

    root = images_dir.resolve()
    images = run.read_images()
    inside = [_under(f, root) for f in images["file"].to_pylist()]
    if not any(inside):
        import_source(run, "folder", root, "pool", images=root, lenient=lenient)
        images = run.read_images()
        inside = [_under(f, root) for f in images["file"].to_pylist()]
    df = images.to_pandas()[inside]
    quarantined = (df["state"] == "examine") & ~df["reason"].fillna(REASON).str.startswith(
        "autolabel"
    )
    ids = sorted(df.loc[~quarantined, "image_id"])[first:last]
    return images.filter(pc.is_in(images["image_id"], value_set=pa.array(ids, pa.string())))


def _wanted_thresholds(cfg: ExperimentConfig) -> dict[str, Any]:
    """The thresholding settings of the config, as a stored result names them."""
    from detloop.selectors.threshold import parse_uncertainties

    t, c = cfg.thresholding, cfg.calibration
    return {
        "thr_fpr_tpr": t.thr_fpr_tpr, "thr_cd": t.thr_cd, "fd_scope": t.fd_scope,
        "unit": t.thr_unit, "thr_iou_thrs": [float(x) for x in t.thr_iou_thrs],
        "uncertainties": parse_uncertainties(t.thr_sel_uncert),
        "calibrated": c.calibrate_classification and c.calibrate_regression,
    }  # fmt: skip


def _matches(path: Path, want: dict[str, Any]) -> bool:
    from detloop.selectors.threshold import load_thresholds

    res = load_thresholds(path)
    return all(getattr(res, k) == v for k, v in want.items())


def ensure_thresholds(
    run: RunDir, cfg: ExperimentConfig, it: int, seed: int, checkpoint: Path | None = None
) -> Any:
    """The thresholding result of iteration ``it`` matching the config (computed if needed,
    on ``checkpoint``'s validation when given)."""
    from detloop.orchestrator.evaluation.validation import threshold_model
    from detloop.selectors.threshold import load_thresholds
    from detloop.selectors.threshold_data import variant_key

    want = _wanted_thresholds(cfg)
    t = cfg.thresholding
    variant = variant_key(want["uncertainties"], t.thr_cd, t.thr_fpr_tpr, t.thr_iou_thrs,
                          t.thr_unit, want["calibrated"], t.fd_scope)  # fmt: skip
    for path in (run.thresholds_file(it), run.thresholds_variant_file(it, variant)):
        if path.exists() and _matches(path, want):
            return load_thresholds(path)
    logger.info("no thresholds of iteration %d match the config: computing them", it)
    threshold_model(run, cfg, it, it, seed, checkpoint=checkpoint)
    return load_thresholds(run.thresholds_file(it))


def reuse_bundle_fits(run: RunDir, cfg: ExperimentConfig, it: int, bundle: Path) -> bool:
    """Copy a model bundle's calibrators and thresholds into iteration ``it`` when they apply
    here: the bundle has them, its thresholds match the config, and its classes are the run's
    in the same order (after ``model.class_map``; per-class calibrators of re-ordered classes
    are fitted anew instead). True when copied."""
    import shutil

    from detloop.learners.bundle import bundle_classes, class_permutation

    classes, names = bundle_classes(bundle), run.class_names()
    thresholds, calibration = bundle / "thresholds.json", bundle / "calibration"
    if classes is None or names is None or not thresholds.is_file():
        return False
    want = _wanted_thresholds(cfg)
    if class_permutation(classes, names, cfg.model.class_map) != list(range(len(classes))):
        return False
    if not _matches(thresholds, want) or (want["calibrated"] and not calibration.is_dir()):
        return False
    run.iteration_dir(it).mkdir(parents=True, exist_ok=True)
    shutil.copy2(thresholds, run.thresholds_file(it))
    if calibration.is_dir():
        shutil.rmtree(run.calibration_dir(it), ignore_errors=True)
        shutil.copytree(calibration, run.calibration_dir(it))
    logger.info("calibrators and thresholds of bundle %s reused", bundle)
    return True


def autolabel_frames(
    run: RunDir, cfg: ExperimentConfig, ref: ModelRef, frames: pa.Table, seed: int
) -> dict[str, Any]:
    """Decide, label and export the ``frames``; returns the report (also in metrics.json)."""
    from detloop.data.labels import next_box_id
    from detloop.data.pool import PoolState
    from detloop.learners.predict import Predictor
    from detloop.orchestrator.evaluation.common import load_calibration, log_run_artifacts
    from detloop.orchestrator.evaluation.validation import (
        calibrate_model,
        same_path,
        threshold_model,
    )
    from detloop.selectors import autolabel as al

    it = ref.iteration
    foreign = None if same_path(ref.checkpoint, run.checkpoint(it)) else ref.checkpoint
    # --checkpoint: a bundle's own fits where they apply, else fitted for it — never the run's
    if foreign is not None and not reuse_bundle_fits(run, cfg, it, foreign):
        c = cfg.calibration
        if c.calibrate_classification and c.calibrate_regression:
            calibrate_model(run, cfg, it, it, seed, plots=False, toolbox=False, checkpoint=foreign)
        threshold_model(run, cfg, it, it, seed, plots=False, checkpoint=foreign)
    thresholds = ensure_thresholds(run, cfg, it, seed, checkpoint=foreign)
    cal = load_calibration(run, it)
    if thresholds.calibrated and cal is None:
        calibrate_model(run, cfg, it, it, seed, plots=False, toolbox=False, checkpoint=foreign)
        cal = load_calibration(run, it)
    predictor = Predictor.from_checkpoint(ref.checkpoint, cfg, class_names=run.class_names())
    preds = predictor.predict(frames, seed=seed)
    predictor.log_stats("autolabel frames")
    preds = cal.transform(preds) if cal is not None else preds
    write_table(preds, schema.PREDICTIONS, run.predictions_file(it))
    min_score = _min_score(run, cfg, it, foreign)
    pdf = preds.drop_columns(["logits", "mc_class_vec"]).to_pandas()
    ids = frames["image_id"].to_pylist()
    decision = al.decide(pdf, ids, thresholds, min_score, cfg.autolabel.empty_image)
    write_table(al.selection_table(decision, it), schema.SELECTION, run.selection_file(it))
    pool = PoolState.load(run).without_labels("auto", image_ids=ids)  # a re-run replaces them
    labels = al.auto_label_table(decision, it, next_box_id(pool.labels))
    pool = pool.with_labels(labels).with_state(decision.ids("auto_labeled"), "auto_labeled", it)
    pool = pool.with_state(decision.ids("examine"), "examine", it, reason=REASON)
    pool.save(run)
    exports = _export(run, cfg, decision, labels, it)
    report = _report(run, cfg, decision, pdf, ids, thresholds.calibrated)
    from detloop.orchestrator.evaluation.common import update_metrics

    paths = [update_metrics(run, it, "autolabel", report), run.selection_file(it), *exports]
    log_run_artifacts(run, cfg, paths, run.artifact_path(it, "autolabel"))
    return report


def _min_score(run: RunDir, cfg: ExperimentConfig, it: int, model: Path | None = None) -> float:
    """``predict.min_score``, else from the stored validation of iteration ``it`` when it is
    of this model (§3), else a bundle's own (``model``: a foreign checkpoint)."""
    from detloop.data.io import read_json, read_table
    from detloop.data.min_score import resolve_min_score
    from detloop.orchestrator.evaluation.common import mean_matched_score
    from detloop.orchestrator.evaluation.validation import validated_by

    if cfg.predict.min_score is not None:
        return resolve_min_score(cfg.predict.min_score)
    ours = model is None or validated_by(run, it) == str(Path(model).resolve())
    if ours and run.matches_file(it).exists():
        preds = read_table(schema.PREDICTIONS, run.val_predictions_file(it))
        avg = mean_matched_score(preds, read_table(schema.MATCHES, run.matches_file(it)))
        return resolve_min_score(None, mean_matched=avg)
    manifest = Path(model) / "manifest.json" if model is not None else None
    if manifest is not None and manifest.is_file():
        stored = read_json(manifest).get("min_score")
        if isinstance(stored, int | float):
            return float(stored)
    return resolve_min_score(None)


def _export(
    run: RunDir, cfg: ExperimentConfig, decision: Any, labels: pa.Table, it: int
) -> list[Path]:
    from detloop.data.export import write_coco
    from detloop.data.review_export import export_review, run_categories
    from detloop.learners.render import render_images, uncertainty_style

    images = run.read_images().to_pandas()
    d = decision.detections
    cats = run_categories(run, d["class_id"].tolist() if len(d) else [])
    auto_ids = decision.ids("auto_labeled")
    auto_boxes = d[d["image_id"].isin(auto_ids)]
    paths = [write_coco(images[images["image_id"].isin(auto_ids)], auto_boxes, cats,
                        run.autolabel_coco_file(it), policy="review")]  # fmt: skip
    out = export_review(run, image_ids=decision.ids("examine"), predictions=d,
                        out_stem=run.autolabel_examine_stem(it), min_score=decision.min_score,
                        document_root=cfg.labeling.document_root,
                        url_prefix=cfg.labeling.url_prefix)  # fmt: skip
    paths += list(out.values())
    if cfg.autolabel.render:
        # a PNG per image under examine/ and auto_labeled/: boxes red when u ≥ δ̄, green
        # otherwise, labelled with u (an auto-labeled image is all green by the rule)
        files = images.set_index("image_id")["file"].to_dict()
        out_dir = run.autolabel_renders_dir(it)
        style = uncertainty_style(decision.delta)
        for verdict in ("examine", "auto_labeled"):
            chosen = [(i, files[i]) for i in decision.ids(verdict)]
            render_images(chosen, d, out_dir / verdict, style=style, text_dx=0)
        paths.append(out_dir)
    return paths


def _report(
    run: RunDir, cfg: ExperimentConfig, decision: Any, pdf: pd.DataFrame, ids: list[str],
    calibrated: bool,
) -> dict[str, Any]:  # fmt: skip
    from detloop.selectors import autolabel as al

    n = len(decision.images)
    report: dict[str, Any] = {
        "n_images": n, "n_auto_labeled": len(decision.ids("auto_labeled")),
        "n_examine": len(decision.ids("examine")), "delta": decision.delta,
        "min_score": decision.min_score,
        "n_auto_labels": int(decision.detections["image_id"].isin(decision.ids("auto_labeled"))
                             .sum()),
        "rankings": al.uncertainty_rankings(pdf, calibrated),
    }  # fmt: skip
    gt = run.read_gt().to_pandas()
    gt = gt[gt["image_id"].isin(ids) & (gt["iscrowd"] == 0)]
    if len(gt):
        report["quality"] = al.quality_report(decision, gt, cfg.autolabel.quality_iou)
    return report
