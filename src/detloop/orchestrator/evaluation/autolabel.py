"""Auto-labeling (ALGORITHMS §8): the phases an ``AutoLabelRun`` and a loop's ``after_loop``
auto-labeling share, over one iteration ``it`` whose model is iteration ``it - 1``'s:

predictions of the frames (``predictions_file(it)``, calibrated in place by the calibrate
phase) → ``decide_iteration``: the per-detection rule with ``thresholds_file(it)``, images
``auto_labeled`` / ``examine``, auto-labels (source ``auto``), the selection table with u, δ̄
and verdicts, the quality report when the frames have ground truth → ``export_iteration``:
COCO of the auto-labeled images, COCO + Label Studio review exports of the ``examine`` images,
optional renderings. Both phases are idempotent (a re-run replaces its own labels and files).
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
from detloop.data.errors import DataError
from detloop.data.io import read_table, write_table
from detloop.data.rundir import RunDir

logger = logging.getLogger(__name__)
REASON = "autolabel: uncertain detection"


def frame_ids(images: pa.Table, it: int, first: int | None = None,
              last: int | None = None) -> list[str]:  # fmt: skip
    """The frames iteration ``it`` auto-labels: the pool's images sorted by id, sliced to
    [first, last), that are unlabeled — or were decided by this iteration (a re-run)."""
    pool = images.filter(pc.equal(images["split"], "pool")).to_pandas()
    pool = pool.sort_values("image_id").iloc[first:last]
    decided = pool["state"].isin(["auto_labeled", "examine"]) & (pool["iteration"] == it)
    decided &= pool["reason"].fillna(REASON).str.startswith("autolabel")
    return sorted(pool.loc[(pool["state"] == "unlabeled") | decided, "image_id"])


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
    from detloop.data.io import read_json
    from detloop.orchestrator.evaluation.common import update_metrics

    stored = read_json(bundle / "manifest.json").get("min_score")
    info = {"reused_from": str(bundle), "min_score": stored}
    update_metrics(run, it, "thresholding", {k: v for k, v in info.items() if v is not None})
    logger.info("calibrators and thresholds of bundle %s reused", bundle)
    return True


def decision_min_score(run: RunDir, cfg: ExperimentConfig, it: int) -> float:
    """``predict.min_score``, else the one the thresholds of ``it`` were fitted above (§3: from
    the model's validation, or a bundle's own), else the default."""
    from detloop.data.min_score import resolve_min_score

    if cfg.predict.min_score is not None:
        return resolve_min_score(cfg.predict.min_score)
    stored = run.read_metrics(it).get("thresholding", {}).get("min_score")
    return float(stored) if isinstance(stored, int | float) else resolve_min_score(None)


def _decision(run: RunDir, cfg: ExperimentConfig, it: int, ids: list[str]) -> tuple[Any, Any]:
    """The rule applied to iteration ``it``'s predictions of ``ids`` (pure, so the export
    phase recomputes exactly what the decide phase stored); also the predictions frame."""
    from detloop.orchestrator.evaluation.common import load_calibration
    from detloop.selectors import autolabel as al
    from detloop.selectors.threshold import load_thresholds

    thresholds = load_thresholds(run.thresholds_file(it))
    preds = read_table(schema.PREDICTIONS, run.predictions_file(it))
    if thresholds.calibrated and "entropy_cal" not in preds.column_names:
        cal = load_calibration(run, it)
        if cal is None:
            msg = "the thresholds are of calibrated uncertainties: no calibrators"
            raise DataError(str(run.calibration_dir(it)), None, None, msg)
        preds = cal.transform(preds)
    pdf = preds.drop_columns(["logits", "mc_class_vec"]).to_pandas()
    min_score = decision_min_score(run, cfg, it)
    return al.decide(pdf, ids, thresholds, min_score, cfg.autolabel.empty_image), pdf


def decide_iteration(run: RunDir, cfg: ExperimentConfig, it: int, ids: list[str]) -> dict[str, Any]:
    """Decide the frames ``ids``: selection table, auto-labels, image states, the report (in
    ``metrics.json`` under ``autolabel``); returns the report."""
    from detloop.data.labels import next_box_id
    from detloop.data.pool import PoolState
    from detloop.orchestrator.evaluation.common import update_metrics
    from detloop.selectors import autolabel as al

    decision, pdf = _decision(run, cfg, it, ids)
    write_table(al.selection_table(decision, it), schema.SELECTION, run.selection_file(it))
    pool = PoolState.load(run).without_labels("auto", image_ids=ids)  # a re-run replaces them
    labels = al.auto_label_table(decision, it, next_box_id(pool.labels))
    pool = pool.with_labels(labels).with_state(decision.ids("auto_labeled"), "auto_labeled", it)
    pool = pool.with_state(decision.ids("examine"), "examine", it, reason=REASON)
    pool.save(run)
    calibrated = "entropy_cal" in pdf.columns
    report = _report(run, cfg, decision, pdf, ids, calibrated)
    update_metrics(run, it, "autolabel", report)
    return report


def export_iteration(run: RunDir, cfg: ExperimentConfig, it: int) -> list[Path]:
    """The files of iteration ``it``'s decision (as the decide phase stored it)."""
    sel = read_table(schema.SELECTION, run.selection_file(it))
    decision, _ = _decision(run, cfg, it, sel["image_id"].to_pylist())
    return _export(run, cfg, decision, it)


def _export(run: RunDir, cfg: ExperimentConfig, decision: Any, it: int) -> list[Path]:
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
