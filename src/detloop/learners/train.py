"""Training: a plain torch loop (ALGORITHMS §1.5).

SGD with momentum, linear warm-up then cosine decay to 0, gradient clipping, AMP on CUDA,
h-flip and scale jitter, per-anchor loss weights, an optional EMA of the weights. On the CPU a
fixed seed gives the same losses bit for bit. Progress is checkpointed into
``<out_dir>.partial/`` (model, optimizer, RNG states, EMA, step) every ``save_freq`` epochs; a
new call with the same run resumes from it. The finished model is written to ``out_dir``
(``model.pt`` + ``metadata.json``): the best weights under early stopping, else the EMA's when
``moving_average_decay`` > 0, else the trained ones.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from effdet.anchors import AnchorLabeler
from torch.utils.data import DataLoader

from detloop.config import ExperimentConfig, TrainConfig
from detloop.console import Bar, Progress, progress_bar
from detloop.data.dataset import Augment, DetectionDataset, StrongAugment, collate
from detloop.data.errors import DataError
from detloop.data.labels import IGNORE_CLASS_ID
from detloop.learners import checkpoint as ckpt
from detloop.learners.csd import CsdSettings, consistency_losses
from detloop.learners.curriculum import (
    CurriculumStreams,
    copy_range,
    curriculum_streams,
    with_copies,
)
from detloop.learners.data_parallel import DataParallel, sync_batchnorm
from detloop.learners.device import memory_format, resolve_device
from detloop.learners.loss import (
    LossSettings,
    Targets,
    box_monitors,
    detection_loss,
    label_batch,
    level_sizes,
    make_anchors,
)
from detloop.learners.mean_teacher import MeanTeacher, OnlineSelection
from detloop.learners.model import (
    ModelSpec,
    UncertainEfficientDet,
    flatten_levels,
    resolve_spec,
    split_box_maps,
)
from detloop.learners.presets import PRESETS
from detloop.learners.streams import Streams
from detloop.learners.train_state import (
    LoopState,
    WeightEma,
    last_loss,
    resume,
    run_fingerprint,
    save_partial,
    saved_weights,
)
from detloop.seeding import derive_seed

log = logging.getLogger(__name__)
MONITORS = ("box_rmse", "sigma_mean", "sigma_std")  # training monitors of ALGORITHMS §1.2


# Training defaults of a preset, used where the config does not set the field explicitly.
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
    for key, value in PRESETS[cfg.model.preset].train.items():
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


def lr_at(
    step: int, total: int, warmup: int, lr: float, warmup_lr: float, plateau: float | None = None
) -> float:
    """Linear warm-up from ``warmup_lr`` over ``warmup`` steps, then cosine decay to 0 — or,
    with ``plateau`` (the factor of the drops so far), ``lr · plateau`` after the warm-up."""
    if step < warmup:
        return warmup_lr + (lr - warmup_lr) * step / warmup
    if plateau is not None:
        return lr * plateau
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _strong_augment(cfg: ExperimentConfig) -> StrongAugment | None:
    """The box-aware RandAugment of pseudo-labeled images (``ssl.stac_randaug``), or None."""
    if not cfg.ssl.stac_randaug:
        return None
    from detloop.learners.box_augment import RandAugment

    return RandAugment(magnitude=cfg.ssl.randaug_magnitude)


def _augment(job: _Job, jitter: tuple[float, float]) -> Augment:
    """The training augmentation: flip and scale jitter; the strong RandAugment on the
    pseudo-labeled part (``ssl.stac_randaug``) and on RCF's copies of rare images (``aug``)."""
    copies = copy_range(job.streams)
    strong = _strong_augment(job.cfg) if job.streams.n_pseudo and job.csd is None else None
    # no strong view of the pseudo part: the rows from which it applies start past the data
    strong_from = job.streams.n_labeled if strong is not None else sys.maxsize
    if copies[1] > copies[0] and strong is None:
        from detloop.learners.box_augment import RandAugment

        strong = RandAugment(magnitude=job.cfg.ssl.randaug_magnitude)
    return Augment(
        job.tcfg.hflip,
        jitter,
        job.seed,
        strong=strong,
        strong_from=strong_from,
        strong_between=copies,
    )


def _with_curriculum(
    cfg: ExperimentConfig,
    streams: Streams,
    images: pa.Table,
    labels: pa.Table,
    num_classes: int,
) -> Streams | CurriculumStreams:
    """RCF's curriculum batches (``ssl.teacher_strategy`` ``curriculum_learning``/``aug``/
    ``curr``, §11.4) for the trainings of an SSL run; ``streams`` itself otherwise."""
    if cfg.loop != "ssl":
        return streams
    weights = (cfg.ssl.rcf_lowest, cfg.ssl.rcf_highest)
    return curriculum_streams(
        cfg.ssl.teacher_strategy, streams, images, labels, num_classes, weights
    )


