"""``ActiveLearningLoop``: the phases and the plan of one active-learning run.

Iteration 0 is the warm-up (seeded random selection, model M0); iteration i >= 1 predicts the
unlabeled pool with M(i-1), [calibrates, thresholds], selects n_i images, labels them (oracle
or humans), trains M(i), evaluates it and logs. The ``JournaledLoop`` base journals every phase
in ``run.json``; the phases are idempotent, so a run killed anywhere resumes where it was,
selecting and labeling nothing twice. Heavy work runs in the workers (Ray actors by default);
this class is plain Python in the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from detloop.data import schema, splits
from detloop.data.io import read_json, read_table, write_table
from detloop.data.pool import PoolState
from detloop.orchestrator.engine.journal import Phase, iteration_phases
from detloop.orchestrator.engine.journaled import Handler, Paused, Step
from detloop.orchestrator.engine.workers import TrainJob
from detloop.orchestrator.loops import steps
from detloop.orchestrator.loops.model_phases import ModelLoop
from detloop.orchestrator.loops.warmup import WarmupCache
from detloop.selectors.strategy import StrategySpec, parse_strategy

logger = logging.getLogger(__name__)


class WaitingForLabels(Paused):
    """The loop stopped in ``wait_for_labels``; ``detloop import-labels`` continues it."""

    status = str(Phase.WAIT_FOR_LABELS)


class ActiveLearningLoop(ModelLoop):
    """One AL run over a run directory that ``engine.runs.create_run`` prepared (arguments:
    ``JournaledLoop``'s)."""

    def set_up(self) -> None:
        super().set_up()
        self.spec: StrategySpec = self.cfg.al.strategy
        self.human = self.cfg.al.oracle == "human"
        self.warmup = WarmupCache.for_run(self.run, self.cfg, {"budget": self.cfg.al.al_budgets[0]})

    # ---- schedule --------------------------------------------------------------------------
    def budgets(self) -> list[int]:
        meta = self.journal.meta
        if "budget_sizes" not in meta:
            images = self.run.read_images()
            n_pool = splits.count_pool(images)
            meta["budget_sizes"] = steps.budget_sizes(self.cfg, self.spec, images, n_pool)
            self.journal.save()
        sizes: list[int] = meta["budget_sizes"]
        return sizes

    def n_iterations(self) -> int:
        k = len(self.budgets())
        return min(k, self.cfg.al.iterations) if self.cfg.al.iterations else k

    def needs_calibration(self) -> bool:
        ssl = self.cfg.al.ssl and steps.pseudo_needs_calibration(self.cfg)
        return self.spec.needs_calibration or ssl or self.cfg.calibration.always

    def needs_threshold(self) -> bool:
        ssl = self.cfg.al.ssl and self.cfg.ssl.selection_strategy.needs_thresholds
        return self.spec.needs_thresholds or ssl

    def needs_predictions(self) -> bool:
        """Whether an iteration predicts the pool before selecting (also for what the
        predictions feed: calibration, thresholds, pseudo-labels, a human's pre-annotations)."""
        return (
            self.spec.needs_predictions
            or self.needs_calibration()
            or self.needs_threshold()
            or self.cfg.al.ssl
            or self.human
        )

    def plan(self) -> list[Step]:
        """Every (iteration, phase) after the import, in order."""
        out: list[Step] = []
        for it in range(self.n_iterations()):
            for ph in iteration_phases(
                it,
                calibrate=self.needs_calibration(),
                threshold=self.needs_threshold(),
                human=self.human,
                predict=self.needs_predictions(),
            ):
                out.append(Step(it, ph))
        if self.cfg.autolabel.after_loop:  # the final model auto-labels the rest of the pool
            k = self.n_iterations()
            out += [Step(k, Phase.PREDICT), *self.autolabel_steps(k)]
        return out

    # ---- the base's hooks ------------------------------------------------------------------
    def prologue(self) -> list[Step]:
        """The import (and pruning): the budgets, hence the plan, need the imported pool."""
        return [Step(0, Phase.IMPORT)]

    def handlers(self) -> Mapping[Phase, Handler]:
        return {
            Phase.IMPORT: self._phase_import,
            Phase.PREDICT: self._phase_predict,
            Phase.CALIBRATE: self.phase_calibrate,
            Phase.THRESHOLD: self.phase_threshold,
            Phase.SELECT: self._phase_select,
            Phase.LABEL: self._phase_label,
            Phase.WAIT_FOR_LABELS: self._phase_wait_for_labels,
            Phase.TRAIN: self._phase_train,
            Phase.EVALUATE: self._phase_evaluate,
            Phase.DECIDE: self.phase_decide,
            Phase.EXPORT: self.phase_export,
            Phase.LOG: self._phase_log,
        }

    def last_iteration(self) -> int | None:
        # the number of iterations needs the budgets, known once the pool is imported
        if "budget_sizes" not in self.journal.meta:
            return None
        return self.n_iterations() - (0 if self.cfg.autolabel.after_loop else 1)

    def close(self) -> None:
        self.warmup.release()

    # ---- phases ----------------------------------------------------------------------------
    def _phase_import(self, iteration: int) -> dict[str, Any]:
        from detloop.orchestrator.engine.runs import import_data

        # a run's strategy is fixed, so pool hashes are needed only when it prunes
        imported = import_data(self.run, self.cfg, hash_pool=self.spec.prunes)
        self.refresh_categories()
        images = self.run.read_images()
        pruned = steps.prune_pool(self.cfg, self.spec, images, self.seed(0, "prune"))
        if pruned is not None:
            self.run.write_images(pruned)
        return {
            "imported": imported,
            "pool": splits.count_pool(pruned if pruned is not None else images),
        }

    def _phase_select(self, iteration: int) -> dict[str, Any]:
        out = self.run.selection_file(iteration)
        if iteration == 0 and self.warmup.restore_selection(out):
            return {"warmup_cache": True}
        pool = PoolState.load(self.run)
        unlabeled = pool.images_in("unlabeled")
        budget = self.budgets()[iteration]
        if iteration == 0 or not self.needs_predictions():
            preds = schema.PREDICTIONS.empty()
            spec = parse_strategy("random") if iteration == 0 else self.spec
        else:
            preds = read_table(schema.PREDICTIONS, self.run.predictions_file(iteration))
            spec = self.spec
        table = steps.select(
            self.cfg,
            self.run,
            spec,
            preds,
            unlabeled,
            budget,
            iteration,
            self.seed(iteration, "select"),
        )
        write_table(table, schema.SELECTION, out)
        if iteration == 0:
            self.warmup.store_selection(out)
        return {"selected": int(pc.sum(table["selected"]).as_py() or 0)}

    def _selected_ids(self, iteration: int) -> list[str]:
        sel = read_table(schema.SELECTION, self.run.selection_file(iteration))
        ids: list[str] = sel.filter(sel["selected"])["image_id"].to_pylist()
        return ids

    def _phase_label(self, iteration: int) -> dict[str, Any]:
        ids = self._selected_ids(iteration)
        pool = PoolState.load(self.run)
        if self.human:
            steps.export_query(self.run, self.cfg, pool, ids, iteration)
            pool = pool.with_state(ids, "queried", iteration)
            pool.save(self.run)
            return {"queried": len(ids)}
        # Idempotent: drop this iteration's oracle labels from an interrupted attempt first.
        pool = pool.without_labels("oracle", iteration=iteration)
        pool = pool.reveal(self.run.read_gt(), ids, iteration)
        self.run.write_labels(pool.labels)
        self._fault(iteration, Phase.LABEL, "mid")
        self.run.write_images(pool.images)
        return {"labeled": len(ids), "boxes": pool.n_labeled_boxes()}

    def _phase_wait_for_labels(self, iteration: int) -> dict[str, Any]:
        # a warning: the one message a person must read to continue (shown even with -q)
        stem = self.run.query_stem(iteration)
        files = [
            f for f in (Path(f"{stem}.coco.json"), Path(f"{stem}.label_studio.json")) if f.exists()
        ]
        logger.warning(
            "waiting for labels of iteration %d: label the images of %s, then run\n"
            "  detloop import-labels %s FILE\n  %s",
            iteration,
            " and ".join(str(f) for f in files) or f"{stem}.*",
            self.run.path,
            self.resume_command,
        )
        raise WaitingForLabels

    def _phase_train(self, iteration: int) -> dict[str, Any]:
        ckpt = self.run.checkpoint(iteration)
        if iteration == 0 and not self.human and self.warmup.restore_checkpoint(ckpt):
            return {"warmup_cache": True}
        pool = PoolState.load(self.run)
        images = pool.images_in("labeled")
        init = None  # the config's starting weights (model.weights, as weights_kind says)
        if self.cfg.al.warm_start and iteration > 0:
            init = self.run.weights_file(iteration - 1)
        val = splits.split_tables(self.run, "val") if self.cfg.train.early_stopping else None
        pseudo, info = None, dict[str, Any]()
        if self.cfg.al.ssl and iteration > 0:
            pool, info = self._pseudo_labels(pool, iteration)
            preds = self.run.predictions_file(iteration)
            pseudo = steps.pseudo_stream(pool, iteration, self.cfg, preds)
        job = TrainJob(
            images=images,
            labels=steps.training_labels(pool.labels),
            num_classes=self.num_classes,
            out_dir=str(ckpt),
            seed=self.seed(iteration, "train"),
            val=val,
            init_weights=str(init) if init else None,
            pseudo=pseudo,
        )
        result = self.train(iteration, job)
        if iteration == 0 and not self.human:
            self.warmup.store_checkpoint(ckpt)
        if pseudo is not None:
            self.notify_history(f"student_it{iteration}", result.history)
        return {
            "compute": result.seconds,
            "steps": result.steps,
            "loss": result.final_loss,
            **result.monitors,
            **info,
        }

    def _pseudo_labels(self, pool: PoolState, iteration: int) -> tuple[PoolState, dict[str, Any]]:
        """``al.ssl``: pseudo-labels on the images still unlabeled after this iteration's
        labeling, from M(i-1)'s predictions of the pool, by ``ssl.selection_strategy``."""
        preds = read_table(schema.PREDICTIONS, self.run.predictions_file(iteration))
        candidates = pool.images_in("unlabeled")
        pool, info = steps.pseudo_label(self.run, self.cfg, pool, preds, candidates, iteration)
        pool.save(self.run)
        self.run.write_pseudo_classes(iteration, info.pop("classes"))
        if info["pseudo_labels"] == 0:
            self.warn("no_pseudo_labels", f"iteration {iteration}: no pseudo-labels selected")
        return pool, info

    def _phase_predict(self, iteration: int) -> dict[str, Any]:
        unlabeled = PoolState(self.run.read_images(), schema.LABELS.empty()).images_in("unlabeled")
        table, seconds, stats = self.predict(
            iteration, iteration - 1, unlabeled, "predict", Phase.PREDICT
        )
        write_table(table, schema.PREDICTIONS, self.run.predictions_file(iteration))
        return {"compute": seconds, "detections": table.num_rows, **stats}

    def _phase_evaluate(self, iteration: int) -> dict[str, Any]:
        if (
            iteration == 0
            and not self.human
            and self.warmup.restore_evaluation(self.run, iteration)
        ):
            return {"warmup_cache": True}
        info = self.evaluate(iteration, test=True)  # test_* metrics when the run has a test split
        if iteration == 0 and not self.human:
            self.warmup.store_evaluation(self.run, iteration)
        return info

    def _phase_log(self, iteration: int) -> dict[str, Any]:
        if iteration == self.n_iterations():  # autolabel.after_loop
            return self.autolabel_log(iteration, iteration)
        metrics = read_json(self.run.metrics_file(iteration))
        pool = PoolState.load(self.run)
        numbers = steps.iteration_metrics(metrics, pool, self.journal, iteration, self.budgets())
        # training monitors, calibration ECEs, thresholding figures
        numbers.update(
            self.journal_numbers(iteration, (Phase.TRAIN, Phase.CALIBRATE, Phase.THRESHOLD))
        )
        numbers.update(self.bound_numbers(iteration))
        times = self.journal.iteration_overhead(iteration)  # phases before this one
        numbers.update({f"iteration_{k}_s": v for k, v in times.items()})
        per_class, files = self.pseudo_class_outputs(iteration)  # al.ssl's pseudo-labels
        numbers.update(per_class)
        return self.publish(iteration, metrics, numbers, self.last_iteration() or 0, files)
