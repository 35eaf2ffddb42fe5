"""``SemiSupervisedLoop``: the phases and the plan of one semi-supervised run (ALGORITHMS §11.1,
§11.2).

Round 0 is the teacher: the seeded labeled split (``portion_labeled`` % of the pool; compat
``ssl_split: first_n``), the teacher trained on it, its evaluation. Round r ≥ 1 predicts the
unlabeled part with model r-1 (the teacher, then the latest student), [calibrates and
thresholds it on validation when the selection needs it], selects pseudo-labels
(``selection_strategy``, stored as ``labels`` rows with ``source = pseudo`` and the round) and
trains model r on gt + pseudo: round 1 is the student, from the initial weights; rounds 2.. are
the ``selftrain`` rounds, each from the previous student for ``selftrain_epochs`` (at most
``selftrain_max_steps``). With ``ssl.teacher: ema`` round 1 trains an online mean teacher
instead (the burn-in is round 0).
``ssl.teacher_strategy``'s blocks (§11.3, §11.4; ``ssl_blocks``): ``rcc`` adds rare-class
collages to the labeled part in the split phase, once; ``imscore`` weighs every round's labeled
objects by their class. ``ssl.pls`` (PLS, §11.7) and ``ssl.oracle_variant`` (the 3D study,
§11.8) narrow and correct each round's pseudo-labels before they are stored
(``pseudo_refine``). With ``ssl.method: csd`` (§11.9) round 0 is the same teacher (the
comparison; compat ``csd_split: reference`` takes the reference's number of labeled images)
and round 1, the last, trains a CSD model from the initial weights on the labeled part and
every unlabeled image (consistency with their flips): no predict, no pseudo-labels.

Every phase is journaled and idempotent like the AL loop's, so a run killed anywhere resumes
with the same pseudo-labels and the same labeled set. The teacher (round 0) is shared by every
selection strategy of one seed through the warm-up cache.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detloop.config import ExperimentConfig, SSLConfig
from detloop.data import schema, splits
from detloop.data.collage import is_generated
from detloop.data.io import read_json, read_table, write_table
from detloop.data.pool import PoolState
from detloop.learners.presets import PRESETS
from detloop.orchestrator.engine.journal import Phase
from detloop.orchestrator.engine.journaled import Handler, Step
from detloop.orchestrator.engine.workers import TrainJob
from detloop.orchestrator.loops import pseudo_refine, ssl_blocks, steps
from detloop.orchestrator.loops.model_phases import ModelLoop
from detloop.orchestrator.loops.warmup import WarmupCache
from detloop.selectors.budgets import iteration_sizes
from detloop.selectors.pseudo import PseudoSpec
from detloop.selectors.pseudo_quality import PseudoQuality
from detloop.selectors.ssl_csd import csd_split

logger = logging.getLogger(__name__)


def round_name(r: int, method: str = "stac") -> str:
    """``teacher``, ``student``, ``selftrain1``, ... (the MLflow series prefix of a round);
    ``csd`` for round 1 of ``ssl.method: csd``."""
    if r == 1 and method == "csd":
        return "csd"
    return "teacher" if r == 0 else "student" if r == 1 else f"selftrain{r - 1}"


def labeled_split(
    images: pa.Table, portion: float, mode: str, seed: int, csd: tuple[int, int] | None = None
) -> list[str]:
    """The labeled part of the pool (§11.1, detloop decision 12): ``round(portion % · n)``
    images (at least 1), a seeded random set, or the first ones in file order (``first_n``).
    With ``csd`` = (B, ratio), CSD's reference count int((n // B)·B/(ratio + 1)) instead
    (§11.9). Generated images (RCC collages of an earlier pass) are not part of the pool."""
    real = pc.and_(pc.equal(images["split"], "pool"), pc.invert(is_generated(images["image_id"])))
    pool = images.filter(real).sort_by("file")
    if csd is not None:
        n = max(1, csd_split(pool.num_rows, *csd).num_labeled)
    else:
        n = max(1, iteration_sizes(pool.num_rows, [portion])[0])
    ids = pool["image_id"].to_pylist()
    if mode == "first_n":
        return sorted(ids[:n])
    chosen = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return sorted(ids[i] for i in chosen)


class SemiSupervisedLoop(ModelLoop):
    """One SSL run over a run directory that ``engine.runs.create_run`` prepared."""

    unit = "round"

    def set_up(self) -> None:
        super().set_up()
        self.spec: PseudoSpec = self.cfg.ssl.selection_strategy
        ident: dict[str, Any] = {"ssl": [self.cfg.ssl.portion_labeled, self.cfg.ssl.ssl_split]}
        ident.update(ssl_blocks.teacher_ident(self.cfg))  # rcc, imscore: their options
        reference = self.csd_reference_split()
        if reference is not None:  # CSD's reference count: another split, another teacher
            ident["csd_split"] = list(reference)
        self.teacher_cache = WarmupCache.for_run(self.run, self.cfg, ident)

    # ---- schedule --------------------------------------------------------------------------
    def n_rounds(self) -> int:
        """Models after the teacher: the student, then the ``selftrain`` rounds (none with
        ``ssl.teacher_only``: comparing teacher strategies needs no student)."""
        if self.cfg.ssl.teacher_only:
            return 0
        if self.cfg.ssl.method == "csd":  # one CSD model, no self-training (§11.9)
            return 1
        return 1 + (self.cfg.ssl.selftrain_rounds if self.spec.selftrain else 0)

    def needs_calibration(self) -> bool:
        return steps.pseudo_needs_calibration(self.cfg)

    def csd_reference_split(self) -> tuple[int, int] | None:
        """(B, ratio) when the labeled split is CSD's reference count (``ssl.csd_split``)."""
        ssl = self.cfg.ssl
        if ssl.method != "csd" or ssl.csd_split != "reference":
            return None
        return _batch_size(self.cfg), ssl.csd_ratio

    def plan(self) -> list[Step]:
        out = [Step(0, p) for p in (Phase.SPLIT, Phase.TRAIN, Phase.EVALUATE, Phase.LOG)]
        for r in range(1, self.n_rounds() + 1):
            phases = [Phase.PREDICT]
            if self.needs_calibration():
                phases.append(Phase.CALIBRATE)
            if self.spec.needs_thresholds:
                phases.append(Phase.THRESHOLD)
            phases += [Phase.PSEUDO_LABEL, Phase.TRAIN, Phase.EVALUATE, Phase.LOG]
            if self.cfg.ssl.method == "csd":  # trains on the unlabeled images themselves
                phases = [Phase.TRAIN, Phase.EVALUATE, Phase.LOG]
            out += [Step(r, p) for p in phases]
        if self.cfg.autolabel.after_loop:  # the last model auto-labels the unlabeled part
            k = self.n_rounds() + 1
            out += [Step(k, Phase.PREDICT), *self.autolabel_steps(k)]
        return out

    def prologue(self) -> list[Step]:
        return [Step(0, Phase.IMPORT)]

    def last_iteration(self) -> int | None:
        return self.n_rounds() + (1 if self.cfg.autolabel.after_loop else 0)

    def handlers(self) -> Mapping[Phase, Handler]:
        return {
            Phase.IMPORT: self._phase_import,
            Phase.SPLIT: self._phase_split,
            Phase.PREDICT: self._phase_predict,
            Phase.CALIBRATE: self.phase_calibrate,
            Phase.THRESHOLD: self.phase_threshold,
            Phase.PSEUDO_LABEL: self._phase_pseudo_label,
            Phase.TRAIN: self._phase_train,
            Phase.EVALUATE: self._phase_evaluate,
            Phase.DECIDE: self.phase_decide,
            Phase.EXPORT: self.phase_export,
            Phase.LOG: self._phase_log,
        }

    def close(self) -> None:
        self.teacher_cache.release()

    # ---- phases ----------------------------------------------------------------------------
    def _phase_import(self, iteration: int) -> dict[str, Any]:
        from detloop.orchestrator.engine.runs import import_data

        imported = import_data(self.run, self.cfg, hash_pool=False)
        self.refresh_categories()
        return {"imported": imported, "pool": splits.count_pool(self.run.read_images())}

    def _phase_split(self, iteration: int) -> dict[str, Any]:
        """Reveal the labeled part (simulated oracle); the ids are recorded in the selection
        table of round 0 and in ``run.json``. With ``rcc`` the collages then join the labeled
        part, once (``ssl_blocks.add_collages``)."""
        out = self.run.selection_file(0)
        if not self.teacher_cache.restore_selection(out):
            ids = labeled_split(
                self.run.read_images(),
                self.cfg.ssl.portion_labeled,
                self.cfg.ssl.ssl_split,
                self.seed(0, "split"),
                csd=self.csd_reference_split(),
            )
            write_table(_selection_table(ids), schema.SELECTION, out)
            self.teacher_cache.store_selection(out)
        sel = read_table(schema.SELECTION, out)
        ids = sorted(sel["image_id"].to_pylist())
        pool = PoolState.load(self.run).without_labels("oracle", iteration=0)
        pool = pool.reveal(self.run.read_gt(), ids, 0)
        pool.save(self.run)
        self.journal.set("labeled_ids", ids)
        info: dict[str, Any] = {"labeled": len(ids), "unlabeled": len(pool.ids("unlabeled"))}
        if self.cfg.ssl.teacher_strategy.rcc:
            info.update(ssl_blocks.add_collages(self.run, self.cfg, self.categories))
            self._fault(iteration, Phase.SPLIT, "mid")  # tests: killed after the collages
            info["labeled_with_rcc"] = len(PoolState.load(self.run).ids("labeled"))
        return info

    def _phase_predict(self, iteration: int) -> dict[str, Any]:
        unlabeled = ssl_blocks.unlabeled_images(PoolState.load(self.run))
        table, seconds, stats = self.predict(
            iteration, iteration - 1, unlabeled, "predict", Phase.PREDICT
        )
        write_table(table, schema.PREDICTIONS, self.run.predictions_file(iteration))
        return {"compute": seconds, "detections": table.num_rows, **stats}

    def _phase_pseudo_label(self, iteration: int) -> dict[str, Any]:
        """The round's pseudo-labels; with ``ssl.pls`` / ``ssl.oracle_variant`` narrowed by PLS
        and corrected by the 3D study (``pseudo_refine``) before they are stored."""
        pool = PoolState.load(self.run)
        preds = read_table(schema.PREDICTIONS, self.run.predictions_file(iteration))
        candidates = ssl_blocks.unlabeled_images(pool)
        seed = self.seed(iteration, "pls") if self.cfg.ssl.pls == "rand" else 0
        refine = pseudo_refine.refiner(self.run, self.cfg, preds, iteration, seed)
        pool, info = steps.pseudo_label(
            self.run, self.cfg, pool, preds, candidates, iteration, refine=refine
        )
        self.run.write_labels(pool.labels)
        self.run.write_pseudo_classes(iteration, info.pop("classes"))
        if info["pseudo_labels"] == 0:
            self.warn(
                "no_pseudo_labels",
                f"round {iteration}: the selection {self.spec.name!r} kept no pseudo-label "
                f"(tau {self.cfg.ssl.tau}); the student trains on the labeled part only",
            )
        return info

    def _phase_train(self, iteration: int) -> dict[str, Any]:
        ckpt = self.run.checkpoint(iteration)
        if iteration == 0 and self.teacher_cache.restore_checkpoint(ckpt):
            return {"warmup_cache": True}
        pool = PoolState.load(self.run)
        ssl = self.cfg.ssl
        # the teacher and the student start from the config's weights (model.weights, loaded as
        # weights_kind says), or the student from the teacher's (ssl.student_init); self-
        # training rounds from the previous student, whole
        from_teacher = iteration == 1 and ssl.student_init == "teacher"
        init = self.run.weights_file(iteration - 1) if iteration > 1 or from_teacher else None
        budget = _round_budget(ssl, iteration)
        val = splits.split_tables(self.run, "val") if self.cfg.train.early_stopping else None
        pseudo = None
        if iteration > 0:
            preds = self.run.predictions_file(iteration)
            pseudo = steps.pseudo_stream(pool, iteration, self.cfg, preds)
        online = None
        if iteration > 0 and ssl.teacher == "ema":
            # burn-in = round 0; the mean teacher labels the unlabeled part every step
            init = self.run.weights_file(0)
            pseudo = (ssl_blocks.unlabeled_images(pool), schema.LABELS.empty())
            online = self._online_selection(iteration, pseudo[0]["image_id"])
        unlabeled = None
        if iteration == 1 and ssl.method == "csd":  # consistency on every unlabeled image
            pseudo, unlabeled = None, ssl_blocks.unlabeled_images(pool)
        job = TrainJob(
            images=pool.images_in("labeled"),
            labels=self._training_labels(pool),
            num_classes=self.num_classes,
            out_dir=str(ckpt),
            seed=self.seed(iteration, "train"),
            val=val,
            init_weights=str(init) if init else None,
            pseudo=pseudo,
            **budget._asdict(),
            online=online,
            unlabeled=unlabeled,
        )
        result = self.train(iteration, job)
        if iteration == 0:
            self.teacher_cache.store_checkpoint(ckpt)
        self.notify_history(round_name(iteration, ssl.method), result.history)
        unsup = [h["unsup_loss"] for h in result.history if "unsup_loss" in h]
        if unsup and max(unsup) == 0.0:
            self.warn("unsup_loss_zero", f"round {iteration}: the unsupervised loss stayed 0")
        return {
            "compute": result.seconds,
            "steps": result.steps,
            "loss": result.final_loss,
            **result.monitors,
            **_last(result.history, ("sup_loss", "unsup_loss")),
            **_online_quality(result.history),
        }

    def _training_labels(self, pool: PoolState) -> pa.Table:
        """The labeled part's labels; under ``imscore`` weighted by their class (§11.4)."""
        labels = steps.training_labels(pool.labels)
        if not self.cfg.ssl.teacher_strategy.imscore:
            return labels
        ssl = self.cfg.ssl
        return ssl_blocks.imscore_labels(labels, self.num_classes, ssl.rcf_lowest, ssl.rcf_highest)

    def _online_selection(self, iteration: int, unlabeled: pa.ChunkedArray) -> Any:
        """The mean teacher's selection: this run's rules with the burn-in teacher's
        thresholds and calibrators (fitted on validation in this round's phases), and the
        hidden gt of the ``unlabeled`` images (simulated runs) to score its labels."""
        from detloop.learners.mean_teacher import OnlineSelection

        thr = self.run.thresholds_file(iteration)
        cal = self.run.calibration_dir(iteration)
        gt = self.run.read_gt()  # hidden gt of the unlabeled part: scores, never selects
        return OnlineSelection.from_config(
            self.cfg,
            read_json(thr) if thr.exists() else None,
            cal if self.spec.needs_calibration and cal.exists() else None,
            gt.filter(pc.is_in(gt["image_id"], value_set=unlabeled)),
        )

    def _phase_evaluate(self, iteration: int) -> dict[str, Any]:
        if iteration == 0 and self.teacher_cache.restore_evaluation(self.run, 0):
            return {"warmup_cache": True}
        info = self.evaluate(iteration, test=True)
        if iteration == 0:
            self.teacher_cache.store_evaluation(self.run, 0)
        return info

    def _phase_log(self, iteration: int) -> dict[str, Any]:
        if iteration > self.n_rounds():  # autolabel.after_loop
            return self.autolabel_log(iteration, iteration)
        metrics = read_json(self.run.metrics_file(iteration))
        pool = PoolState.load(self.run)
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        numbers["round"] = float(iteration)
        numbers["labeled_images"] = float(len(pool.ids("labeled")))
        numbers["labeled_boxes"] = float(pool.n_labeled_boxes())
        phases: tuple[Phase, ...] = (
            Phase.TRAIN,
            Phase.CALIBRATE,
            Phase.THRESHOLD,
            Phase.PSEUDO_LABEL,
        )
        if self.cfg.ssl.teacher_strategy.rcc:  # the collages' counts (split_rcc_images, ...)
            phases = (Phase.SPLIT, *phases)
        numbers.update(self.journal_numbers(iteration, phases))
        numbers.update(self.bound_numbers(iteration))
        for phase, seconds in self.journal.phase_seconds(iteration).items():
            numbers[f"time_{phase}"] = seconds
        per_class, files = self.pseudo_class_outputs(iteration)
        numbers.update(per_class)
        files += (self.run.pls_scores_file(iteration),)  # PLS's per-image table, when it ran
        return self.publish(iteration, metrics, numbers, self.last_iteration() or 0, files)


