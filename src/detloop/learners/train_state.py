"""The resumable state of a training run and its partial checkpoints.

A partial checkpoint (``<out_dir>.partial/``) holds the weights, the optimizer, AMP scaler and
RNG states, the weight EMA, the step and the history, plus a fingerprint of the run (config,
seed, data) so that only the same run resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from detloop.config import ExperimentConfig
from detloop.learners import checkpoint as ckpt
from detloop.learners.model import UncertainEfficientDet

log = logging.getLogger(__name__)


def run_fingerprint(
    cfg: ExperimentConfig,
    images: pa.Table,
    labels: pa.Table,
    seed: int,
    num_classes: int,
    extra: str = "",
) -> str:
    """A short hash identifying a training run: model and train config, seed, data (and
    ``extra``, e.g. how many of the images are a pseudo-labeled stream)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [cfg.model.model_dump(mode="json"), cfg.train.model_dump(mode="json")], sort_keys=True
        ).encode()
    )
    h.update(f"{seed}/{num_classes}/{labels.num_rows}{extra}".encode())
    h.update("\n".join(map(str, images.column("image_id").to_pylist())).encode())
    return h.hexdigest()[:16]


class WeightEma:
    """Exponential moving average of a model's weights (``moving_average_decay``, §1.5).

    Every floating-point entry of the state dict (parameters and BatchNorm statistics) is
    averaged; the others (BatchNorm's batch counters) are copied. Update n (1 for the first)
    uses d_n = min(decay, (1 + n) / (10 + n)), as TF's ``ExponentialMovingAverage`` with
    ``num_updates`` in the reference EfficientDet, so a short run is not dominated by its
    initial weights: ``shadow ← d_n·shadow + (1 − d_n)·weights``.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def rate(self, n: int) -> float:
        """The decay d_n of update ``n``."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights into the average (after an optimiser step)."""
        self.updates += 1
        d = self.rate(self.updates)
        for key, value in model.state_dict().items():
            avg = self.shadow[key]
            if avg.is_floating_point():
                avg.mul_(d).add_(value.detach(), alpha=1.0 - d)
            else:
                avg.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)


@dataclass
class LoopState:
    """The mutable state of one training run (what a partial checkpoint holds)."""

    model: UncertainEfficientDet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    memory_format: torch.memory_format = torch.contiguous_format  # of the input images
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    best_map: float = -1.0
    bad_evals: int = 0
    lr_drops: int = 0  # the plateau schedule's drops so far
    best_state: dict[str, torch.Tensor] | None = None
    ema: WeightEma | None = None
    teacher: Any = None  # an online mean teacher (``learners.mean_teacher.MeanTeacher``)
    # data-parallel training: ``model`` in DistributedDataParallel (the forward pass goes
    # through it so that backward averages gradients over the ranks)
    parallel: torch.nn.Module | None = None

    def forward(self, images: torch.Tensor, **kwargs: Any) -> Any:
        """The model's training forward pass (through DDP when data-parallel)."""
        return (self.parallel or self.model)(images, **kwargs)

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": self.step,
            "history": self.history,
            "seconds": self.seconds,
            "best_map": self.best_map,
            "bad_evals": self.bad_evals,
            "lr_drops": self.lr_drops,
            "best_state": self.best_state,
            "ema": None if self.ema is None else self.ema.state_dict(),
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        for key in ("step", "history", "seconds", "best_map", "bad_evals", "best_state"):
            setattr(self, key, state[key])
        self.lr_drops = int(state.get("lr_drops", 0))  # absent in checkpoints before it
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])


@contextmanager
def saved_weights(loop: LoopState) -> Iterator[UncertainEfficientDet]:
    """The model holding the weights its checkpoint would get (the EMA's when on) for the
    duration of the block; the trained weights are put back after it."""
    if loop.ema is None:
        yield loop.model
        return
    trained = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
    loop.model.load_state_dict(loop.ema.shadow)
    try:
        yield loop.model
    finally:
        loop.model.load_state_dict(trained)


def last_loss(loop: LoopState) -> float:
    return float(loop.history[-1]["loss"]) if loop.history else float("nan")


def resume(loop: LoopState, partial_dir: Path, run_key: str) -> None:
    if not (partial_dir / ckpt.META_FILE).exists():
        return
    meta = ckpt.read_metadata(partial_dir)
    if meta.get("fingerprint") != run_key:
        log.warning("ignoring partial checkpoint %s of a different run", partial_dir)
        return
    loop.model.load_state_dict(ckpt.load_state_dict(partial_dir))
    state = torch.load(partial_dir / ckpt.STATE_FILE, map_location="cpu", weights_only=False)
    loop.restore(state)
    log.info("resuming training at step %d from %s", loop.step, partial_dir)


def save_partial(loop: LoopState, partial_dir: Path, run_key: str) -> None:
    state = {k: v.detach().cpu() for k, v in loop.model.state_dict().items()}
    meta = {"fingerprint": run_key, "step": loop.step, "partial": True}
    ckpt.write_checkpoint(partial_dir, state, meta, loop.state())
