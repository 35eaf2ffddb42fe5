"""CSD's consistency losses (ALGORITHMS §11.9; Jeong et al., "Consistency-based Semi-supervised
Learning for Object Detection", NeurIPS 2019).

Every image of a batch and its horizontal flip go through the model; the flipped view's maps
are flipped back along the width (``flip_back``) so that anchor (a, h, w) of one view faces
anchor (a, h, w) of the other. For effdet's anchors (``effdet.anchors.Anchors``) this
alignment is exact: on a level of stride s the anchors of column j are centred at
x = s/2 + j·s, the image width is W_l·s (``model.resolve_spec`` makes both sides multiples of
2^max_level), and every location has the same list of (scale, aspect) anchors, each symmetric
about its centre. Mirroring the image therefore maps anchor a of column j onto anchor a of
column W_l − 1 − j, and ``tests/test_csd.py`` checks it on the anchors themselves. Mirroring
negates the encoded t_x and leaves t_y, t_h, t_w and the class unchanged.

Maps are effdet's per-level ``[B, A·k, H, W]`` with the k entries of an anchor contiguous
(class logits: k = C; box maps: k = 4 means (t_y, t_x, t_h, t_w), followed under loss
attenuation by 4·A uncertainty channels, which never enter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from detloop.config import SSLConfig
from detloop.learners.model import TX
from detloop.selectors.ssl_csd import csd_ramp

#: background elimination keeps an anchor whose max class score exceeds this share of the max
BE_SHARE: Final = 0.4


@dataclass(frozen=True)
class CsdSettings:
    """The CSD options of a training (``ssl.csd_*``, ALGORITHMS §11.9)."""

    ratio: int = 3  # unlabeled : labeled images per batch
    # per-anchor class divergence: JSD (detloop decision 10) or the reference's KL(p‖p_f)
    consistency: Literal["jsd", "kl"] = "jsd"
    be: bool = True  # background elimination
    # BE's max score: per image and level (detloop decision) or over the batch (reference)
    be_scope: Literal["image_level", "batch"] = "image_level"
    ramp: bool = True  # the weight w(t) ramps up and down; else 1

    @classmethod
    def from_config(cls, ssl: SSLConfig) -> CsdSettings:
        return cls(ssl.csd_ratio, ssl.csd_consistency, ssl.csd_be, ssl.csd_be_scope, ssl.csd_ramp)

    def weight(self, step: int, total: int) -> float:
        """w(t) of the consistency loss at ``step`` of ``total`` steps."""
        return csd_ramp(step, total) if self.ramp else 1.0

    @property
    def key(self) -> str:
        """What a training's fingerprint adds for these options."""
        return f"csd{self.ratio}/{self.consistency}/{self.be}/{self.be_scope}/{self.ramp}"


def flip_back(maps: Sequence[Tensor]) -> list[Tensor]:
    """The per-level maps of a horizontally flipped batch, flipped back along the width."""
    return [m.flip(-1) for m in maps]


def class_divergence(logits: Tensor, logits_flip: Tensor, kind: str, dim: int = -1) -> Tensor:
    """Per-anchor divergence of p = softmax(logits) and p_f = softmax(logits_flip) over the
    classes (``dim``): ``jsd`` = ½KL(p‖m) + ½KL(p_f‖m) with m = ½(p + p_f), ``kl`` = KL(p‖p_f)."""
    log_p = F.log_softmax(logits.float(), dim)
    log_q = F.log_softmax(logits_flip.float(), dim)
    p = log_p.exp()
    if kind == "kl":
        return (p * (log_p - log_q)).sum(dim)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (p * (log_p - log_m)).sum(dim) + 0.5 * (log_q.exp() * (log_q - log_m)).sum(dim)


def background_mask(logits: Tensor, scope: str) -> Tensor:
    """Background elimination: 1 for the anchors whose max sigmoid class score exceeds
    ``BE_SHARE`` × the max score, else 0 (no gradient). ``logits`` [B, A, C, H, W] of one
    level; the max is taken per image (``image_level``, detloop decision) or over the whole
    level tensor of the batch (``batch``, the reference); result [B, A, H, W]."""
    score = logits.detach().float().sigmoid().amax(2)
    if scope == "batch":
        top = score.amax()
    else:
        top = score.flatten(1).amax(1).view(-1, 1, 1, 1)
    return (score > BE_SHARE * top).float()


def box_discrepancy(box: Tensor, box_flip: Tensor) -> Tensor:
    """Mean over (t_y, t_x, t_h, t_w) of the squared differences of the two views' encoded
    boxes, t_x with the sign flip (t_x + t_x^flip); ``box`` [B, A, 4, H, W] → [B, A, H, W]."""
    sign = torch.ones(4, device=box.device, dtype=box.dtype)
    sign[TX] = -1.0
    diff = box - box_flip * sign.view(1, 1, 4, 1, 1)
    return diff.square().mean(2)


def level_consistency(
    cls_map: Tensor,
    box_map: Tensor,
    cls_back: Tensor,
    box_back: Tensor,
    num_anchors: int,
    settings: CsdSettings,
) -> tuple[Tensor, Tensor]:
    """One level's class consistency (summed over anchors, divided by the batch size) and box
    consistency (mean over anchors; eliminated anchors count as 0), the flipped view's maps
    ``cls_back``, ``box_back`` already flipped back. Background elimination reads the scores
    of the un-flipped view."""
    b, _, h, w = cls_map.shape
    a = num_anchors
    logits = cls_map.float().reshape(b, a, -1, h, w)
    div = class_divergence(
        logits, cls_back.float().reshape(b, a, -1, h, w), settings.consistency, 2
    )
    box = box_map[:, : 4 * a].float().reshape(b, a, 4, h, w)
    sq = box_discrepancy(box, box_back[:, : 4 * a].float().reshape(b, a, 4, h, w))
    if settings.be:
        keep = background_mask(logits, settings.be_scope)
        div, sq = div * keep, sq * keep
    return div.sum() / b, sq.mean()


def consistency_losses(
    maps: tuple[Sequence[Tensor], Sequence[Tensor]],
    maps_flip: tuple[Sequence[Tensor], Sequence[Tensor]],
    num_anchors: int,
    settings: CsdSettings,
) -> tuple[Tensor, Tensor]:
    """(L_cls_cons, L_box_cons), each the mean over levels, of a batch's (class, box) maps and
    those of its horizontal flip as the model returned them (flipped back here)."""
    cls_back, box_back = flip_back(maps_flip[0]), flip_back(maps_flip[1])
    levels = [
        level_consistency(c, b, cb, bb, num_anchors, settings)
        for c, b, cb, bb in zip(maps[0], maps[1], cls_back, box_back, strict=True)
    ]
    return (
        torch.stack([lv[0] for lv in levels]).mean(),
        torch.stack([lv[1] for lv in levels]).mean(),
    )