def _selection_table(ids: list[str]) -> pa.Table:
    """Round 0's selection table: the labeled split, every row selected."""
    n = len(ids)
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "iteration": pa.array([0] * n, pa.int32()),
            "strategy": pa.array(["ssl_split"] * n, pa.string()),
            "score": pa.nulls(n, pa.float64()),
            "rank": pa.array(range(n), pa.int32()),
            "selected": pa.array([True] * n),
            "n_det": pa.array([0] * n, pa.int32()),
            "components": pa.nulls(n, pa.list_(pa.float64())),
        }
    )


def _batch_size(cfg: ExperimentConfig) -> int:
    """The training's batch size B: ``train.batch_size``, or the model preset's default."""
    if "batch_size" in cfg.train.model_fields_set:
        return cfg.train.batch_size
    return int(PRESETS[cfg.model.preset].train.get("batch_size", cfg.train.batch_size))


class RoundBudget(NamedTuple):
    """What a round trains for where it differs from ``train`` (None: ``train``'s)."""

    epochs: int | None = None
    max_steps: int | None = None
    eval_steps: int | None = None
    patience: int | None = None
    lr_schedule: Literal["cosine", "plateau"] | None = None


def _round_budget(ssl: SSLConfig, iteration: int) -> RoundBudget:
    """The teacher trains as any model, the first student on its own budget, self-training
    rounds for ``selftrain_epochs`` (at most ``selftrain_max_steps``); students evaluate val
    every ``student_eval_steps``, stop (or drop the rate) after ``student_patience``
    evaluations without a gain and follow ``student_lr_schedule``."""
    if iteration == 0:
        return RoundBudget()
    own: dict[str, Any] = {
        "eval_steps": ssl.student_eval_steps,
        "patience": ssl.student_patience,
        "lr_schedule": ssl.student_lr_schedule,
    }
    if iteration == 1:
        return RoundBudget(ssl.student_epochs, ssl.student_max_steps, **own)
    return RoundBudget(ssl.selftrain_epochs, ssl.selftrain_max_steps, **own)


def _online_quality(history: list[dict[str, float]]) -> dict[str, float]:
    """An online mean teacher's pseudo-labels over the whole training, scored against the
    hidden gt (the per-epoch counts the trainer recorded; none outside simulated runs)."""
    keys = ("pseudo_boxes", "pseudo_gt_boxes", "pseudo_matched")
    total = PseudoQuality.total(PseudoQuality(*(int(h.get(k, 0)) for k in keys)) for h in history)
    if not total.n_gt:
        return {}
    out = {"labels": float(total.n_pseudo), "precision": total.precision, "recall": total.recall}
    return {f"online_pseudo_{k}": v for k, v in out.items() if v == v}


def _last(history: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    last = history[-1] if history else {}
    return {k: float(last[k]) for k in keys if k in last}
