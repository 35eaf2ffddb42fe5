"""Training losses: anchor labeling, sigmoid focal loss, box loss with loss attenuation.

ALGORITHMS §1.1–§1.2. Outputs and targets are flattened over levels ([B, N, ...] in effdet's
anchor order); per-level sums use the level sizes of the anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from effdet.anchors import AnchorLabeler, Anchors
from effdet.object_detection.box_list import BoxList
from torch import Tensor
from torchvision.ops import box_iou

from detloop.config import ModelConfig
from detloop.learners.model import TH, TW, ModelSpec, effdet_config, sigma_squared

# an anchor covered this much by an ignore region (and matched to no object) is ignored: the
# IoU at which it would have been a positive had the region been a pseudo-label (effdet's
# match threshold)
IGNORE_IOU = 0.5
_SIZE_MASK = torch.tensor([0.0, 0.0, 0.0, 0.0])
_SIZE_MASK[TH] = 1.0
_SIZE_MASK[TW] = 1.0


@dataclass(frozen=True)
class LossSettings:
    """The loss hyper-parameters of one model (ALGORITHMS §1.2, §12)."""

    alpha: float
    gamma: float
    w_box: float
    residual: str  # "MSE" or "huber"
    huber_delta: float
    la_loss: str  # "reference" or "nll"
    loss_attenuation: bool
    sigma_param: str
    clip_min: float
    clip_max: float

    @classmethod
    def from_config(cls, mcfg: ModelConfig, spec: ModelSpec) -> LossSettings:
        la = spec.loss_attenuation
        return cls(
            alpha=mcfg.focal_alpha,
            gamma=mcfg.focal_gamma,
            w_box=mcfg.w_box if mcfg.w_box is not None else (100.0 if la else 50.0),
            residual=mcfg.boxloss_type or ("MSE" if la else "huber"),
            huber_delta=mcfg.huber_delta,
            la_loss=mcfg.la_loss,
            loss_attenuation=la,
            sigma_param=spec.sigma_param,
            clip_min=spec.clip_min,
            clip_max=spec.clip_max,
        )


@dataclass
class Targets:
    """Anchor targets of a batch, flattened over levels."""

    cls: Tensor  # [B, N] long: class (0-based), -1 negative, -2 ignored
    box: Tensor  # [B, N, 4] encoded (t_y, t_x, t_h, t_w)
    weight: Tensor  # [B, N] loss weight per anchor
    num_pos: Tensor  # [B]

    def slice(self, images: slice) -> Targets:
        """The targets of the ``images`` of the batch (e.g. an SSL batch's pseudo part)."""
        return Targets(
            self.cls[images], self.box[images], self.weight[images], self.num_pos[images]
        )

    def to(self, device: torch.device) -> Targets:
        return Targets(
            self.cls.to(device),
            self.box.to(device),
            self.weight.to(device),
            self.num_pos.to(device),
        )


def make_anchors(spec: ModelSpec) -> Anchors:
    """effdet anchors (yxyx, network pixels) of a model spec."""
    return Anchors.from_config(effdet_config(spec))


def level_sizes(anchors: Anchors) -> list[int]:
    """Number of anchors per level, in order."""
    per = anchors.get_anchors_per_location()
    return [
        h * w * per
        for h, w in (
            anchors.feat_sizes[lv] for lv in range(anchors.min_level, anchors.max_level + 1)
        )
    ]


def label_batch(
    labeler: AnchorLabeler,
    boxes: Tensor,
    classes: Tensor,
    weights: Tensor,
    *,
    mode: str = "image",
    empty_weight: float = 1.0,
) -> Targets:
    """Assign anchors to ground truth (IoU ≥ 0.5, forced match per GT). An anchor matched to
    no object that an ignore region (class 0) would have been matched to (``region_anchors``)
    is ignored (-2): neither object nor background in the class loss.

    Args:
        labeler: effdet's labeler over the model's anchors.
        boxes: [B, M, 4] yxyx network pixels, padded rows have class -1.
        classes: [B, M] 1-based classes, -1 = padding, 0 = an ignore region.
        weights: [B, M] loss weight per object.
        mode: ``image`` — every anchor of image i gets a_i = mean of its object weights
            (ALGORITHMS §11.2); ``box`` — positives get their object's weight, the rest a_i.
        empty_weight: a_i of an image without objects.
    """
    anchor_list = BoxList(labeler.anchors.boxes)
    cls_out, box_out, w_out, npos = [], [], [], []
    for i in range(boxes.shape[0]):
        valid = classes[i] > 0
        gt_w = weights[i][valid].float()
        cls_t, box_t, matches = labeler.target_assigner.assign(
            anchor_list, BoxList(boxes[i][valid]), classes[i][valid]
        )
        match = matches.match_results
        a_i = gt_w.mean() if gt_w.numel() else torch.tensor(empty_weight)
        w = torch.full(match.shape, float(a_i))
        if mode == "box" and gt_w.numel():
            pos = match > -1
            w[pos] = gt_w[match[pos]]
        cls_i = (cls_t - 1).long()
        regions = boxes[i][classes[i] == 0]
        if len(regions):
            cls_i[region_anchors(labeler, regions) & (match < 0)] = -2
        cls_out.append(cls_i)
        box_out.append(box_t)
        w_out.append(w)
        npos.append((match > -1).float().sum())
    return Targets(
        torch.stack(cls_out), torch.stack(box_out), torch.stack(w_out), torch.stack(npos)
    )


def region_anchors(labeler: AnchorLabeler, regions: Tensor) -> Tensor:
    """[N] bool: the anchors that ``regions`` ([K, 4] yxyx) would be matched to were they
    objects — IoU ≥ the match threshold, and each region's best anchor (the forced match)."""
    iou = box_iou(labeler.anchors.boxes, regions)
    covered: Tensor = iou.amax(1) >= IGNORE_IOU
    covered[iou.argmax(0)] = True
    return covered


def focal_loss(logits: Tensor, cls: Tensor, weight: Tensor, alpha: float, gamma: float) -> Tensor:
    """Sigmoid focal loss summed over anchors and classes (effdet's "new" form, no smoothing).

    Args:
        logits: [B, N, C]; cls: [B, N] target class, -1 background, -2 ignored; weight: [B, N].
    """
    num_classes = logits.shape[-1]
    onehot = F.one_hot(cls.clamp(min=0), num_classes).float() * (cls >= 0).unsqueeze(-1)
    logits = logits.float()
    prob = logits.sigmoid()
    p_t = onehot * prob + (1 - onehot) * (1 - prob)
    alpha_t = onehot * alpha + (1 - onehot) * (1 - alpha)
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    loss = alpha_t * (1 - p_t) ** gamma * ce
    keep = ((cls != -2).float() * weight).unsqueeze(-1)
    return (loss * keep).sum()


def residual(pred: Tensor, target: Tensor, kind: str, delta: float) -> Tensor:
    """Elementwise ℓ: squared error (``MSE``) or Huber with threshold δ."""
    err = pred - target
    if kind == "MSE":
        return err * err
    abs_err = err.abs()
    quad = abs_err.clamp(max=delta)
    return 0.5 * quad * quad + delta * (abs_err - quad)


def lognormal_shift(mu: Tensor, var: Tensor) -> Tensor:
    """μ' = μ + σ²/2 on the size entries (t_h, t_w) only (ALGORITHMS §1.2)."""
    return mu + 0.5 * var * _SIZE_MASK.to(var.device, var.dtype)


def la_level_loss(ell: Tensor, var: Tensor, mask: Tensor, n_pos: Tensor, form: str) -> Tensor:
    """One level's attenuated box loss from residuals ℓ and variances σ² ([..., 4] each).

    ``reference``: 0.25·Σ m_a·[ℓ/σ² + log(1 + σ²)] / (4·N_pos);
    ``nll``: 0.25·Σ m_a·[½ℓ/σ² + ½log σ²] / (4·N_pos).
    """
    if form == "reference":
        term = ell / var + torch.log1p(var)
    else:
        term = 0.5 * ell / var + 0.5 * torch.log(var)
    return 0.25 * (term * mask.unsqueeze(-1)).sum() / (4.0 * n_pos)


def detection_loss(
    cls_logits: Tensor,
    box_mu: Tensor,
    box_s: Tensor | None,
    targets: Targets,
    sizes: list[int],
    settings: LossSettings,
    n_pos: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Total, class and box loss of a batch (flattened outputs, see ``model.flatten_levels``),
    normalised by the batch's positive anchors + 1, or by ``n_pos`` (data-parallel training
    passes the global batch's)."""
    if n_pos is None:
        n_pos = targets.num_pos.sum() + 1.0
    pos = (targets.cls >= 0).float() * targets.weight
    l_cls = (
        focal_loss(cls_logits, targets.cls, targets.weight, settings.alpha, settings.gamma) / n_pos
    )
    box_mu = box_mu.float()
    var = None
    if box_s is not None and settings.loss_attenuation:
        var = sigma_squared(
            box_s.float(), settings.sigma_param, settings.clip_min, settings.clip_max
        )
        box_mu = lognormal_shift(box_mu, var)
    ell = residual(box_mu, targets.box, settings.residual, settings.huber_delta)
    levels = []
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        start += size
        if var is None:
            levels.append((ell[:, sl] * pos[:, sl].unsqueeze(-1)).sum() / (4.0 * n_pos))
        else:
            levels.append(
                la_level_loss(ell[:, sl], var[:, sl], pos[:, sl], n_pos, settings.la_loss)
            )
    stacked = torch.stack(levels)
    l_box = stacked.mean() if var is not None else stacked.sum()
    return l_cls + settings.w_box * l_box, l_cls, l_box


@torch.no_grad()
def box_monitors(
    box_mu: Tensor, box_s: Tensor | None, targets: Targets, settings: LossSettings
) -> tuple[float, float, float]:
    """Training monitors of ALGORITHMS §1.2 over positive anchors: RMSE of the encoded box
    means against their targets, and mean and std of σ (NaN without loss attenuation or
    without positives)."""
    pos = (targets.cls >= 0) & (targets.weight > 0)
    if not bool(pos.any()):
        return float("nan"), float("nan"), float("nan")
    err = box_mu.float()[pos] - targets.box.float()[pos]
    rmse = float(err.square().mean().sqrt())
    if box_s is None or not settings.loss_attenuation:
        return rmse, float("nan"), float("nan")
    var = sigma_squared(
        box_s.float()[pos], settings.sigma_param, settings.clip_min, settings.clip_max
    )
    sigma = var.sqrt()
    return rmse, float(sigma.mean()), float(sigma.std(unbiased=False))
