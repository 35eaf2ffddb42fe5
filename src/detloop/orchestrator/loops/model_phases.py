"""``ModelLoop``: the phases every loop with detectors shares — predicting images with one of
its models over the workers, evaluating a model, calibrating and thresholding it on validation,
and auto-labeling with it (decide, export, log). ``ActiveLearningLoop``, ``SemiSupervisedLoop``
and ``AutoLabelRun`` are built on it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from detloop import console
from detloop.data import schema, splits
from detloop.data.io import write_json, write_table
from detloop.orchestrator.engine.journal import Phase
from detloop.orchestrator.engine.journaled import JournaledLoop, Step
from detloop.orchestrator.engine.progress import iteration_line
from detloop.orchestrator.engine.workers import TrainJob, TrainOutcome
from detloop.orchestrator.loops import steps
from detloop.reports.pseudo_classes import class_numbers, pseudo_class_plot


class ModelLoop(JournaledLoop):
    """A journaled loop whose iteration i has a model ``run.checkpoint(i)``."""

    def set_up(self) -> None:
        self.categories = self.run.read_categories()
        self.num_classes = self.categories.num_rows

    def refresh_categories(self) -> None:
        """Re-read the categories (after the import wrote them)."""
        self.categories = self.run.read_categories()
        self.num_classes = self.categories.num_rows

    def train(self, iteration: int, job: TrainJob) -> TrainOutcome:
        """Run ``job`` on the train worker. Fault point ``ITERATION:train:mid`` (tests): the
        first attempt stops after one step, leaving its partial checkpoint, and the driver is
        killed; the next attempt resumes the training from that checkpoint."""
        if job.class_names is None:  # a bundle in model.weights is matched to them by name
            job = replace(job, class_names=self.categories["name"].to_pylist())
        if self.fault_pending(iteration, Phase.TRAIN, "mid"):
            self.workers.train(replace(job, stop_at_step=1))
            self._fault(iteration, Phase.TRAIN, "mid")
        return self.workers.train(job)

    def predict(
        self, iteration: int, model_iteration: int, images: pa.Table, stage: str, phase: Phase
    ) -> tuple[pa.Table, float, dict[str, int]]:
        """Predictions of ``images`` by model ``model_iteration``, sharded over the workers
        (shards persisted under ``iteration``/``stage`` for a resume)."""
        weights = self.run.weights_file(model_iteration).read_bytes()
        return steps.predict_sharded(
            self.run,
            self.cfg,
            self.workers,
            key=f"{self.run.path}:{model_iteration}",
            weights=weights,
            num_classes=self.num_classes,
            images=images,
            iteration=iteration,
            stage=stage,
            seed=self.seed(iteration, stage),
            on_first_shard=lambda: self._fault(iteration, phase, "mid"),
        )

    def evaluate(self, iteration: int, test: bool = False) -> dict[str, Any]:
        """mAP of model ``iteration`` on validation (its predictions kept for calibration)
        and, with ``test``, on the test split too (``test_map``, ``test_map50`` and the per-class
        ``test_ap/<class>``) when the run has one;
        written to the iteration's ``metrics.json``."""
        split, images, gt = splits.eval_split(self.run)
        table, seconds, stats = self.predict(
            iteration, iteration, images, f"evaluate_{split}", Phase.EVALUATE
        )
        write_table(table, schema.PREDICTIONS, self.run.val_predictions_file(iteration))
        t0 = time.perf_counter()
        metrics = steps.evaluate(table, gt, images, self.categories)
        metrics["eval_split"] = split
        if test and split != "test" and splits.has_split(self.run, "test"):
            t_images, t_gt = splits.split_tables(self.run, "test")
            t_table, t_seconds, _ = self.predict(
                iteration, iteration, t_images, "evaluate_test", Phase.EVALUATE
            )
            write_table(
                t_table, schema.PREDICTIONS, self.run.split_predictions_file(iteration, "test")
            )
            seconds += t_seconds
            t_metrics = steps.evaluate(t_table, t_gt, t_images, self.categories)
            metrics.update(
                {
                    f"test_{k}": v
                    for k, v in t_metrics.items()
                    if k in ("map", "map50") or k[:3] == "ap/"
                }
            )
        seconds += time.perf_counter() - t0
        write_json(metrics, self.run.metrics_file(iteration))
        out = {"compute": seconds, "map": metrics.get("map"), "map50": metrics.get("map50")}
        out.update({k: metrics[k] for k in ("test_map", "test_map50") if k in metrics})
        return {**out, **stats}

    def phase_calibrate(self, iteration: int) -> dict[str, Any]:
        """Calibrate model ``iteration - 1`` on validation; fill the pool predictions' ``*_cal``."""
        t0 = time.perf_counter()
        info = steps.calibrate(self.run, self.cfg, iteration, self.seed(iteration, "calibrate"))
        return {"compute": time.perf_counter() - t0, **info}

    def phase_threshold(self, iteration: int) -> dict[str, Any]:
        """Cost-sensitive thresholds (§7) of model ``iteration - 1`` on validation."""
        t0 = time.perf_counter()
        info = steps.threshold(self.run, self.cfg, iteration, self.seed(iteration, "threshold"))
        return {"compute": time.perf_counter() - t0, **info}

    def journal_numbers(self, iteration: int, phases: tuple[Phase, ...]) -> dict[str, float]:
        """The numbers the journal holds for ``phases`` of ``iteration``, as ``<phase>_<key>``
        (training monitors, calibration ECEs, thresholding figures, pseudo-label counts)."""
        out: dict[str, float] = {}
        for h in self.journal.history:
            if h["iteration"] == iteration and h["phase"] in phases:
                out.update(
                    {
                        f"{h['phase']}_{k}": float(v)
                        for k, v in h.items()
                        if k not in ("iteration", "started", "ended", "seconds", "compute")
                        and isinstance(v, int | float)
                        and not isinstance(v, bool)
                    }
                )
        return out

    def notify_history(self, stage: str, history: list[dict[str, float]]) -> None:
        """A training's per-epoch losses (and an SSL student's supervised and unsupervised
        losses and pseudo-labels per image; an online teacher's pseudo-label precision and
        recall in simulated runs) as MLflow series ``<stage>_<key>``, one step per epoch."""
        keys = ("loss", "sup_loss", "unsup_loss", "pseudo_per_image", "val_map", "val_map50")
        for key in (*keys, "pseudo_precision", "pseudo_recall"):
            points = [(int(h["epoch"]), float(h[key])) for h in history if key in h]
            if points:
                self.notify_series(f"{stage}_{key}", points)

    def pseudo_class_outputs(self, iteration: int) -> tuple[dict[str, float], tuple[Path, ...]]:
        """The iteration's pseudo-labels per class, when it made some: their numbers
        (``pseudo_classes.class_numbers``) and the table with its bar plot, to be logged."""
        rows = self.run.read_pseudo_classes(iteration)
        if rows is None:
            return {}, ()
        table = self.run.pseudo_classes_file(iteration)
        title = f"{self.run.name} {self.unit} {iteration}: pseudo-labels per class"
        plot = pseudo_class_plot(rows, table.with_suffix(".png"), title)
        return class_numbers(rows), (table, plot)

    def bound_numbers(self, iteration: int) -> dict[str, float]:
        """What the decoding bounds changed in this iteration's predict and evaluate phases
        (capped stds, dropped boxes), as ``<phase>_<key>``: logged, never silent."""
        from detloop.learners.predict_stats import PredictStats

        out: dict[str, float] = {}
        for h in self.journal.history:
            if h["iteration"] == iteration and h["phase"] in (Phase.PREDICT, Phase.EVALUATE):
                out.update(
                    {f"{h['phase']}_{k}": float(h[k]) for k in PredictStats.names() if k in h}
                )
        return out

    def publish(
        self,
        iteration: int,
        metrics: dict[str, Any],
        numbers: dict[str, float],
        last: int,
        files: tuple[Path, ...] = (),
    ) -> dict[str, Any]:
        """The log phase's common end: ``metrics.json`` with ``numbers``, the iteration's
        numbers and files (and ``files``) to the callbacks, its line to the console."""
        write_json({**metrics, **numbers}, self.run.metrics_file(iteration))
        files = (
            self.run.selection_file(iteration),
            self.run.metrics_file(iteration),
            self.run.thresholds_file(iteration),
            self.run.calibration_dir(iteration),
            *files,
        )
        self.notify_iteration(iteration, numbers, [p for p in files if p.exists()])
        console.say(iteration_line(self.run.name, iteration, last, numbers, unit=self.unit))
        return {"logged": len(numbers)}

    # ---- auto-labeling with model ``it - 1`` (ALGORITHMS §8) -------------------------------
    def autolabel_steps(self, it: int, fits_reused: bool = False) -> list[Step]:
        """Auto-labeling of iteration ``it`` after its predict phase: calibrate (when the
        thresholds are of calibrated uncertainties) and threshold on validation — unless a
        model bundle's own fits were reused — then decide, export, log."""
        c = self.cfg.calibration
        phases = []
        if not fits_reused:
            if c.calibrate_classification and c.calibrate_regression:
                phases.append(Phase.CALIBRATE)
            phases.append(Phase.THRESHOLD)
        return [Step(it, p) for p in (*phases, Phase.DECIDE, Phase.EXPORT, Phase.LOG)]

    def phase_decide(self, iteration: int, first: int | None = None,
                     last: int | None = None) -> dict[str, Any]:  # fmt: skip
        """Each frame (the pool's unlabeled images, [first, last) of them by id) auto-labeled
        or sent to examine; auto-labels with source ``auto``."""
        from detloop.orchestrator.evaluation.autolabel import decide_iteration, frame_ids

        ids = frame_ids(self.run.read_images(), iteration, first, last)
        report = decide_iteration(self.run, self.cfg, iteration, ids)
        return {k: report[k] for k in ("n_images", "n_auto_labeled", "n_examine", "delta")}

    def phase_export(self, iteration: int) -> dict[str, Any]:
        """COCO of the auto-labels; COCO + Label Studio tasks of the images to examine."""
        from detloop.orchestrator.evaluation.autolabel import export_iteration

        return {"files": len(export_iteration(self.run, self.cfg, iteration))}

    def autolabel_numbers(self, iteration: int, report: dict[str, Any]) -> dict[str, float]:
        """What an auto-labeling iteration logs from its ``report`` (decide phase): shares, δ̄,
        the combination's weights, and the auto-labels' quality where the frames have ground
        truth."""
        from detloop.selectors.threshold import load_thresholds

        n = max(1, int(report["n_images"]))
        out = {
            "autolabel_frames": float(report["n_images"]),
            "autolabel_auto_labeled": float(report["n_auto_labeled"]),
            "autolabel_examine": float(report["n_examine"]),
            "autolabel_share": report["n_auto_labeled"] / n,
            "autolabel_auto_labels": float(report["n_auto_labels"]),
            "autolabel_min_score": float(report["min_score"]),
        }
        if report["delta"] is not None and np.isfinite(report["delta"]):
            out["autolabel_delta"] = float(report["delta"])
        res = load_thresholds(self.run.thresholds_file(iteration))
        for name, w in zip(res.uncertainties, res.weights, strict=True):
            out[f"autolabel_weight_{name}"] = float(w)
        quality = report.get("quality") or {}
        for key in ("image_precision", "score_rule_image_precision", "label_precision",
                    "label_recall", "pct_error_free", "share_at_95"):  # fmt: skip
            if key in quality:
                out[f"autolabel_{key}"] = float(quality[key])
        return out

    def autolabel_log(
        self, iteration: int, last: int, extra: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """The log phase of an auto-labeling iteration (its exports go to the tracker too);
        ``extra``: more numbers to log with it."""
        metrics = self.run.read_metrics(iteration)
        numbers = {**(extra or {}), **self.autolabel_numbers(iteration, metrics["autolabel"])}
        numbers.update(self.journal_numbers(iteration, (Phase.CALIBRATE, Phase.THRESHOLD)))
        numbers.update(self.bound_numbers(iteration))
        files = (*self.run.autolabel_exports(iteration), self.run.autolabel_renders_dir(iteration))
        return self.publish(iteration, metrics, numbers, last, files)
