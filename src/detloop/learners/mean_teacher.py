"""An online mean teacher for SSL detection (``ssl.teacher: ema``; beyond the reference).

The strongest semi-supervised detectors (Unbiased Teacher, Soft Teacher) keep a teacher that is
an exponential moving average of the student and label each step's unlabeled images with it:
the teacher sees a weak view (the letterboxed image), the student a strong, box-aware
augmented view carrying the teacher's boxes. detloop keeps that scheme and replaces their fixed
score thresholds (0.7, 0.9) by its own selection rules (ALGORITHMS §11.2): the teacher's
detections go through ``select_pseudo_labels`` with the run's ``selection_strategy`` — so a
calibrated, cost-budgeted uncertainty threshold (``combo``: u < δ̄ of §7, fitted on the
burn-in teacher's validation) decides what the student learns from.

The burn-in is the SSL loop's round 0 (the teacher trained on the labeled part); student and
teacher both start from it. After every student step

    θ_teacher ← α·θ_teacher + (1 − α)·θ_student          (α = ``ssl.ema_decay``)

on every floating-point entry of the state dict (BatchNorm statistics included; integer
counters are copied). No warm-up ramp: the teacher starts from a trained model, not from a
random one. Its state is part of the training's partial checkpoint, so a resumed run continues
with the same teacher; the round's checkpoint is the teacher's weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from detloop.config import ExperimentConfig
from detloop.learners.model import UncertainEfficientDet
from detloop.selectors.pseudo import (
    ConsistencyFilter,
    PseudoSpec,
    cap_per_image,
    select_pseudo_labels,
)
from detloop.selectors.pseudo_quality import PseudoQuality, pseudo_quality


@dataclass(frozen=True)
class OnlineSelection:
    """How the mean teacher turns its detections into pseudo-labels: the SSL selection
    (``spec``, τ, the teacher's score floor, the cap per image) with the thresholds (for
    ``combo``) and calibrators (for ``calib``) fitted on the burn-in teacher's validation.
    ``gt``: the hidden ground truth of the unlabeled images in a simulated run — it scores the
    online pseudo-labels (``MeanTeacher.take_quality``) and never selects one."""

    spec: PseudoSpec
    tau: float
    min_score: float
    max_per_image: int
    decay: float
    thresholds: Mapping[str, Any] | None = None
    calibration_dir: str | None = None
    consistency: ConsistencyFilter | None = None
    gt: pa.Table | None = None

    @classmethod
    def from_config(
        cls,
        cfg: ExperimentConfig,
        thresholds: Mapping[str, Any] | None,
        calibration_dir: Path | None,
        gt: pa.Table | None = None,
    ) -> OnlineSelection:
        ssl = cfg.ssl
        return cls(
            spec=ssl.selection_strategy,
            tau=ssl.tau,
            min_score=ssl.teacher_min_score,
            max_per_image=ssl.max_per_image,
            decay=ssl.ema_decay,
            thresholds=thresholds,
            calibration_dir=str(calibration_dir) if calibration_dir else None,
            consistency=ssl.consistency_filter,
            gt=gt if gt is not None and gt.num_rows else None,
        )


class MeanTeacher:
    """The EMA teacher of a student model and the pseudo-labels it gives each step."""

    def __init__(
        self, student: UncertainEfficientDet, selection: OnlineSelection, cfg: ExperimentConfig
    ) -> None:
        self.model = copy.deepcopy(student)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.selection = selection
        self.cfg = cfg
        self.updates = 0
        # the online pseudo-labels scored against ``selection.gt`` since the last
        # ``take_quality`` (the trainer takes it at every epoch end, before any save)
        self.quality = PseudoQuality(0, 0, 0)
        self._predictor: Any = None
        self._calibration: Any = None

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        """θ_t ← α·θ_t + (1 − α)·θ_s (floating-point entries; others copied)."""
        alpha = self.selection.decay
        state = student.state_dict()
        for key, value in self.model.state_dict().items():
            if value.is_floating_point():
                value.mul_(alpha).add_(state[key].detach(), alpha=1.0 - alpha)
            else:
                value.copy_(state[key])
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {"updates": self.updates, "weights": weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["weights"])

    def take_quality(self) -> dict[str, float]:
        """Precision and recall (IoU 0.5, as ``pseudo_quality``) of the online pseudo-labels
        given since the last call, with their counts (a ratio of zero counts left out); {}
        without hidden gt. Resets the counts (the trainer takes them once per epoch)."""
        if self.selection.gt is None:
            return {}
        quality, self.quality = self.quality, PseudoQuality(0, 0, 0)
        out = {k: v for k, v in quality.as_dict().items() if v == v}
        return {**out, "pseudo_matched": float(quality.matched)}

    def _predict(self, images: pa.Table, seed: int, root: Path | None) -> pa.Table:
        from detloop.learners.predict import Predictor

        if self._predictor is None:
            self._predictor = Predictor(self.model, self.cfg)
        table = self._predictor.predict(images, seed=seed, progress=False, root=root)
        self.model.eval()
        if self.selection.calibration_dir is not None:
            from detloop.learners.calibration import CalibrationSet

            if self._calibration is None:
                self._calibration = CalibrationSet.load(Path(self.selection.calibration_dir))
            table = self._calibration.transform(table)
        return table

    def pseudo_labels(self, images: pa.Table, seed: int, root: Path | None = None) -> pa.Table:
        """The teacher's pseudo-labels of ``images`` (weak views): image_id, class_id,
        x1..y2 (original pixels) and ``weight``, selected by the run's rules."""
        sel = self.selection
        preds = self._predict(images, seed, root)
        preds = preds.filter(pc.greater_equal(preds["score"], sel.min_score))
        kept = select_pseudo_labels(preds, sel.spec, sel.tau, sel.thresholds, sel.consistency)
        kept = cap_per_image(kept, sel.max_per_image)
        if sel.gt is not None:
            self.quality += pseudo_quality(kept, sel.gt, images["image_id"].to_pylist())
        cols = ["image_id", "class_id", "x1", "y1", "x2", "y2"]
        out = kept.select(cols).append_column(
            "weight", pa.array(np.asarray(kept["weight"].to_numpy(), np.float32))
        )
        return out
