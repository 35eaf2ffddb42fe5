"""Typed experiment configuration: pydantic models at the boundary, YAML in, one error listing
every problem out.

Section layout follows ARCHITECTURE §8; leaf keys keep the reference's names (ALGORITHMS §12).
Relative paths resolve against the directory of the config file. ``--set a.b=c`` overrides are
applied to the raw mapping before validation, so they are checked like the file itself.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from detloop.selectors.pseudo import (
    ConsistencyFilter,
    PseudoSpec,
    TeacherSpec,
    parse_pseudo_strategy,
)
from detloop.selectors.pseudo import parse_teacher_strategy as _parse_teacher
from detloop.selectors.strategy import StrategySpec, format_strategy, parse_strategy

ModelPreset = Literal["tiny", "d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"]
UncertaintySetup = Literal["baseline", "lossatt", "mcdropout", "mcdropout_lossatt"]


class ConfigError(Exception):
    """An invalid configuration; ``problems`` holds ``(dotted path, message)`` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} configuration problem(s):"]
        lines += [f"  - {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class SourceConfig(Section):
    """One split's source: a COCO JSON, a KITTI label folder or a plain image folder."""

    format: Literal["coco", "kitti", "folder"] = "coco"
    source: Path
    images: Path | None = None


class DataConfig(Section):
    pool: SourceConfig | None = None
    val: SourceConfig | None = None
    test: SourceConfig | None = None
    classes: list[str] | None = None
    lenient: bool = False


class ModelConfig(Section):
    """Detector and uncertainty heads. ``None`` means: take the preset's value."""

    preset: ModelPreset = "tiny"
    image_size: str | int | None = None  # "WxH" or one side
    uncertainty: UncertaintySetup = "mcdropout_lossatt"
    weights: Path | None = None
    # full: a detloop model of this spec; backbone: a detector's backbone or a timm classifier;
    # detector: every tensor of an effdet checkpoint that fits (COCO-pretrained, say)
    weights_kind: Literal["full", "backbone", "detector"] = "full"
    # a model bundle's classes for this dataset's: {run class name: model class name}, for the
    # names that differ (detloop export-model; learners/bundle.py)
    class_map: dict[str, str] = Field(default_factory=dict)
    backbone: str | None = None
    fpn_channels: int | None = None
    fpn_cell_repeats: int | None = None
    box_class_repeats: int | None = None
    min_level: int | None = None
    max_level: int | None = None
    anchor_scale: float | None = None
    # loss attenuation (ALGORITHMS §1.2)
    sigma_param: Literal["logvar", "softplus"] = "logvar"
    la_loss: Literal["reference", "nll"] = "reference"
    clip_min_uncert: float = Field(0.01, gt=0)
    clip_max_uncert: float = Field(1024.0, gt=0)
    boxloss_type: Literal["huber", "MSE"] | None = None  # None: MSE with LA, else huber
    huber_delta: float = 0.1
    w_box: float | None = None  # None: 100 with LA, else 50
    focal_alpha: float = 0.25
    focal_gamma: float = 1.5
    # MC dropout (ALGORITHMS §1.3)
    mc_mode: Literal["head", "full"] = "head"
    mc_classheadrate: float = Field(0.05, ge=0, lt=1)
    mc_boxheadrate: float = Field(0.05, ge=0, lt=1)
    mc_dropoutrate: float = Field(0.05, ge=0, lt=1)
    mc_dropoutsamp: int = Field(10, ge=1)
    # NHWC tensors: oneDNN's depthwise and pointwise convs run ~2x faster on CPUs
    channels_last: bool = True


class TrainConfig(Section):
    epochs: int = Field(200, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float | None = None  # None: 0.08 * batch / 64
    warmup_lr: float = 0.008
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 4e-5
    grad_clip: float = 10.0
    amp: bool = True
    hflip: bool = True
    scale_jitter: tuple[float, float] = (0.1, 2.0)
    max_instances: int = 100
    # EMA of the weights, saved as the checkpoint; 0 = off (ALGORITHMS §1.5). The decay of
    # update n is min(decay, (1 + n) / (10 + n)), as TF's ExponentialMovingAverage(num_updates).
    moving_average_decay: float = Field(0.0, ge=0, lt=1)
    early_stopping: bool = False
    patience: int = 5
    # what early stopping watches on val: COCO's mAP@[.5:.95] (the figure every report gives)
    # or mAP50 — which saturates while localisation still improves (measured: a teacher's
    # val mAP50 flat for its last 2,500 steps while 3,000 more steps added +9 % test mAP)
    early_stopping_metric: Literal["map", "map50"] = "map"
    map_freq: int = Field(20, ge=1)
    # evaluate val every this many steps instead (rounded to whole epochs): the same interval
    # for a run on 100 images and one on 2,000, whose epochs are 20x apart
    eval_steps: int | None = Field(None, ge=1)
    # the learning rate after warm-up: `cosine` decays to 0 over the run's steps; `plateau`
    # holds it and, when `patience` val evaluations in a row do not improve the early-stopping
    # metric, multiplies it by `lr_drop_factor` (at most `lr_drops` times) before early stopping
    # ends the run: a run that stops has converged at a low rate, whatever its step cap (a
    # cosine run stopped early ends mid-schedule, where more steps at a falling rate still pay)
    lr_schedule: Literal["cosine", "plateau"] = "cosine"
    lr_drops: int = Field(2, ge=0)
    lr_drop_factor: float = Field(0.1, gt=0, lt=1)
    save_freq: int = 20
    num_workers: int = 0
    device: str = "auto"
    torch_threads: int | None = None
    loss_weighting: Literal["image", "box"] = "image"  # per-image mean weight (§11.2) or per box
    optimizer: Literal["sgd", "adamw"] = "sgd"  # the tiny preset defaults to adamw (CPU demo)
    empty_image_weight: float = 1.0
    # data-parallel training through Ray Train's TorchTrainer when > 1: the global batch is
    # batch_size (split over the workers), so lr and the schedule stay those of one worker;
    # each worker holds ray.train_num_cpus / ray.train_num_gpus
    workers: int = Field(1, ge=1)
    sync_bn: bool = True  # BatchNorm statistics over the global batch when workers > 1
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the last checkpoint

    @model_validator(mode="after")
    def _plateau_needs_early_stopping(self) -> TrainConfig:
        if self.lr_schedule == "plateau" and not self.early_stopping:
            raise ValueError(
                "lr_schedule 'plateau' lowers the rate when val stops improving: it needs "
                "early_stopping: true (val evaluations every map_freq epochs)"
            )
        return self

    @model_validator(mode="after")
    def _batch_covers_the_workers(self) -> TrainConfig:
        if self.batch_size < self.workers:
            raise ValueError(
                f"batch_size {self.batch_size} < workers {self.workers}: the global batch is "
                "split over the workers, each needs at least one image"
            )
        return self


class PredictConfig(Section):
    uncert_adjust_method: Literal["l-norm", "n-flow", "sample", "falsedec"] = "l-norm"
    decode_nsamples: int = Field(100, ge=2)
    nms_method: Literal["hard", "gaussian"] = "hard"
    nms_iou: float = 0.5
    sigma_nms: float = 0.5
    score_thresh: float = 0.001
    max_output_size: int = 100
    # boxes narrower or lower than this (original pixels, after clipping to the image) are
    # dropped before NMS (§3 step 5, torchvision's remove_small_boxes)
    min_box_size: float = Field(1.0, ge=0)
    # pre-NMS top-k: only the k highest-scoring anchors are decoded and enter NMS; 0 = all (§3)
    max_nms_inputs: int = Field(0, ge=0)
    min_score: float | None = None
    batch_size: int = Field(8, ge=1)
    mc_head_batch: int = Field(16, ge=1)  # head-mode MC: image-samples per head call
    infer_draw_uncert: bool = True
    # test-time corruptions scored by `detloop validate` (§6.3): heq, alb, aug (10-level
    # sweeps), flip; empty = off
    infer_augment: list[Literal["heq", "alb", "aug", "flip"]] = Field(default_factory=list)
    # consistency signals (§11.6): every image predicted again h-flipped, blurred and noised
    # (3 more passes) for the cons_iou / cons_cls columns; `rank`: compat class agreement
    consistency_ssl: bool = False
    cons_cls_mode: Literal["all", "rank"] = "all"


class CalibrationConfig(Section):
    calibrate_classification: bool = True
    calibrate_regression: bool = True
    calib_method_class: str = "iso_percls"
    calib_method_box: str = "iso_perclscoo"
    calib_split: float = Field(0.8, gt=0, lt=1)
    calib_split_mode: Literal["random", "ordered"] = "random"
    box_ts_objective: Literal["rmse", "mae", "nll"] = "rmse"
    unc_samples: int = 10
    ece_bins: int = 10
    min_pairs: int = 10
    always: bool = False


class ThresholdingConfig(Section):
    thr_fpr_tpr: float = Field(0.95, gt=0, le=1)
    thr_cd: bool = True
    thr_sel_uncert: str | list[str] = "ENTALBOX"
    thr_iou_thrs: list[float] = Field(default_factory=lambda: [0.5, 0.55, 0.6, 0.65, 0.7, 0.75])
    fd_scope: Literal["matched", "all"] = "matched"
    optimizer: Literal["optuna"] = "optuna"  # Optuna TPE (§7.4); HEBO is not a dependency
    n_trials: int = 1500
    patience: int = 300
    thr_pick: Literal["last", "closest"] = "last"
    thr_interp: Literal["step", "linear"] = "step"
    per_cls: bool = False
    # detloop extension: what the budget b counts. `detection` (§7, reference) or `image`: each
    # image with the largest u of its detections above min_score, correct only when all of them
    # are, i.e. the unit the auto-labeling rule (§8) decides on.
    thr_unit: Literal["detection", "image"] = "detection"
    thr_seed: int | None = None
    assign_gt_box: Literal["IoU", "MSE", "index"] = "IoU"

    @model_validator(mode="after")
    def _per_class_needs_detections(self) -> ThresholdingConfig:
        if self.per_cls and self.thr_unit == "image":
            raise ValueError("per_cls weights need thr_unit: detection (an image has many classes)")
        return self


def _parse_strategy(value: Any) -> StrategySpec:
    return parse_strategy(value)


#: ``al.strategy``: a name or a mapping of StrategySpec fields in YAML, a ``StrategySpec`` after
#: validation (parsed once, here), written back as its canonical name.
Strategy = Annotated[
    StrategySpec,
    BeforeValidator(_parse_strategy),
    PlainSerializer(format_strategy, return_type=str),
]


class ALConfig(Section):
    strategy: Strategy = Field(default_factory=lambda: parse_strategy("entropy"))
    al_budgets: list[float] = Field(default_factory=lambda: [5.0, 5.0, 5.0, 10.0, 20.0, 30.0, 25.0])
    iterations: int | None = Field(None, ge=1)  # stop after this many iterations (None: all)
    oracle: Literal["simulated", "human"] = "simulated"
    prune_thr: float = Field(0.0, ge=0, le=1)
    hash_method: Literal["p", "w"] = "p"  # pool image hash for pruning: DCT (p) or wavelet (w)
    warm_start: bool = False
    min_score: float | None = None
    # train each iteration's model as an SSL student on the labeled set plus pseudo-labels
    # chosen from the still-unlabeled pool by `ssl.selection_strategy` (M(i-1) the teacher)
    ssl: bool = False

    @field_validator("al_budgets")
    @classmethod
    def _budgets_positive(cls, v: list[float]) -> list[float]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("al_budgets must be a non-empty list of positive percentages")
        if sum(v) > 100 + 1e-9:
            raise ValueError(f"al_budgets sum to {sum(v)} %, more than the whole pool")
        return v


def _parse_selection(value: Any) -> PseudoSpec:
    return value if isinstance(value, PseudoSpec) else parse_pseudo_strategy(value)


def _parse_teacher_strategy(value: Any) -> TeacherSpec:
    return value if isinstance(value, TeacherSpec) else _parse_teacher(value)


#: ``ssl.selection_strategy``: parsed once, here, into a ``PseudoSpec``; written back by name.
Selection = Annotated[
    PseudoSpec,
    BeforeValidator(_parse_selection),
    PlainSerializer(lambda spec: spec.name, return_type=str),
]
#: ``ssl.teacher_strategy``: the teacher's training options (§11.3, §11.4), a ``TeacherSpec``.
TeacherStrategy = Annotated[
    TeacherSpec,
    BeforeValidator(_parse_teacher_strategy),
    PlainSerializer(lambda spec: spec.name, return_type=str),
]


class SSLConfig(Section):
    """Semi-supervised learning (ALGORITHMS §11): read by ``SemiSupervisedLoop`` (``loop: ssl``)
    and, with ``al.ssl``, by the active-learning loop's training."""

    # % of the pool labeled; 100 (the whole pool) only with `teacher_only`: a supervised
    # teacher, e.g. one fold's of an out-of-fold GLC
    portion_labeled: float = Field(10, gt=0, le=100)
    ssl_split: Literal["random", "first_n"] = "random"
    tau: float = Field(0.4, ge=0, le=1)  # δ_S
    # a precision target for the pseudo-labels instead of a fixed τ: each round fits the
    # selection rule's threshold on the labeling model's validation predictions (the lowest τ
    # whose kept detections reach this precision at IoU 0.5) and selects with it, so every
    # selection strategy is compared at the same pseudo-label precision; None: τ as set
    target_precision: float | None = Field(None, gt=0, le=1)
    # `pcorrect`'s notion of right: a validation detection matched to a gt box of its class at
    # IoU >= this (0.5: right as mAP50 and pseudo-label precision count it; higher asks for
    # well-localised boxes, what mAP@[.5:.95] rewards); `coco`: the fraction of the IoU
    # thresholds 0.5, 0.55, ..., 0.95 at which it matches (a soft target, mAP@[.5:.95]'s own)
    pcorrect_iou: Annotated[float, Field(gt=0, lt=1)] | Literal["coco"] = 0.5
    stac_lambda: float = Field(1.0, ge=0)  # λ, weight of the pseudo-labeled part of the loss
    selection_strategy: Selection = Field(default_factory=lambda: parse_pseudo_strategy("score"))
    teacher_strategy: TeacherStrategy = Field(default_factory=lambda: _parse_teacher(""))
    # `stac`: offline teacher -> pseudo-labels -> student (§11.1); `ema`: an online mean teacher
    # (burn-in = the teacher, then the EMA of the student labels each step's unlabeled images)
    teacher: Literal["stac", "ema"] = "stac"
    ema_decay: float = Field(0.999, gt=0, lt=1)
    # weight of the pseudo-labeled part's box regression inside its loss, relative to the
    # labeled part's (1: §11.1, the reference); 0 = the pseudo-labels teach classes only, as
    # Unbiased Teacher: a pseudo-box is a detection, not a drawn box, and its localisation
    # error becomes the student's regression target
    pseudo_box_weight: float = Field(1.0, ge=0)
    stac_randaug: bool = True  # strong, box-aware RandAugment of pseudo-labeled images
    randaug_magnitude: float = Field(15.0, ge=0)
    teacher_min_score: float = Field(0.1, ge=0, le=1)  # teacher predictions kept (§11.1)
    max_per_image: int = Field(99, ge=1)  # pseudo-labels per image at most
    # the student's budget: epochs (None: train.epochs) and step cap (None: train.max_steps).
    # §11.1 trains teacher and student for the same epochs; a student's epoch is longer (both
    # streams traversed), so one step cap for both gives the student fewer labeled views
    student_epochs: int | None = Field(None, ge=1)
    student_max_steps: int | None = Field(None, ge=1)
    # with train.early_stopping: a student (and self-training round) evaluates val mAP
    # about every this many steps (whole epochs of its stream), keeping the best weights;
    # None = train's interval (train.eval_steps, else map_freq epochs) — a student's epoch
    # traverses the pseudo stream too (~10x a teacher's at 10 % labeled), so map_freq epochs
    # may never come
    student_eval_steps: int | None = Field(None, ge=1)
    # early stopping's patience for students and self-training rounds (val evaluations
    # without a gain; under a `plateau` schedule, before each drop); None = train.patience.
    # A cosine student's gain comes as its rate anneals: a patience above its evaluations
    # (student_max_steps / student_eval_steps) keeps its best val weights without stopping it
    student_patience: int | None = Field(None, ge=1)
    # the students' (and self-training rounds') learning-rate schedule; None = train's: a
    # teacher trained to a plateau (`plateau`) and students on a fixed budget from it (`cosine`)
    student_lr_schedule: Literal["cosine", "plateau"] | None = None
    # where the first student starts: `initial` = the config's model weights, as the teacher
    # (§11.1, the reference); `teacher` = the teacher's weights (burn-in, as mean-teacher
    # systems do), so the student refines the teacher with gt + pseudo-labels
    student_init: Literal["initial", "teacher"] = "initial"
    # the teacher's detections the selection did not keep (score >= teacher_min_score) on a
    # pseudo-labeled image: `background` for the student's class loss (§11.1, the reference)
    # or `ignore` regions, neither object nor background (a missed object is not taught as
    # background: what a low-recall pseudo-label set does otherwise)
    rejected: Literal["background", "ignore"] = "background"
    # a student's batch: None = §11.1's L labeled + U pseudo-labeled images (L = 1 at 10 %
    # labeled, B = 8); k = k labeled + B − k pseudo-labeled (1:1 as mean-teacher systems: B/2)
    labeled_per_batch: int | None = Field(None, ge=1)
    selftrain_rounds: int = Field(3, ge=0)
    selftrain_epochs: int = Field(20, ge=1)
    # a self-training round's step cap (None: train.max_steps), as student_max_steps is the
    # first student's; a round also ends after selftrain_epochs (epochs of both streams)
    selftrain_max_steps: int | None = Field(None, ge=1)
    # train and evaluate the teacher (round 0) only: e.g. to compare teacher strategies
    teacher_only: bool = False
    # `stac`: rounds 1.. train students on pseudo-labels (§11.1); `csd`: round 1 trains a
    # consistency-based model (CSD, §11.9) from the initial weights on the labeled part and
    # every unlabeled image (no pseudo-labels, no selftrain); round 0 stays the teacher
    method: Literal["stac", "csd"] = "stac"
    csd_ratio: int = Field(3, ge=1)  # unlabeled : labeled images per batch (B = 8: 6 + 2)
    # per-anchor class consistency: `jsd` (detloop decision 10) or `kl` = KL(p‖p_f) (reference)
    csd_consistency: Literal["jsd", "kl"] = "jsd"
    # background elimination (the reference's csd_BE): anchors scoring ≤ 0.4 × the max are
    # dropped; the max per image and level (detloop decision) or over the batch (reference)
    csd_be: bool = True
    csd_be_scope: Literal["image_level", "batch"] = "image_level"
    csd_ramp: bool = True  # the consistency weight w(t) ramps up and down; else 1
    # the labeled split: `portion_labeled` % of the pool, or the reference's
    # int((N // B)·B/(ratio + 1)) images (B = train.batch_size)
    csd_split: Literal["portion", "reference"] = "portion"
    # `once` (detloop decision 9): each image's anchors weigh its a_i; `reference` also
    # multiplies each part of the student's loss by its batch mean of a_i (weighting twice).
    # An image without objects weighs `train.empty_image_weight`.
    pseudo_weighting: Literal["once", "reference"] = "once"
    # RCC (§11.3, teacher_strategy `rcc`): target class names (None: the `rcc_k` rarest
    # classes among the labeled boxes) and the generator's seed (compat 42)
    rcc_classes: list[str] | None = None
    rcc_k: int = Field(2, ge=1)
    rcc_seed: int = 42
    # RCF class weights (§11.4, `imscore`): 1/ln(n_c) min-max scaled to [lowest, highest]
    rcf_lowest: float = Field(1.0, gt=0)
    rcf_highest: float = Field(10.0, gt=0)
    # pseudo-labels must also pass the consistency signals (§11.6; need
    # predict.consistency_ssl): cons_iou >= min_cons_iou, and cons_cls true
    min_cons_iou: float | None = Field(None, ge=0, le=1)
    cons_cls: bool = False
    # PLS (§11.7, `loop: ssl`): after the τ selection keep the pseudo-labels of the images with
    # the highest D_i (`top`: ceil(pls_top_k·N) images, decision 8), of the rest (`bot`) or of
    # a seeded random set of the top's size (`rand`); δ_S of S_i is `pls_tau` (None: `tau`)
    pls: Literal["none", "top", "bot", "rand"] = "none"
    pls_top_k: float = Field(0.4, gt=0, le=1)
    pls_beta: float = Field(0.1, ge=0, le=1)
    pls_tau: float | None = Field(None, ge=0, le=1)
    # the 3D pseudo-label error study (§11.8, oracle, `loop: ssl`): the kept pseudo-labels
    # corrected with the pool's ground truth as the variant says
    oracle_variant: Literal["none", "nofd", "nomd", "nomdfd", "fixmd", "highprec", "nonoise"] = (
        "none"
    )

    @property
    def consistency_filter(self) -> ConsistencyFilter:
        """The consistency requirements of a pseudo-label (none by default)."""
        return ConsistencyFilter(min_cons_iou=self.min_cons_iou, cons_cls=self.cons_cls)

    @model_validator(mode="after")
    def _studies_need_offline_pseudo(self) -> SSLConfig:
        # PLS and the 3D study change the pseudo-labels of the pseudo_label phase; an online
        # mean teacher labels at each step instead, so they would silently do nothing
        used = {"pls": self.pls, "oracle_variant": self.oracle_variant}
        named = [f"ssl.{k}: {v}" for k, v in used.items() if v != "none"]
        if named and self.teacher == "ema":
            raise ValueError(
                f"{' and '.join(named)} select among the pseudo-labels of the teacher's "
                "predictions (teacher: stac); teacher: ema labels online at each step"
            )
        return self

    @property
    def pls_delta(self) -> float:
        """δ_S of PLS's S_i: ``pls_tau``, else ``tau``."""
        return self.tau if self.pls_tau is None else self.pls_tau

    @model_validator(mode="after")
    def _ignore_needs_offline_pseudo(self) -> SSLConfig:
        # ignore regions come from the stored predictions the pseudo-labels were selected from
        if self.rejected == "ignore" and (self.teacher == "ema" or self.method == "csd"):
            raise ValueError(
                "rejected: ignore turns the teacher's rejected detections of the pseudo_label "
                "phase into ignore regions; it needs teacher: stac and method: stac"
            )
        return self

    @model_validator(mode="after")
    def _target_precision_is_offline(self) -> SSLConfig:
        # τ is fitted in the pseudo_label phase; the mean teacher selects online with its τ
        if self.target_precision is not None and (self.teacher == "ema" or self.method == "csd"):
            raise ValueError(
                "target_precision fits τ in the pseudo_label phase of an offline teacher; it "
                "needs teacher: stac and method: stac (the mean teacher selects online by tau)"
            )
        if self.selection_strategy.needs_correctness and self.teacher == "ema":
            raise ValueError(
                "selection 'pcorrect' fits its model in the pseudo_label phase of an offline "
                "teacher; it needs teacher: stac"
            )
        return self

    @model_validator(mode="after")
    def _whole_pool_is_teacher_only(self) -> SSLConfig:
        if self.portion_labeled == 100 and not self.teacher_only:
            raise ValueError(
                "portion_labeled: 100 leaves nothing unlabeled to pseudo-label; it is for "
                "teacher_only runs (a supervised teacher on the whole pool)"
            )
        return self

    @model_validator(mode="after")
    def _labeled_per_batch_is_stac(self) -> SSLConfig:
        if self.labeled_per_batch is not None and self.method == "csd":
            raise ValueError("labeled_per_batch is a STAC student's; CSD's batch is csd_ratio's")
        return self

    @model_validator(mode="after")
    def _ema_has_no_selftrain(self) -> SSLConfig:
        if self.teacher == "ema" and self.selection_strategy.selftrain:
            raise ValueError(
                "teacher: ema re-labels every step; `selftrain` rounds are for teacher: stac"
            )
        return self

    @model_validator(mode="after")
    def _curr_needs_offline_pseudo(self) -> SSLConfig:
        # `curr` splits the pseudo-labeled images by their labels: an online mean teacher
        # labels them only at each step
        if self.teacher_strategy.curriculum_pseudo and self.teacher == "ema":
            raise ValueError(
                f"teacher_strategy {self.teacher_strategy.name!r}: `curr` orders the pseudo-"
                "labeled images by their labels before training; with teacher: ema they are "
                "labeled at each step (use teacher: stac)"
            )
        return self

    @model_validator(mode="after")
    def _rcf_range(self) -> SSLConfig:
        if self.rcf_lowest > self.rcf_highest:
            raise ValueError(f"rcf_lowest {self.rcf_lowest} > rcf_highest {self.rcf_highest}")
        return self

    @model_validator(mode="after")
    def _csd_has_no_pseudo_labels(self) -> SSLConfig:
        # CSD trains on the unlabeled images themselves: the options that make, select or
        # correct pseudo-labels would silently do nothing
        if self.method != "csd":
            return self
        used = ["teacher: ema"] if self.teacher == "ema" else []
        if self.selection_strategy.selftrain:
            used.append(f"selection_strategy {self.selection_strategy.name!r} (selftrain)")
        if self.teacher_strategy.curriculum_pseudo:
            used.append(f"teacher_strategy {self.teacher_strategy.name!r} (curr)")
        studies = (("pls", self.pls), ("oracle_variant", self.oracle_variant))
        used += [f"{k}: {v}" for k, v in studies if v != "none"]
        if self.min_cons_iou is not None or self.cons_cls:
            used.append("min_cons_iou / cons_cls")
        if used:
            raise ValueError(
                f"method: csd trains on the unlabeled images without pseudo-labels; "
                f"{', '.join(used)} need method: stac"
            )
        return self


class AutolabelConfig(Section):
    """Auto-labeling (ALGORITHMS §8).

    ``model``: the checkpoint directory or model bundle an ``AutoLabelRun`` (``loop:
    autolabel``) labels with; ``detloop autolabel --run RUN [--iteration N]`` sets it to that
    run's checkpoint. ``after_loop``: an AL or SSL run ends by auto-labeling the rest of its
    pool with its final model. Frames are ``data.pool`` (sorted by id, sliced to
    [``infer_first_frame``, ``infer_last_frame``)).
    """

    model: Path | None = None
    after_loop: bool = False
    empty_image: Literal["auto_labeled", "examine"] = "auto_labeled"
    infer_first_frame: int | None = None
    infer_last_frame: int | None = None
    quality_iou: float = 0.5
    render: bool = False

    @model_validator(mode="after")
    def _frames_in_order(self) -> AutolabelConfig:
        first, last = self.infer_first_frame, self.infer_last_frame
        if first is not None and last is not None and last <= first:
            raise ValueError(f"infer_last_frame ({last}) must exceed infer_first_frame ({first})")
        return self


class LabelingConfig(Section):
    """How exported review tasks reference their images (AL queries, auto-label ``examine``).

    ``document_root``: Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``; tasks then point at
    ``/data/local-files/?d=<path under it>`` (an image outside it is an error). With
    ``url_prefix`` (images served over http or from a bucket) a task points at
    ``<url_prefix>/<path under document_root>``. Neither: the image's file path.
    """

    document_root: Path | None = None
    url_prefix: str | None = None

    @model_validator(mode="after")
    def _prefix_needs_a_root(self) -> LabelingConfig:
        if self.url_prefix is not None and self.document_root is None:
            raise ValueError("labeling.url_prefix needs labeling.document_root (paths under it)")
        return self


class RayConfig(Section):
    address: str | None = None  # None: start a local instance; "auto": join `ray start`
    # train and predict in the driver process instead of Ray actors (one machine, small jobs):
    # the same phases, journal and outputs, without Ray's start-up
    in_process: bool = False
    num_cpus: int | None = None  # for a local instance
    predict_workers: int = Field(2, ge=1)
    predict_num_cpus: float = 1.0
    predict_num_gpus: float = 0.0
    train_num_cpus: float = 1.0
    train_num_gpus: float = 0.0
    max_restarts: int = 2
    max_task_retries: int = 2
    shard_size: int = 64
    # where the predict actors go on a cluster of several nodes: "spread" (Ray's SPREAD
    # strategy: over the nodes), "pack" (one placement group with the PACK strategy: as few
    # nodes as possible) or "default" (Ray's own choice); one node: always Ray's default
    predict_scheduling: Literal["spread", "pack", "default"] = "spread"
    # custom resources each actor needs, e.g. {"gpu_node": 1} to pin prediction to the nodes
    # started with `ray start --resources='{"gpu_node": 4}'` (CPUs and GPUs: the keys above)
    predict_resources: dict[str, float] = Field(default_factory=dict)
    train_resources: dict[str, float] = Field(default_factory=dict)
    # at start, check that some node can hold each actor and (several nodes) that every node
    # that can sees runs_root and the data; false on an autoscaling cluster whose nodes join later
    check_nodes: bool = True

    @field_validator("predict_resources", "train_resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(
                    f"{name!r} is not a custom resource: use ray.*_num_cpus / ray.*_num_gpus"
                )
            if amount < 0:
                raise ValueError(f"{name}: {amount} is negative")
        return v


class TrackingConfig(Section):
    """Where MLflow tracks the loops.

    ``uri``: None for the SQLite store at ``<runs_root>/mlflow.db``, or any MLflow tracking URI,
    e.g. ``http://127.0.0.1:5000`` (``detloop tracking-server``). The URI holds no credentials:
    it is stored in ``run.json`` (a resume reads it back), logged as an MLflow param and shipped
    to Ray tasks, so a URI with a user or password (``http://user:token@host``) or a query
    parameter named like a secret is refused; MLflow reads credentials from its own environment
    variables (``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``, or
    ``MLFLOW_TRACKING_TOKEN``), which detloop never stores.
    """

    uri: str | None = None  # None: SQLite store at <runs_root>/mlflow.db
    enabled: bool = True

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        found = None if v is None else cls.credentials_in(v)
        if found:
            assert v is not None
            raise ValueError(
                f"holds {found} ({cls.redact(v)} without it). detloop stores this URI in "
                "run.json and logs it, so it must carry no credentials: give it without them "
                "and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or "
                "MLFLOW_TRACKING_TOKEN (bearer token) in the environment of the processes that "
                "track, where MLflow reads them"
            )
        return v

    @staticmethod
    def _secret_name(name: str) -> bool:
        """A query parameter whose value is a credential (``?token=``, ``X-Amz-Signature``)."""
        words = ("token", "password", "passwd", "pwd", "secret", "key", "credential", "signature",
                 "auth")  # fmt: skip
        return any(word in name.lower() for word in words)

    @staticmethod
    def credentials_in(uri: str) -> str | None:
        """What in ``uri`` is a credential (``"a user or password"``, ``"a query parameter
        named 'token'"``), or None."""
        from urllib.parse import parse_qsl, urlsplit

        try:
            parts = urlsplit(uri)
        except ValueError:  # not a URL (MLflow refuses it later, with its own message)
            return None
        if parts.username is not None or parts.password is not None:
            return "a user or password"
        for name, _ in parse_qsl(parts.query, keep_blank_values=True):
            if TrackingConfig._secret_name(name):
                return f"a query parameter named {name!r}"
        return None

    @staticmethod
    def redact(uri: str) -> str:
        """``uri`` fit to show or store: no user or password, no query parameter named like
        a secret (``http://user:token@host:5000/?token=x&a=1`` -> ``http://host:5000/?a=1``).
        Anything that is not a URL with a network location comes back as it was."""
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        try:
            parts = urlsplit(uri)
        except ValueError:  # not a URL at all (e.g. an unbalanced "[")
            return uri
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        kept = [(k, v) for k, v in pairs if not TrackingConfig._secret_name(k)]
        host = parts.netloc.rpartition("@")[2]
        if host == parts.netloc and len(kept) == len(pairs):
            return uri  # nothing to remove: exactly as given
        return urlunsplit((parts.scheme, host, parts.path, urlencode(kept), parts.fragment))


class FaultConfig(Section):
    """Fault injection for tests. Each point fires once per run (a marker file remembers it)."""

    # "ITERATION:PHASE" kills the driver (SIGKILL) right after the phase completes;
    # "ITERATION:PHASE:mid" kills it half-way through the phase.
    kill_at: list[str] = Field(default_factory=list)
    kill_worker_at_shard: int | None = None  # a predict worker exits mid-shard of the pool
    # data-parallel training: the last train worker exits after this step (once per run)
    kill_train_worker_at_step: int | None = Field(None, ge=1)

    @field_validator("kill_at")
    @classmethod
    def _points(cls, v: list[str]) -> list[str]:
        for point in v:
            parts = point.split(":")
            if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[2:] not in ([], ["mid"]):
                raise ValueError(f"{point!r} is not ITERATION:PHASE or ITERATION:PHASE:mid")
        return v


class ExperimentConfig(Section):
    """A whole experiment."""

    name: str = "detloop"
    seed: int = 0
    # which journaled loop `detloop run` runs: active learning, semi-supervised learning, or
    # auto-labeling of new frames with a trained model (``autolabel.model``)
    loop: Literal["al", "ssl", "autolabel"] = "al"
    runs_root: Path = Path("runs")
    compat_seed: bool = False
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    thresholding: ThresholdingConfig = Field(default_factory=ThresholdingConfig)
    al: ALConfig = Field(default_factory=ALConfig)
    ssl: SSLConfig = Field(default_factory=SSLConfig)
    autolabel: AutolabelConfig = Field(default_factory=AutolabelConfig)
    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain directory name (no '/', not starting with '.')")
        return v

    @model_validator(mode="after")
    def _data_parallel_needs_ray(self) -> ExperimentConfig:
        if self.train.workers > 1 and self.ray.in_process:
            raise ValueError(
                "train.workers > 1 trains through Ray Train: it needs ray.in_process: false"
            )
        return self

    @model_validator(mode="after")
    def _csd_fits(self) -> ExperimentConfig:
        ssl, train = self.ssl, self.train
        if ssl.method != "csd":
            return self
        if self.loop == "al" and self.al.ssl:
            raise ValueError(
                "al.ssl trains STAC students on pseudo-labels; ssl.method: csd is a method of "
                "loop: ssl (set ssl.method: stac)"
            )
        if self.loop != "ssl":
            return self
        if train.workers > 1:  # its consistency loss is not split over ranks (yet)
            raise ValueError("ssl.method: csd trains on one worker: set train.workers: 1")
        if train.batch_size < ssl.csd_ratio + 1:
            raise ValueError(
                f"ssl.method: csd takes batch_size // (csd_ratio + 1) labeled images per batch: "
                f"train.batch_size {train.batch_size} < csd_ratio + 1 = {ssl.csd_ratio + 1}"
            )
        return self

    @model_validator(mode="after")
    def _student_plateau_needs_early_stopping(self) -> ExperimentConfig:
        if self.ssl.student_lr_schedule == "plateau" and not self.train.early_stopping:
            raise ValueError(
                "ssl.student_lr_schedule 'plateau' lowers the rate when val stops improving: "
                "it needs train.early_stopping: true"
            )
        return self

    @model_validator(mode="after")
    def _labeled_per_batch_fits(self) -> ExperimentConfig:
        per, batch = self.ssl.labeled_per_batch, self.train.batch_size
        if per is not None and per >= batch:
            raise ValueError(
                f"ssl.labeled_per_batch {per} leaves no pseudo-labeled image in a batch of "
                f"train.batch_size {batch} (at most {batch - 1})"
            )
        return self

    @model_validator(mode="after")
    def _ssl_studies_need_the_ssl_loop(self) -> ExperimentConfig:
        ssl = self.ssl
        if self.loop != "ssl" and (ssl.pls != "none" or ssl.oracle_variant != "none"):
            raise ValueError(
                "ssl.pls and ssl.oracle_variant act in the pseudo_label phase of `loop: ssl`; "
                f"with loop: {self.loop} they would change nothing (set them to none)"
            )
        return self

    @model_validator(mode="after")
    def _autolabel_has_a_model(self) -> ExperimentConfig:
        if self.loop == "autolabel" and self.autolabel.model is None:
            raise ValueError(
                "loop: autolabel needs autolabel.model (a checkpoint directory or model bundle; "
                "`detloop autolabel --run RUN` sets it to that run's model)"
            )
        return self


# ---- loading ----------------------------------------------------------------------------------


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = {}
            node[key] = child
        if not isinstance(child, dict):
            raise ConfigError("--set", [(dotted, f"{key!r} is not a section")])
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``a.b=c``; the value is read as YAML (numbers, booleans, lists, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", [(item, "expected KEY=VALUE, e.g. train.epochs=5")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _suggest(path: tuple[int | str, ...], model: type[BaseModel]) -> str:
    """Close matches for an unknown key, found by walking the model along ``path``."""
    node: Any = model
    for part in path[:-1]:
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            return ""
        ann = fields[part].annotation
        node = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)),
            ann,
        )
    fields = getattr(node, "model_fields", None)
    if not fields:
        return ""
    close = difflib.get_close_matches(str(path[-1]), list(fields), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    cfg.runs_root = fix(cfg.runs_root) or cfg.runs_root
    for split in ("pool", "val", "test"):
        src: SourceConfig | None = getattr(cfg.data, split)
        if src is not None:
            src.source = fix(src.source) or src.source
            src.images = fix(src.images)
    cfg.model.weights = fix(cfg.model.weights)
    cfg.autolabel.model = fix(cfg.autolabel.model)
    cfg.labeling.document_root = fix(cfg.labeling.document_root)
    return cfg


def build_config(
    data: dict[str, Any],
    overrides: list[str] | None = None,
    base_dir: Path | None = None,
    source: str = "<config>",
) -> ExperimentConfig:
    """Validate a raw mapping (plus ``--set`` overrides) into an ``ExperimentConfig``."""
    data = dict(data)
    problems: list[tuple[str, str]] = []
    for item in overrides or []:
        try:
            key, value = parse_override(item)
            _set_dotted(data, key, value)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(source, problems)
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _suggest(err["loc"], ExperimentConfig)
            problems.append((_location(err["loc"]), msg))
        problems += _raw_external_problems(data, {p for p, _ in problems})
        raise ConfigError(source, problems) from None
    problems += _semantic_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
    return _resolve_paths(cfg, base_dir or Path.cwd())


def _semantic_problems(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Checks that need more than one field, or another module's vocabulary."""
    problems: list[tuple[str, str]] = []
    if cfg.model.clip_min_uncert >= cfg.model.clip_max_uncert:
        problems.append(("model.clip_min_uncert", "must be below model.clip_max_uncert"))
    lo, hi = cfg.train.scale_jitter
    if not 0 < lo <= hi:
        problems.append(("train.scale_jitter", "needs 0 < low <= high"))
    problems += _consistency_problems(cfg)
    for path, check in _external_checks():
        value = _get_dotted(cfg, path)
        try:
            check(value)
        except ValueError as exc:
            problems.append((path, str(exc)))
    return problems


def _consistency_problems(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Pseudo-label filters on the consistency signals need the predictions to carry them."""
    if cfg.predict.consistency_ssl:
        return []
    asked = {"ssl.min_cons_iou": cfg.ssl.min_cons_iou is not None, "ssl.cons_cls": cfg.ssl.cons_cls}
    text = (
        "filters on the consistency signals (§11.6), which only predict.consistency_ssl: true "
        "computes (3 more forward passes per image); set it, or drop this filter"
    )
    return [(path, text) for path, on in asked.items() if on]


def _raw_external_problems(data: dict[str, Any], reported: set[str]) -> list[tuple[str, str]]:
    """The external checks on the raw mapping, so that a config with field errors still gets
    its other problems (e.g. a misspelt strategy) reported in the same pass."""
    problems: list[tuple[str, str]] = []
    for path, check in _external_checks():
        node: Any = data
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or path in reported:
            continue
        try:
            check(node)
        except ValueError as exc:
            problems.append((path, str(exc)))
    return problems


def _get_dotted(cfg: BaseModel, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _external_checks() -> list[tuple[str, Any]]:
    """Validators owned by other modules (pure ones, imported lazily).

    The strategy grammar lives in ``detloop.selectors``; importing it here keeps the config the
    one place where a whole experiment is validated before any work starts.
    """
    checks: list[tuple[str, Any]] = []
    from detloop.selectors.uncertainty_names import parse_uncertainties

    checks.append(("thresholding.thr_sel_uncert", parse_uncertainties))
    return checks


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config file, apply ``--set`` overrides and validate.

    Raises:
        ConfigError: listing every problem with its dotted path.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read the file: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("", f"malformed YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), [("", "the top level must be a mapping")])
    return build_config(data, overrides, base_dir=path.resolve().parent, source=str(path))


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """JSON-ready mapping of a config with every value (paths as strings)."""
    return cfg.model_dump(mode="json")


def config_snapshot(cfg: ExperimentConfig) -> dict[str, Any]:
    """The values that were set (by the file, ``--set`` or path resolution), JSON-ready.

    This is what ``run.json`` stores and what crosses process boundaries: rebuilding a config
    from it keeps "unset" unset, so model presets still fill in their own defaults (e.g. the
    tiny preset's learning rate) where the user chose nothing.
    """
    return cfg.model_dump(mode="json", exclude_unset=True)


def flatten_config(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted keys to string values, e.g. for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = "null" if node is None else str(node)

    walk("", config_to_dict(cfg))
    return out
