"""Training: a plain torch loop (ALGORITHMS §1.5).

SGD with momentum, linear warm-up then cosine decay to 0, gradient clipping, AMP on CUDA,
h-flip and scale jitter, per-anchor loss weights. On the CPU a fixed seed gives the same
losses bit for bit. Progress is checkpointed into ``<out_dir>.partial/`` (model, optimizer,
RNG states, step) every ``save_freq`` epochs; a new call with the same run resumes from it.
The finished model is written to ``out_dir`` (``model.pt`` + ``metadata.json``).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from effdet.anchors import AnchorLabeler
from torch.utils.data import DataLoader

from detloop.config import ExperimentConfig, TrainConfig
from detloop.console import Progress, progress_bar
from detloop.data.dataset import Augment, DetectionDataset, collate
from detloop.data.errors import DataError
from detloop.learners import checkpoint as ckpt
from detloop.learners.device import memory_format, resolve_device
from detloop.learners.loss import (
    LossSettings,
    box_monitors,
    detection_loss,
    label_batch,
    level_sizes,
    make_anchors,
)
from detloop.learners.model import (
    UncertainEfficientDet,
    flatten_levels,
    resolve_spec,
    split_box_maps,
)
from detloop.learners.train_state import LoopState, last_loss, resume, run_fingerprint, save_partial

log = logging.getLogger(__name__)
MONITORS = ("box_rmse", "sigma_mean", "sigma_std")  # training monitors of ALGORITHMS §1.2

# Training defaults of a preset, used where the config does not set the field explicitly.
PRESET_TRAIN: dict[str, dict[str, Any]] = {
    # CPU demo on digits-det, from random init: AdamW converges far faster than the reference's
    # SGD; no flips (a mirrored digit is another glyph); mild scale jitter for 16–48 px objects.
    "tiny": {
        "optimizer": "adamw",
        "lr": 0.003,
        "warmup_lr": 0.0003,
        "hflip": False,
        "scale_jitter": (0.8, 1.25),
        "batch_size": 8,
    },
}


@dataclass
class TrainResult:
    """What a training call produced."""

    checkpoint: Path
    steps: int
    final_loss: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def monitors(self) -> dict[str, float]:
        """The last epoch's §1.2 monitors (box RMSE, σ mean and std; absent when undefined)."""
        last = self.history[-1] if self.history else {}
        return {k: last[k] for k in MONITORS if k in last}


def effective_train_config(cfg: ExperimentConfig) -> TrainConfig:
    """``cfg.train`` with the preset's defaults filled in where the user set nothing."""
    tcfg = cfg.train.model_copy()
    for key, value in PRESET_TRAIN.get(cfg.model.preset, {}).items():
        if key not in cfg.train.model_fields_set:
            setattr(tcfg, key, value)
    if tcfg.lr is None:
        tcfg.lr = 0.08 * tcfg.batch_size / 64
    return tcfg


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the reference) or AdamW; the schedule sets the lr of every step."""
    params = model.parameters()
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tcfg.warmup_lr, weight_decay=tcfg.weight_decay)
    return torch.optim.SGD(
        params, lr=tcfg.warmup_lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay
    )


def lr_at(step: int, total: int, warmup: int, lr: float, warmup_lr: float) -> float:
    """Linear warm-up from ``warmup_lr`` over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return [int(i) for i in np.random.default_rng([seed, epoch, 7]).permutation(n)]