@dataclass(frozen=True)
class _Job:
    """The fixed inputs of one ``train_model`` call, resolved (what every helper reads)."""

    cfg: ExperimentConfig
    tcfg: TrainConfig  # with the preset's defaults
    seed: int
    device: torch.device
    out_dir: Path
    fingerprint: str
    streams: Streams | CurriculumStreams
    val: tuple[pa.Table, pa.Table] | None = None
    root: Path | None = None
    stop_at_step: int | None = None
    progress: Progress = True
    on_epoch: Callable[[int, UncertainEfficientDet], None] | None = None
    online: OnlineSelection | None = None
    class_names: Sequence[str] | None = None
    dp: DataParallel | None = None
    csd: CsdSettings | None = None  # CSD (§11.9): the second stream is unlabeled

    @property
    def is_main(self) -> bool:
        """This process writes the checkpoints (always, unless a data-parallel rank > 0)."""
        return self.dp is None or self.dp.is_main

    @property
    def partial_dir(self) -> Path:
        return self.out_dir.with_name(self.out_dir.name + ".partial")

    def stops_at(self, step: int) -> bool:
        return self.stop_at_step is not None and step >= self.stop_at_step

    def interrupted(self, step: int, total: int) -> bool:
        """Stopped by ``stop_at_step`` before the end: the partial checkpoint is the result."""
        return self.stops_at(step) and step < total


@dataclass(frozen=True)
class _Schedule:
    """Step counts of a training and its learning rate."""

    batch_size: int
    per_epoch: int
    total: int
    warmup: int

    @classmethod
    def of(cls, tcfg: TrainConfig, streams: Streams | CurriculumStreams) -> _Schedule:
        per_epoch = streams.steps_per_epoch
        total = per_epoch * tcfg.epochs
        total = min(total, tcfg.max_steps) if tcfg.max_steps else total
        warmup = round(tcfg.warmup_epochs * per_epoch)
        return cls(streams.batch_size, per_epoch, total, warmup)

    def lr(self, step: int, tcfg: TrainConfig, drops: int = 0) -> float:
        """The rate at ``step``, ``drops`` the plateau schedule's drops so far."""
        plateau = tcfg.lr_drop_factor**drops if tcfg.lr_schedule == "plateau" else None
        return lr_at(step, self.total, self.warmup, tcfg.lr or 0.0, tcfg.warmup_lr, plateau)


