"""``AutoLabelRun``: auto-labeling as a journaled run of its own (``loop: autolabel``, run
directory ``autolabel-s<seed>``) — it reads its model, never writes into another run.

Iteration 0 is the model: the import (validation split, the frames as the pool, their ground
truth when they have it) installs ``autolabel.model`` — a checkpoint of another run or a model
bundle, adapted to this data's classes by name (``model.class_map``) — as this run's
checkpoint 0, and a bundle's own calibrators and thresholds where they apply here; evaluate
then validates the model on this data's validation split. Iteration 1 is its auto-labeling:
predict the frames → [calibrate] → threshold (cost-sensitive, §7) on validation → decide
(§8) → export → log, every phase journaled and idempotent, so a run killed anywhere resumes
with the same verdicts. One MLflow run holds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from detloop.data import schema, splits
from detloop.data.errors import DataError
from detloop.data.io import write_table
from detloop.orchestrator.engine.journal import Phase
from detloop.orchestrator.engine.journaled import Handler, Step
from detloop.orchestrator.evaluation.autolabel import frame_ids
from detloop.orchestrator.loops.model_phases import ModelLoop

MODEL, LABEL = 0, 1  # the iterations: the installed model, its auto-labeling


class AutoLabelRun(ModelLoop):
    """One auto-labeling run over a run directory that ``engine.runs.create_run`` prepared."""

    @property
    def source(self) -> Path:
        model = self.cfg.autolabel.model
        assert model is not None  # the config refuses loop: autolabel without it
        return Path(model)

    def prologue(self) -> list[Step]:
        return [Step(MODEL, Phase.IMPORT)]

    def plan(self) -> list[Step]:
        out = [Step(MODEL, Phase.EVALUATE)] if self._has_val() else []
        out.append(Step(LABEL, Phase.PREDICT))
        return out + self.autolabel_steps(LABEL, bool(self.journal.meta.get("bundle_fits")))

    def last_iteration(self) -> int | None:
        return LABEL

    def handlers(self) -> Mapping[Phase, Handler]:
        return {
            Phase.IMPORT: self._phase_import,
            Phase.EVALUATE: self._phase_evaluate,
            Phase.PREDICT: self._phase_predict,
            Phase.CALIBRATE: self.phase_calibrate,
            Phase.THRESHOLD: self.phase_threshold,
            Phase.DECIDE: self._phase_decide,
            Phase.EXPORT: self.phase_export,
            Phase.LOG: self._phase_log,
        }

    def _has_val(self) -> bool:
        return splits.has_split(self.run, "val")

    def _frames(self, it: int) -> list[str]:
        a = self.cfg.autolabel
        return frame_ids(self.run.read_images(), it, a.infer_first_frame, a.infer_last_frame)

    # ---- phases ----------------------------------------------------------------------------
    def _phase_import(self, iteration: int) -> dict[str, Any]:
        """The data, then the model as checkpoint 0 (and a bundle's fits, where they apply)."""
        from detloop.learners.bundle import install_model
        from detloop.learners.model import resolve_spec
        from detloop.orchestrator.engine.runs import import_data
        from detloop.orchestrator.evaluation.autolabel import reuse_bundle_fits

        data = self.cfg.data.model_copy(update={"test": None})  # nothing here reads a test split
        imported = import_data(
            self.run, self.cfg.model_copy(update={"data": data}), hash_pool=False
        )
        self.refresh_categories()
        names = self.run.class_names()
        if not names:
            msg = "no categories: import a validation split (data.val) with them"
            raise DataError(str(self.run.categories_file), None, None, msg)
        spec = install_model(self.source, self.run.checkpoint(MODEL), names,
                             self.cfg.model.class_map)  # fmt: skip
        _check_spec(spec, resolve_spec(self.cfg.model, len(names)).to_json(), self.source)
        fits = reuse_bundle_fits(self.run, self.cfg, LABEL, self.source)
        if not fits and not self._has_val():
            msg = (
                "auto-labeling calibrates and thresholds the model on a validation split: none "
                "was imported (or use a model bundle whose thresholds match the config)"
            )
            raise DataError("data.val", None, None, msg)
        self.journal.set("bundle_fits", fits)
        return {"imported": imported, "frames": len(self._frames(LABEL)), "bundle_fits": fits}

    def _phase_evaluate(self, iteration: int) -> dict[str, Any]:
        return self.evaluate(iteration)

    def _phase_predict(self, iteration: int) -> dict[str, Any]:
        images = self.run.read_images()
        ids = pa.array(self._frames(iteration), pa.string())
        frames = images.filter(pc.is_in(images["image_id"], value_set=ids))
        table, seconds, stats = self.predict(iteration, MODEL, frames, "predict", Phase.PREDICT)
        write_table(table, schema.PREDICTIONS, self.run.predictions_file(iteration))
        return {"compute": seconds, "detections": table.num_rows, "frames": frames.num_rows,
                **stats}  # fmt: skip

    def _phase_log(self, iteration: int) -> dict[str, Any]:
        """The auto-labeling's numbers, with the model's mAP on this validation split."""
        known = self.run.read_metrics(MODEL)
        extra = {k: float(known[k]) for k in ("map", "map50") if isinstance(known.get(k), float)}
        return self.autolabel_log(iteration, LABEL, extra)

    def _phase_decide(self, iteration: int) -> dict[str, Any]:
        a = self.cfg.autolabel
        return self.phase_decide(iteration, a.infer_first_frame, a.infer_last_frame)


def _check_spec(stored: dict[str, Any], wanted: dict[str, Any], source: Path) -> None:
    """The config's model section must describe the model it predicts with (the predict
    workers build the network from the config)."""
    diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    if diff:
        detail = "; ".join(f"{k}: model {stored.get(k)!r}, config {wanted.get(k)!r}" for k in diff)
        msg = f"the config's model section does not describe this model ({detail})"
        raise DataError(
            str(source), None, "model_spec", f"{msg}: use the config it was trained with"
        )