def train_model(
    cfg: ExperimentConfig,
    images: pa.Table,
    labels: pa.Table,
    num_classes: int,
    out_dir: Path,
    *,
    seed: int,
    val: tuple[pa.Table, pa.Table] | None = None,
    init_weights: Path | None = None,
    progress: Progress = True,
    device: str | None = None,
    stop_at_step: int | None = None,
    root: Path | None = None,
    on_epoch: Callable[[int, UncertainEfficientDet], None] | None = None,
) -> TrainResult:
    """Train a detector on ``images``/``labels`` and write its checkpoint to ``out_dir``.

    Args:
        cfg: experiment config (``model`` and ``train`` sections are used).
        images: rows of the images table to train on (``image_id``, ``file``, ``width``,
            ``height``).
        labels: their label rows (xyxy original pixels, 0-based ``class_id``, ``weight``).
        num_classes: C, from the run's categories.
        out_dir: checkpoint directory to write.
        seed: seed of this training (data order, augmentation, dropout masks).
        val: (images, labels) for early stopping on val mAP50, when enabled.
        init_weights: local weights file or checkpoint (else ``cfg.model.weights``).
        progress: show a progress bar (steps, with the running loss of the epoch): True in
            this process (nothing when ``DETLOOP_PROGRESS=off``), False for none, or a
            ``detloop.console.Reporter`` that publishes it for another process to draw.
        device: overrides ``cfg.train.device``.
        stop_at_step: stop after this step, keeping the partial checkpoint (interruption).
        root: base directory of relative image paths.
        on_epoch: called after every completed epoch with (epochs done, model) — for curves;
            its time is not counted in ``seconds``.

    Raises:
        DataError: missing weights file or unreadable image.
    """
    out_dir = Path(out_dir)
    _check_labels(images, labels, num_classes)
    partial_dir = out_dir.with_name(out_dir.name + ".partial")
    tcfg = effective_train_config(cfg)
    spec = resolve_spec(cfg.model, num_classes)
    dev = resolve_device(device or tcfg.device)
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)
    fingerprint = run_fingerprint(cfg, images, labels, seed, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UncertainEfficientDet(spec)
    weights = init_weights or cfg.model.weights
    if weights is not None:
        ckpt.load_weights(model, Path(weights), cfg.model.weights_kind)
    fmt = memory_format(cfg.model.channels_last)
    model.to(dev).to(memory_format=fmt)
    loop = LoopState(
        model=model,
        optimizer=make_optimizer(model, tcfg),
        scaler=torch.amp.GradScaler("cuda", enabled=tcfg.amp and dev.type == "cuda"),
        generator=torch.Generator(device=dev).manual_seed(seed),
        memory_format=fmt,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        resume(loop, partial_dir, fingerprint)
        _run(
            loop,
            cfg,
            tcfg,
            images,
            labels,
            seed,
            dev,
            partial_dir,
            fingerprint,
            val,
            progress,
            stop_at_step,
            root,
            on_epoch,
        )
    if (
        stop_at_step is not None
        and loop.step >= stop_at_step
        and loop.step < _total_steps(tcfg, images.num_rows)
    ):
        return TrainResult(partial_dir, loop.step, last_loss(loop), loop.seconds, loop.history)
    if loop.best_state is not None:
        model.load_state_dict(loop.best_state)
    meta = {
        "model_spec": spec.to_json(),
        "model_config": cfg.model.model_dump(mode="json"),
        "num_classes": num_classes,
        "steps": loop.step,
        "seed": seed,
        "fingerprint": fingerprint,
        "final_loss": last_loss(loop),
        "seconds": loop.seconds,
        "history": loop.history,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt.write_checkpoint(out_dir, state, meta)
    shutil.rmtree(partial_dir, ignore_errors=True)
    return TrainResult(out_dir, loop.step, last_loss(loop), loop.seconds, loop.history)


def _check_labels(images: pa.Table, labels: pa.Table, num_classes: int) -> None:
    """At least one image; class ids must index the C foreground classes."""
    if images.num_rows == 0:
        raise DataError("images", None, None, "no images to train on")
    if labels.num_rows == 0:
        return
    classes = labels.column("class_id").to_numpy()
    bad = np.flatnonzero((classes < 0) | (classes >= num_classes))
    if len(bad):
        row = int(bad[0])
        msg = f"class_id {int(classes[row])} outside 0..{num_classes - 1} ({len(bad)} rows)"
        raise DataError("labels", row, "class_id", msg)


def _total_steps(tcfg: TrainConfig, n_images: int) -> int:
    per_epoch = max(1, math.ceil(n_images / tcfg.batch_size))
    total = per_epoch * tcfg.epochs
    return min(total, tcfg.max_steps) if tcfg.max_steps else total


def _run(
    loop: LoopState,
    cfg: ExperimentConfig,
    tcfg: TrainConfig,
    images: pa.Table,
    labels: pa.Table,
    seed: int,
    dev: torch.device,
    partial_dir: Path,
    fingerprint: str,
    val: tuple[pa.Table, pa.Table] | None,
    progress: Progress,
    stop_at_step: int | None,
    root: Path | None,
    on_epoch: Callable[[int, UncertainEfficientDet], None] | None = None,
) -> None:
    """Run epochs from ``loop.step`` until the step budget, early stop or ``stop_at_step``."""
    spec = loop.model.spec
    anchors = make_anchors(spec)
    labeler = AnchorLabeler(anchors, spec.num_classes, match_threshold=0.5)
    sizes = level_sizes(anchors)
    settings = LossSettings.from_config(cfg.model, spec)
    augment = Augment(tcfg.hflip, (tcfg.scale_jitter[0], tcfg.scale_jitter[1]), seed)
    data = DetectionDataset(
        images,
        labels,
        spec.image_size,
        augment=augment,
        max_instances=tcfg.max_instances,
        root=root,
    )
    bs = tcfg.batch_size
    per_epoch = max(1, math.ceil(len(data) / bs))
    total = _total_steps(tcfg, len(data))
    warmup = round(tcfg.warmup_epochs * per_epoch)
    loop.model.train()
    bar = progress_bar(progress, total=total, initial=loop.step, desc="train", unit="step")
    try:
        while loop.step < total:
            epoch, offset = divmod(loop.step, per_epoch)
            data.set_epoch(epoch)
            order = _epoch_order(len(data), seed, epoch)[offset * bs :]
            loader = DataLoader(
                data, batch_size=bs, sampler=order, collate_fn=collate, num_workers=tcfg.num_workers
            )
            parts: list[tuple[float, ...]] = []
            for batch in loader:
                t0 = time.perf_counter()
                parts.append(_step(loop, batch, labeler, sizes, settings, tcfg, total, warmup, dev))
                loop.seconds += time.perf_counter() - t0
                loop.step += 1
                bar.set_postfix_str(_running_loss(parts), refresh=False)
                bar.update(1)
                if loop.step >= total or (stop_at_step is not None and loop.step >= stop_at_step):
                    break
            loop.history.append(
                _record(
                    loop,
                    parts,
                    epoch,
                    lr_at(loop.step - 1, total, warmup, tcfg.lr or 0, tcfg.warmup_lr),
                )
            )
            done_epochs = loop.step // per_epoch if loop.step % per_epoch == 0 else None
            if done_epochs and on_epoch is not None:
                on_epoch(done_epochs, loop.model)
                loop.model.train()
            if done_epochs and _early_stop(loop, cfg, tcfg, val, done_epochs, seed, root):
                break
            if stop_at_step is not None and loop.step >= stop_at_step and loop.step < total:
                save_partial(loop, partial_dir, fingerprint)
                break
            if done_epochs and done_epochs % tcfg.save_freq == 0 and loop.step < total:
                save_partial(loop, partial_dir, fingerprint)
    finally:
        bar.close()


_STEP_VALUES = ("loss", "cls_loss", "box_loss", *MONITORS)


def _running_loss(parts: list[tuple[float, ...]], window: int = 50) -> str:
    """The progress bar's postfix: the mean loss of this epoch's last ``window`` steps."""
    losses = [p[0] for p in parts[-window:] if math.isfinite(p[0])]
    return f"loss {sum(losses) / len(losses):.4f}" if losses else ""


def _record(
    loop: LoopState, parts: list[tuple[float, ...]], epoch: int, lr: float
) -> dict[str, float]:
    """One epoch of the training history: step means of the losses and monitors (§1.2)."""
    arr = np.array(parts, dtype=np.float64).reshape(-1, len(_STEP_VALUES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN monitors: no LA head
        mean = np.nanmean(arr, 0) if len(arr) else np.full(len(_STEP_VALUES), np.nan)
    record = {"step": float(loop.step), "epoch": float(epoch)}
    record.update({k: float(v) for k, v in zip(_STEP_VALUES, mean, strict=True) if v == v})
    record.update({"lr": float(lr), "seconds": float(loop.seconds)})
    return record


def _step(
    loop: LoopState,
    batch: dict[str, torch.Tensor],
    labeler: AnchorLabeler,
    sizes: list[int],
    settings: LossSettings,
    tcfg: TrainConfig,
    total: int,
    warmup: int,
    dev: torch.device,
) -> tuple[float, ...]:
    """One optimisation step; returns the values named by ``_STEP_VALUES``."""
    model = loop.model
    lr = lr_at(loop.step, total, warmup, tcfg.lr or 0.0, tcfg.warmup_lr)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    targets = label_batch(
        labeler,
        batch["boxes"],
        batch["classes"],
        batch["weights"],
        mode=tcfg.loss_weighting,
        empty_weight=tcfg.empty_image_weight,
    ).to(dev)
    autocast = torch.autocast("cuda") if loop.scaler.is_enabled() else nullcontext()
    with autocast:
        images = batch["image"].to(dev, memory_format=loop.memory_format)
        cls_maps, box_maps = model(images, generator=loop.generator)
    mu, s = split_box_maps(model, box_maps)
    cls = flatten_levels(cls_maps, model.spec.num_classes)
    loss, l_cls, l_box = detection_loss(cls, mu, s, targets, sizes, settings)
    monitors = box_monitors(mu, s, targets, settings)
    loop.optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        log.warning("non-finite loss at step %d; update skipped", loop.step)
        return (float("nan"),) * len(_STEP_VALUES)
    scaled: torch.Tensor = loop.scaler.scale(loss)
    scaled.backward()  # type: ignore[no-untyped-call]
    loop.scaler.unscale_(loop.optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    return (float(loss.detach()), float(l_cls.detach()), float(l_box.detach()), *monitors)


def _early_stop(
    loop: LoopState,
    cfg: ExperimentConfig,
    tcfg: TrainConfig,
    val: tuple[pa.Table, pa.Table] | None,
    epochs_done: int,
    seed: int,
    root: Path | None,
) -> bool:
    """Evaluate val mAP50 every ``map_freq`` epochs; True when patience is exhausted."""
    if not tcfg.early_stopping or val is None or epochs_done % tcfg.map_freq:
        return False
    from detloop.learners.evaluate_run import evaluate_model  # heavy, only when used

    score = evaluate_model(loop.model, cfg, val[0], val[1], seed=seed, root=root)["map50"]
    loop.model.train()
    loop.history[-1]["val_map50"] = float(score)
    if score > loop.best_map:
        loop.best_map, loop.bad_evals = float(score), 0
        loop.best_state = {k: v.detach().cpu().clone() for k, v in loop.model.state_dict().items()}
        return False
    loop.bad_evals += 1
    return loop.bad_evals >= tcfg.patience