@dataclass(frozen=True)
class _LossBench:
    """Anchors, their labeler and the loss settings: from a batch to the detection loss."""

    labeler: AnchorLabeler
    sizes: list[int]
    settings: LossSettings

    @classmethod
    def of(cls, cfg: ExperimentConfig, spec: ModelSpec) -> _LossBench:
        anchors = make_anchors(spec)
        labeler = AnchorLabeler(anchors, spec.num_classes, match_threshold=0.5)
        return cls(labeler, level_sizes(anchors), LossSettings.from_config(cfg.model, spec))

    def losses(
        self, loop: LoopState, batch: dict[str, torch.Tensor], job: _Job
    ) -> tuple[torch.Tensor, tuple[float, ...]]:
        """The loss to minimise for ``batch`` and the values ``_STEP_VALUES`` names.

        One forward pass; with a pseudo-labeled part (indices ≥ n_l, after the labeled ones)
        the loss is ā_l·L_l + λ·ā_u·L_u (ALGORITHMS §11.1), L_u's box term scaled by
        ``ssl.pseudo_box_weight`` (1: as L_l's; 0: class only): each image's anchors already carry
        its weight a_i (``label_batch``), so ā = 1, or the sub-batch mean of a_i under the
        compat ``ssl.pseudo_weighting: reference`` (weighting twice, as the reference did).
        """
        if job.csd is not None:
            return self._csd_losses(loop, batch, job)
        model = loop.model
        targets, _, (cls_maps, box_maps) = self._forward(loop, batch, job)
        mu, s = split_box_maps(model, box_maps)
        cls = flatten_levels(cls_maps, model.spec.num_classes)
        monitors = box_monitors(mu, s, targets, self.settings)
        n_l = int((batch["index"] < job.streams.n_labeled).sum())
        parted = (slice(0, n_l), slice(n_l, None))
        norms, scale = self._normalisers(targets, parted, job)
        if not job.streams.n_pseudo:
            loss, l_cls, l_box = (
                scale * x
                for x in detection_loss(cls, mu, s, targets, self.sizes, self.settings, norms[0])
            )
            values = (float(loss.detach()), float(l_cls.detach()), float(l_box.detach()))
            return loss, (*values, *monitors, values[0], float("nan"), float("nan"))
        parts = []
        for part, norm in zip(parted, norms, strict=True):
            sub = targets.slice(part)
            s_part = None if s is None else s[part]
            parts.append(
                tuple(
                    scale * x
                    for x in detection_loss(
                        cls[part], mu[part], s_part, sub, self.sizes, self.settings, norm
                    )
                )
            )
        a_l, a_u = self._mean_weights(batch, n_l, job)
        lam = job.cfg.ssl.stac_lambda
        pseudo_box = job.cfg.ssl.pseudo_box_weight
        l_cls = a_l * parts[0][1] + lam * a_u * parts[1][1]
        l_box = a_l * parts[0][2] + lam * a_u * pseudo_box * parts[1][2]
        loss = l_cls + self.settings.w_box * l_box
        n_pseudo = float((batch["classes"][n_l:] > 0).sum()) / max(1, len(batch["index"]) - n_l)
        values = (float(loss.detach()), float(l_cls.detach()), float(l_box.detach()))
        sup, unsup = float(parts[0][0].detach()), float(parts[1][0].detach())
        return loss, (*values, *monitors, sup, unsup, n_pseudo)

    def _forward(
        self, loop: LoopState, batch: dict[str, torch.Tensor], job: _Job
    ) -> tuple[Targets, torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The batch's anchor targets, its images on the device and the model's (class, box)
        maps: one training forward pass, under autocast with AMP."""
        tcfg = job.tcfg
        targets = label_batch(
            self.labeler,
            batch["boxes"],
            batch["classes"],
            batch["weights"],
            mode=tcfg.loss_weighting,
            empty_weight=tcfg.empty_image_weight,
        ).to(job.device)
        with _autocast(loop):
            images = batch["image"].to(job.device, memory_format=loop.memory_format)
            maps = loop.forward(images, generator=loop.generator)
        return targets, images, maps

    def _csd_losses(
        self, loop: LoopState, batch: dict[str, torch.Tensor], job: _Job
    ) -> tuple[torch.Tensor, tuple[float, ...]]:
        """CSD's loss (ALGORITHMS §11.9): the detection loss of the labeled images (the
        batch's first n_l) + w(t)·(L_cls_cons + L_box_cons) of the whole batch against its
        horizontal flip, a second forward pass (``learners.csd``); w(t) is ``csd_ramp`` at
        this step of the schedule, or 1 without the ramp. ``cls_loss`` and ``box_loss`` are
        the supervised parts; ``unsup_loss`` is the consistency before w(t)."""
        assert job.csd is not None
        model = loop.model
        targets, images, maps = self._forward(loop, batch, job)
        mu, s = split_box_maps(model, maps[1])
        cls = flatten_levels(maps[0], model.spec.num_classes)
        monitors = box_monitors(mu, s, targets, self.settings)  # positives: labeled images only
        lab = slice(0, int((batch["index"] < job.streams.n_labeled).sum()))
        s_lab = None if s is None else s[lab]
        sup = detection_loss(
            cls[lab], mu[lab], s_lab, targets.slice(lab), self.sizes, self.settings
        )
        with _autocast(loop):
            mirrored = images.flip(-1).contiguous(memory_format=loop.memory_format)
            flipped = loop.forward(mirrored, generator=loop.generator)
        l_cls, l_box = consistency_losses(maps, flipped, model.num_anchors, job.csd)
        unsup = l_cls + l_box
        w = job.csd.weight(loop.step, _Schedule.of(job.tcfg, job.streams).total)
        loss = sup[0] + w * unsup
        values = (float(loss.detach()), float(sup[1].detach()), float(sup[2].detach()))
        consistency = (float(sup[0].detach()), float(unsup.detach()), float("nan"))
        return loss, (*values, *monitors, *consistency)

    @staticmethod
    def _normalisers(
        targets: Targets, parts: tuple[slice, slice], job: _Job
    ) -> tuple[list[torch.Tensor | None], float]:
        """The loss normaliser of the whole batch and of its (labeled, pseudo) parts, and the
        factor of the loss: this batch's own (None) and 1 on one worker; the global batch's
        and N under data parallelism (module docstring of ``learners.data_parallel``)."""
        if job.dp is None:
            return [None, None] if job.streams.n_pseudo else [None], 1.0
        counts = [targets.slice(p).num_pos.sum().float() for p in parts]
        total = job.dp.all_sum(torch.stack(counts)) + 1.0
        if not job.streams.n_pseudo:
            return [total.sum() - 1.0], float(job.dp.world_size)
        return list(total), float(job.dp.world_size)

    @staticmethod
    def _mean_weights(batch: dict[str, torch.Tensor], n_l: int, job: _Job) -> tuple[float, float]:
        """(ā_l, ā_u): 1 and 1, or under ``pseudo_weighting: reference`` the mean image weight
        a_i of each sub-batch (a_i: mean object weight, ``empty_image_weight`` without any)."""
        if job.cfg.ssl.pseudo_weighting == "once":
            return 1.0, 1.0
        a = image_weights(batch["classes"], batch["weights"], job.tcfg.empty_image_weight)
        mean = [float(x.mean()) if len(x) else 1.0 for x in (a[:n_l], a[n_l:])]
        return mean[0], mean[1]


def _autocast(loop: LoopState) -> AbstractContextManager[Any]:
    """CUDA autocast when AMP is on (the scaler is enabled), else nothing."""
    return torch.autocast("cuda") if loop.scaler.is_enabled() else nullcontext()


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
    pseudo: tuple[pa.Table, pa.Table] | None = None,
    online: OnlineSelection | None = None,
    class_names: Sequence[str] | None = None,
    data_parallel: DataParallel | None = None,
    unlabeled: pa.Table | None = None,
) -> TrainResult:
    """Train a detector on ``images``/``labels`` and write its checkpoint to ``out_dir``.

    Args:
        cfg: experiment config (``model`` and ``train`` sections are used).
        images: images-table rows to train on (``image_id``, ``file``, ``width``, ``height``).
        labels: their label rows (xyxy original pixels, 0-based ``class_id``, ``weight``).
        num_classes: C, from the run's categories.
        out_dir: checkpoint directory to write.
        seed: seed of this training (data order, augmentation, dropout masks).
        val: (images, labels) for early stopping on val (``train.early_stopping_metric``),
            when enabled.
        init_weights: a whole model to start from (a checkpoint or its weights file: a
            previous iteration's model, an SSL teacher); else ``cfg.model.weights``, loaded as
            ``cfg.model.weights_kind`` says (e.g. only a pretrained backbone).
        progress: show a progress bar (steps, with the running loss of the epoch): True in
            this process (nothing when ``DETLOOP_PROGRESS=off``), False for none, or a
            ``detloop.console.Reporter`` that publishes it for another process to draw.
        device: overrides ``cfg.train.device``.
        stop_at_step: stop after this step, keeping the partial checkpoint (interruption).
        root: base directory of relative image paths.
        on_epoch: called after each completed epoch with (epochs done, the model with the
            weights a checkpoint would get), for curves; not counted in ``seconds``.
        pseudo: (images, pseudo-labels) of an SSL student's second stream: batches of L
            labeled + U pseudo-labeled images (``learners.streams``), the latter strongly
            augmented when ``ssl.stac_randaug``; loss ā_l·L_l + λ·ā_u·L_u (ALGORITHMS §11.1).
        online: with ``pseudo`` (the unlabeled images; their labels are not read), an online
            mean teacher (``learners.mean_teacher``) labels each step's pseudo part; the
            checkpoint is the teacher's weights.
        class_names: the data's classes, in class-id order: a model bundle in
            ``cfg.model.weights`` is matched to them by name (``model.class_map``).
        data_parallel: this process's rank of a data-parallel training
            (``learners.data_parallel``; ``torch.distributed`` set up by the caller): the
            global batch is ``train.batch_size``, only rank 0 writes checkpoints.
        unlabeled: images of a CSD training (ALGORITHMS §11.9, options ``ssl.csd_*``): batches
            of B // (ratio + 1) labeled images and the rest unlabeled (``Streams.csd``); loss
            L_det(labeled) + w(t)·(L_cls_cons + L_box_cons) of each image and its flip
            (``learners.csd``). Not with ``pseudo``, ``online`` or ``data_parallel``.

    Raises:
        DataError: missing weights file or unreadable image.
    """
    _check_labels(images, labels, num_classes)
    tcfg = effective_train_config(cfg)
    # long: the one training entry point; most of its lines are the arguments and their docs
    csd = _csd_settings(cfg, unlabeled, pseudo, online, data_parallel)
    if unlabeled is not None:  # CSD: the unlabeled images are the second stream
        pseudo = (unlabeled, labels.slice(0, 0))
    images, labels, n_pseudo = _with_pseudo(images, labels, pseudo, num_classes)
    streams: Streams | CurriculumStreams
    if csd is None:
        per = cfg.ssl.labeled_per_batch
        streams = Streams.of(tcfg.batch_size, images.num_rows - n_pseudo, n_pseudo, per)
    else:
        streams = Streams.csd(tcfg.batch_size, images.num_rows - n_pseudo, n_pseudo, csd.ratio)
    streams = _with_curriculum(cfg, streams, images, labels, num_classes)
    images = with_copies(images, streams)
    if tcfg.eval_steps is not None:  # val about every eval_steps, in whole epochs of the
        # streams (an SSL student's epoch is both streams' traversal)
        every = max(1, round(tcfg.eval_steps / streams.steps_per_epoch))
        tcfg = tcfg.model_copy(update={"map_freq": every})
    job = _Job(
        cfg,
        tcfg,
        seed,
        resolve_device(device or tcfg.device),
        Path(out_dir),
        run_fingerprint(cfg, images, labels, seed, num_classes, _stream_key(n_pseudo, online, csd)),
        streams,
        val=val,
        online=online if pseudo is not None else None,
        root=root,
        stop_at_step=stop_at_step,
        progress=progress,
        on_epoch=on_epoch,
        class_names=class_names,
        dp=data_parallel,
        csd=csd,
    )
    loop = _new_loop(job, num_classes, init_weights)
    if not _run(loop, job, images, labels):  # stopped at stop_at_step: the partial checkpoint
        return TrainResult(job.partial_dir, loop.step, last_loss(loop), loop.seconds, loop.history)
    return _finish(loop, job, num_classes)


def _new_loop(job: _Job, num_classes: int, init_weights: Path | None) -> LoopState:
    """A fresh model (seeded) with its initial weights, optimizer, scaler, generator, EMA."""
    cfg, tcfg, dev = job.cfg, job.tcfg, job.device
    spec = resolve_spec(cfg.model, num_classes)
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed)
        model = UncertainEfficientDet(spec)
    if init_weights is not None:  # a whole model (a previous iteration's, a teacher)
        ckpt.load_weights(model, Path(init_weights), "full")
    elif cfg.model.weights is not None:  # the run's starting point, e.g. a backbone or a bundle
        from detloop.learners.bundle import load_start_weights

        load_start_weights(model, Path(cfg.model.weights), cfg.model.weights_kind,
                           job.class_names, cfg.model.class_map)  # fmt: skip
    fmt = memory_format(cfg.model.channels_last)
    if job.dp is not None and job.dp.sync_bn:
        sync_batchnorm(model)
    model.to(dev).to(memory_format=fmt)
    decay = tcfg.moving_average_decay
    return LoopState(
        model=model,
        optimizer=make_optimizer(model, tcfg),
        scaler=torch.amp.GradScaler("cuda", enabled=tcfg.amp and dev.type == "cuda"),
        generator=torch.Generator(device=dev).manual_seed(_dropout_seed(job, 0)),
        memory_format=fmt,
        ema=WeightEma(model, decay) if decay > 0 else None,
        teacher=MeanTeacher(model, job.online, cfg) if job.online else None,
        parallel=_wrap_ddp(model, dev) if job.dp is not None else None,
    )


def _dropout_seed(job: _Job, step: int) -> int:
    """The seed of the training's dropout generator: the job's seed on one worker (and rank
    0), one derived from it, the rank and the step on the other ranks."""
    if job.dp is None or job.dp.is_main:
        return job.seed
    return derive_seed(job.seed, step, f"train-rank{job.dp.rank}")


def _wrap_ddp(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``model`` in torch's DistributedDataParallel (gradients averaged over the ranks)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.index] if dev.type == "cuda" and dev.index is not None else None
    return DistributedDataParallel(model, device_ids=ids)


def _finish(loop: LoopState, job: _Job, num_classes: int) -> TrainResult:
    """Write the checkpoint — the best early-stopping weights, else the EMA's, else the
    trained ones — with its metadata, and drop the partial checkpoint."""
    if not job.is_main:  # rank 0 writes the checkpoint
        return TrainResult(job.out_dir, loop.step, last_loss(loop), loop.seconds, loop.history)
    if loop.best_state is not None:
        loop.model.load_state_dict(loop.best_state)
    elif loop.teacher is not None:
        loop.model.load_state_dict(loop.teacher.model.state_dict())
    elif loop.ema is not None:
        loop.model.load_state_dict(loop.ema.shadow)
    meta: dict[str, Any] = {
        "model_spec": loop.model.spec.to_json(),
        "model_config": job.cfg.model.model_dump(mode="json"),
        "num_classes": num_classes,
        "steps": loop.step,
        "seed": job.seed,
        "fingerprint": job.fingerprint,
        "final_loss": last_loss(loop),
        "seconds": loop.seconds,
        "history": loop.history,
    }
    if loop.ema is not None:
        meta["moving_average_decay"] = loop.ema.decay
    if isinstance(job.streams, CurriculumStreams):
        meta["curriculum"] = job.streams.summary()
    state = {k: v.detach().cpu() for k, v in loop.model.state_dict().items()}
    ckpt.write_checkpoint(job.out_dir, state, meta)
    shutil.rmtree(job.partial_dir, ignore_errors=True)
    return TrainResult(job.out_dir, loop.step, last_loss(loop), loop.seconds, loop.history)


def _check_labels(
    images: pa.Table,
    labels: pa.Table,
    num_classes: int,
    what: str = "labels",
    regions: bool = False,
) -> None:
    """At least one image; class ids must index the C foreground classes (``regions``: a
    pseudo-labeled stream, which may also hold ignore regions, ``IGNORE_CLASS_ID``)."""
    if images.num_rows == 0:
        raise DataError("images", None, None, f"no images to train on ({what})")
    if labels.num_rows == 0:
        return
    classes = labels.column("class_id").to_numpy()
    ignore = (classes == IGNORE_CLASS_ID) if regions else False
    bad = np.flatnonzero(((classes < 0) | (classes >= num_classes)) & ~ignore)
    if len(bad):
        row = int(bad[0])
        msg = f"class_id {int(classes[row])} outside 0..{num_classes - 1} ({len(bad)} rows)"
        raise DataError(what, row, "class_id", msg)


def _with_pseudo(
    images: pa.Table, labels: pa.Table, pseudo: tuple[pa.Table, pa.Table] | None, num_classes: int
) -> tuple[pa.Table, pa.Table, int]:
    """The training images and labels with the pseudo-labeled stream appended (its images
    after the labeled ones), and the size of that stream."""
    if pseudo is None:
        return images, labels, 0
    _check_labels(pseudo[0], pseudo[1], num_classes, what="pseudo-labels", regions=True)
    images = pa.concat_tables([_image_rows(images), _image_rows(pseudo[0])])
    labels = pa.concat_tables([_label_rows(labels), _label_rows(pseudo[1])])
    return images, labels, pseudo[0].num_rows


def _stream_key(
    n_pseudo: int, online: OnlineSelection | None, csd: CsdSettings | None = None
) -> str:
    """What the fingerprint adds for an SSL student: its pseudo stream and online teacher (a
    CSD training: its unlabeled stream and options)."""
    if not n_pseudo:
        return ""
    if csd is not None:
        return f"u{n_pseudo}/{csd.key}"
    return f"u{n_pseudo}" + (f"/ema{online.decay}/{online.spec.name}" if online else "")


def _csd_settings(
    cfg: ExperimentConfig,
    unlabeled: pa.Table | None,
    pseudo: tuple[pa.Table, pa.Table] | None,
    online: OnlineSelection | None,
    data_parallel: DataParallel | None,
) -> CsdSettings | None:
    """CSD's options when ``unlabeled`` images are given (None otherwise), refusing what a
    CSD training cannot take."""
    if unlabeled is None:
        return None
    if pseudo is not None or online is not None:
        raise ValueError("a CSD training takes unlabeled images, not pseudo-labels or a teacher")
    if data_parallel is not None:  # the config refuses ssl.method: csd with train.workers > 1
        raise ValueError("a CSD training runs on one worker (train.workers: 1)")
    if unlabeled.num_rows == 0:
        raise DataError("images", None, None, "no unlabeled images to train CSD on")
    return CsdSettings.from_config(cfg.ssl)


def _image_rows(images: pa.Table) -> pa.Table:
    """The columns a training dataset reads, so that two images tables concatenate."""
    return images.select(["image_id", "file", "width", "height"])


def _label_rows(labels: pa.Table) -> pa.Table:
    cols = ["image_id", "class_id", *("x1", "y1", "x2", "y2")]
    table = labels.select(cols)
    weight = labels["weight"] if "weight" in labels.column_names else np.ones(labels.num_rows)
    return table.append_column("weight", pa.array(np.asarray(weight, np.float32)))


def image_weights(classes: torch.Tensor, weights: torch.Tensor, empty: float) -> torch.Tensor:
    """a_i per image of a padded batch: the mean weight of its objects (1-based class > 0:
    not padding, -1, nor an ignore region, 0), or ``empty`` for an image without any
    (ALGORITHMS §11.2; never NaN)."""
    valid = (classes > 0).float()
    count = valid.sum(1)
    total = (weights.float() * valid).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, empty))


def _run(loop: LoopState, job: _Job, images: pa.Table, labels: pa.Table) -> bool:
    """Resume from the partial checkpoint, if any, and run epochs until the step budget, early
    stop or ``stop_at_step``; False when stopped by ``stop_at_step`` before the end."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed + 1)
        source = job.dp.resume_from if job.dp and job.dp.resume_from else job.partial_dir
        resume(loop, source, job.fingerprint)
        if loop.step and not job.is_main:  # the checkpoint holds rank 0's generator
            loop.generator.manual_seed(_dropout_seed(job, loop.step))
        _epochs(loop, job, images, labels)
    return not job.interrupted(loop.step, _Schedule.of(job.tcfg, job.streams).total)


def _epochs(loop: LoopState, job: _Job, images: pa.Table, labels: pa.Table) -> None:
    """Run epochs from ``loop.step`` until the step budget, early stop or ``stop_at_step``."""
    tcfg = job.tcfg
    jitter = (tcfg.scale_jitter[0], tcfg.scale_jitter[1])
    data = DetectionDataset(
        images,
        labels,
        loop.model.spec.image_size,
        augment=_augment(job, jitter),
        max_instances=tcfg.max_instances,
        root=job.root,
    )
    schedule = _Schedule.of(tcfg, job.streams)
    bench = _LossBench.of(job.cfg, loop.model.spec)
    loop.model.train()
    bar = progress_bar(
        job.progress, total=schedule.total, initial=loop.step, desc="train", unit="step"
    )
    try:
        while loop.step < schedule.total:
            epoch = loop.step // schedule.per_epoch
            parts = _epoch(loop, job, data, images, schedule, bench, bar)
            lr = schedule.lr(loop.step - 1, tcfg, loop.lr_drops)
            loop.history.append(_record(loop, parts, epoch, lr))
            if loop.teacher is not None:  # the online pseudo-labels' quality (simulated runs)
                loop.history[-1].update(loop.teacher.take_quality())
            if _after_epoch(loop, job, schedule):
                break
    finally:
        bar.close()


def _epoch(
    loop: LoopState,
    job: _Job,
    data: DetectionDataset,
    images: pa.Table,
    schedule: _Schedule,
    bench: _LossBench,
    bar: Bar,
) -> list[tuple[float, ...]]:
    """The steps of the current epoch from ``loop.step`` (a resumed run starts mid-epoch) to
    its end, the step budget or ``stop_at_step``; the values of each step."""
    epoch, offset = divmod(loop.step, schedule.per_epoch)
    data.set_epoch(epoch)
    batches = job.streams.epoch_batches(job.seed, epoch)[offset:]
    if job.dp is not None:  # this rank's share of each global batch
        batches = [job.dp.shard(b, job.streams.n_labeled) for b in batches]
    loader: Iterable[dict[str, torch.Tensor]]
    if loop.teacher is not None:
        loader = _online_batches(loop, job, data, batches, images)
    else:
        loader = DataLoader(
            data, batch_sampler=batches, collate_fn=collate, num_workers=job.tcfg.num_workers
        )
    parts: list[tuple[float, ...]] = []
    for batch in loader:
        t0 = time.perf_counter()
        parts.append(_step(loop, batch, bench, job, schedule))
        loop.seconds += time.perf_counter() - t0
        loop.step += 1
        if job.dp is not None and job.dp.after_step is not None:
            job.dp.after_step(loop.step)
        bar.set_postfix_str(_running_loss(parts), refresh=False)
        bar.update(1)
        if loop.step >= schedule.total or job.stops_at(loop.step):
            break
    return parts


def _online_batches(
    loop: LoopState,
    job: _Job,
    data: DetectionDataset,
    batches: list[list[int]],
    images: pa.Table,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of an online mean teacher's student: the labeled part from ``data``, the
    pseudo part labeled now by the teacher on weak views, then strongly augmented with its
    boxes (a dataset per step, its draws seeded by the step)."""
    assert loop.teacher is not None
    n_l = job.streams.n_labeled
    step = loop.step
    for batch in batches:
        items = [data[i] for i in batch if i < n_l]
        rows = images.take(pa.array([i for i in batch if i >= n_l], pa.int64()))
        labels = loop.teacher.pseudo_labels(rows, seed=job.seed + step, root=job.root)
        view = DetectionDataset(
            rows,
            labels,
            loop.model.spec.image_size,
            augment=replace(data.augment, strong_from=0) if data.augment else None,
            max_instances=job.tcfg.max_instances,
            root=job.root,
        )
        view.set_epoch(step)
        for j in range(rows.num_rows):
            item = view[j]
            item["index"] = n_l + j  # the pseudo part of the batch
            items.append(item)
        loop.model.train()
        yield collate(items)
        step += 1


def _after_epoch(loop: LoopState, job: _Job, schedule: _Schedule) -> bool:
    """End-of-epoch work: the ``on_epoch`` callback, early stopping, partial checkpoints.
    True when training stops here."""
    done = loop.step // schedule.per_epoch if loop.step % schedule.per_epoch == 0 else None
    if done and job.on_epoch is not None:
        with saved_weights(loop) as model:
            job.on_epoch(done, model)
        loop.model.train()
    if done and _stops_early(loop, job, done):
        return True
    if job.interrupted(loop.step, schedule.total):
        _save_partial(loop, job)
        return True
    if done and done % job.tcfg.save_freq == 0 and loop.step < schedule.total:
        _save_partial(loop, job)
    return False


def _stops_early(loop: LoopState, job: _Job, epochs_done: int) -> bool:
    """``_early_stop``, decided by rank 0 under data parallelism (it alone evaluates; the
    plateau schedule's drops follow its decision on every rank)."""
    if job.dp is None:
        return _early_stop(loop, job, epochs_done)
    stop = _early_stop(loop, job, epochs_done) if job.dp.is_main else False
    stop, loop.lr_drops = job.dp.from_main((stop, loop.lr_drops))
    return stop


def _save_partial(loop: LoopState, job: _Job) -> None:
    """The partial checkpoint (rank 0 writes it; every rank reports it to Ray Train)."""
    if job.is_main:
        save_partial(loop, job.partial_dir, job.fingerprint)
    if job.dp is not None and job.dp.report is not None:
        job.dp.report(loop.step, job.partial_dir if job.is_main else None)


#: per step: the loss, its class and box parts, the §1.2 monitors and, for an SSL student, the
#: supervised and unsupervised losses and the pseudo-labels per pseudo-labeled image
_STEP_VALUES = (
    "loss",
    "cls_loss",
    "box_loss",
    *MONITORS,
    "sup_loss",
    "unsup_loss",
    "pseudo_per_image",
)


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
    bench: _LossBench,
    job: _Job,
    schedule: _Schedule,
) -> tuple[float, ...]:
    """One optimisation step (and EMA update); returns the values named by ``_STEP_VALUES``."""
    for group in loop.optimizer.param_groups:
        group["lr"] = schedule.lr(loop.step, job.tcfg, loop.lr_drops)
    loss, values = bench.losses(loop, batch, job)
    loop.optimizer.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if job.dp is not None:  # every rank skips, or none: DDP's all-reduce needs them all
        finite = job.dp.all_true(finite)
        values = job.dp.mean_values(values)
    if not finite:
        log.warning("non-finite loss at step %d; update skipped", loop.step)
        return (float("nan"),) * len(_STEP_VALUES)
    scaled: torch.Tensor = loop.scaler.scale(loss)
    scaled.backward()  # type: ignore[no-untyped-call]
    loop.scaler.unscale_(loop.optimizer)
    torch.nn.utils.clip_grad_norm_(loop.model.parameters(), job.tcfg.grad_clip)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    if loop.ema is not None:
        loop.ema.update(loop.model)
    if loop.teacher is not None:
        loop.teacher.update(loop.model)
    return values


def _early_stop(loop: LoopState, job: _Job, epochs_done: int) -> bool:
    """Evaluate val mAP and mAP50 (of the weights a checkpoint would get) every ``map_freq``
    epochs; keep the best weights by ``early_stopping_metric``; after ``patience``
    evaluations in a row that did not improve it, the plateau schedule lowers the rate while
    it has drops left (and counts anew); else True: stop."""
    tcfg = job.tcfg
    if not tcfg.early_stopping or job.val is None or epochs_done % tcfg.map_freq:
        return False
    from detloop.learners.evaluate_run import evaluate_model  # heavy, only when used

    images, labels = job.val
    with saved_weights(loop) as model:
        score = evaluate_model(model, job.cfg, images, labels, seed=job.seed, root=job.root)
        value = float(score[tcfg.early_stopping_metric])
        better = value > loop.best_map
        if better:
            loop.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    loop.model.train()
    loop.history[-1].update({"val_map": float(score["map"]), "val_map50": float(score["map50"])})
    if better:
        loop.best_map, loop.bad_evals = value, 0
        return False
    loop.bad_evals += 1
    if loop.bad_evals < tcfg.patience:
        return False
    if tcfg.lr_schedule == "plateau" and loop.lr_drops < tcfg.lr_drops:
        loop.lr_drops, loop.bad_evals = loop.lr_drops + 1, 0
        metric, factor = tcfg.early_stopping_metric, tcfg.lr_drop_factor**loop.lr_drops
        log.info("val %s flat for %d evaluations: lr x %g", metric, tcfg.patience, factor)
        return False
    return True
