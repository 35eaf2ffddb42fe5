"""Consistency signals of the detections (ALGORITHMS §11.6, ``predict.consistency_ssl``).

Every image is predicted again under three views, each a batch of network inputs built from
the letterboxed, ImageNet-normalised batch (only the image's content region, the top-left
``round(W·s) × round(H·s)`` of the canvas, is changed; the padding stays as it is):

- ``hflip``: the content mirrored left-right; the view's boxes are mirrored back in network
  pixels (x ↦ w_content − x) before they go to original pixels, so a box maps onto itself.
- ``blur``: a 9×9 Gaussian blur, σ = 0.3·((9 − 1)/2 − 1) + 0.8 = 1.7 — the σ that OpenCV's
  ``GaussianBlur(img, (9, 9), 0)`` (the reference) and torchvision's ``gaussian_blur`` derive
  from the kernel size — with reflected borders (OpenCV's default ``BORDER_REFLECT_101``).
  The normalisation is a per-channel affine map and the kernel sums to 1, so blurring the
  normalised input equals normalising the blurred image.
- ``noise``: additive Gaussian noise of std √0.5 in 0–255 pixel units, as the reference added
  to the raw image (``var = 0.5``), i.e. √0.5 / (255·σ_c) in the normalised units of channel
  c; no clipping (neither did the reference). Drawn per image from ``(seed, image_id)``, so it
  does not depend on batching.

The reference blurred and noised the image at its original resolution; here the views act on
the network input (after the letterbox resize), the one input the predictor has. Each view is
one more forward pass of the batch (with MC dropout, the same per-image masks as the ordinary
pass), so consistency mode costs three extra passes per image.

Signals of a kept detection d (box b, class c) against a view's kept detections V (boxes in
original pixels, rank order):

- ``cons_iou`` = mean over the three views of max_{v ∈ V} IoU(b, v) (0 for a view with no
  detection).
- ``cons_cls`` (``cons_cls_mode: all``, detloop decision): true iff in every view the max-IoU
  detection (ties: the higher-ranked) overlaps b (IoU > 0) and has class c.
- compat ``cons_cls_mode: rank``: true iff the three views each have a detection at d's rank
  (``det_id``) and these three have one class, as the reference compared them (the reference
  tested whether the mean of the three class ids is an integer, which {0, 1, 2} also passes;
  here they must be equal, and a view with fewer detections gives false).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detloop import seeding
from detloop.data.dataset import IMAGENET_STD
from detloop.selectors.autolabel import box_iou

BLUR_KERNEL: Final = 9
BLUR_SIGMA: Final = 0.3 * ((BLUR_KERNEL - 1) * 0.5 - 1) + 0.8  # 1.7, OpenCV's sigma=0 rule
NOISE_STD: Final = math.sqrt(0.5)  # in 0-255 pixel units

#: (boxes [K, 4] in network pixels, class ids [K]) of each image of a view batch, rank order
ViewDetections = list[tuple[np.ndarray, np.ndarray]]
Detect = Callable[[Tensor], ViewDetections]


@dataclass(frozen=True)
class Content:
    """The letterboxed images of a batch: their content sizes in network pixels, the scale s
    and original (width, height), and the image ids (for the noise seeds)."""

    widths: list[int]
    heights: list[int]
    scales: list[float]
    sizes: list[tuple[float, float]]
    image_ids: list[str]

    @classmethod
    def of_batch(
        cls,
        scales: Sequence[float],
        sizes: Sequence[tuple[float, float]],
        image_ids: Sequence[str],
        net_hw: tuple[int, int],
    ) -> Content:
        """Content sizes as the dataset's letterbox makes them: max(1, round(side·s)), at most
        the network side."""
        w = [min(net_hw[1], max(1, round(sz[0] * s))) for s, sz in zip(scales, sizes, strict=True)]
        h = [min(net_hw[0], max(1, round(sz[1] * s))) for s, sz in zip(scales, sizes, strict=True)]
        return cls(w, h, list(scales), list(sizes), list(image_ids))


@dataclass(frozen=True)
class View:
    """One view: how it changes the batch and whether its boxes are mirrored back."""

    name: str
    apply: Callable[[Tensor, Content, int], Tensor]
    mirrored: bool = False


def hflip(x: Tensor, content: Content, seed: int = 0) -> Tensor:
    """Each image's content region mirrored left-right (padding untouched)."""
    out = x.clone()
    for b, (w, h) in enumerate(zip(content.widths, content.heights, strict=True)):
        out[b, :, :h, :w] = x[b, :, :h, :w].flip(-1)
    return out


def gaussian_kernel(size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> Tensor:
    """The normalised 1-D Gaussian kernel (sums to 1)."""
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def blur(x: Tensor, content: Content, seed: int = 0) -> Tensor:
    """Each image's content region blurred with the separable 9×9 Gaussian, borders
    reflected (replicated when the region is too small to reflect)."""
    k = gaussian_kernel().to(x.device, torch.float32)
    c, pad = x.shape[1], BLUR_KERNEL // 2
    kx = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    out = x.clone()
    for b, (w, h) in enumerate(zip(content.widths, content.heights, strict=True)):
        region = x[b : b + 1, :, :h, :w].float()
        mode = "reflect" if min(h, w) > pad else "replicate"
        region = F.conv2d(F.pad(region, (pad, pad, 0, 0), mode=mode), kx, groups=c)
        region = F.conv2d(F.pad(region, (0, 0, pad, pad), mode=mode), ky, groups=c)
        out[b, :, :h, :w] = region[0].to(x.dtype)
    return out


def noise_seed(seed: int, image_id: str) -> int:
    """The noise generator's seed of one image."""
    return seeding.derive_seed(seed, None, f"cons_noise/{image_id}")


def add_noise(x: Tensor, content: Content, seed: int) -> Tensor:
    """Each image's content region plus N(0, 0.5) noise in pixel units (normalised units:
    √0.5 / (255·σ_c) per channel), drawn on the CPU from the image's own seed."""
    std = torch.as_tensor(NOISE_STD / (255.0 * IMAGENET_STD), dtype=torch.float32)
    out = x.clone()
    for b, (w, h) in enumerate(zip(content.widths, content.heights, strict=True)):
        gen = torch.Generator().manual_seed(noise_seed(seed, content.image_ids[b]))
        eps = torch.randn((x.shape[1], h, w), generator=gen) * std.view(-1, 1, 1)
        out[b, :, :h, :w] = x[b, :, :h, :w] + eps.to(x.device, x.dtype)
    return out


VIEWS: Final = (View("hflip", hflip, mirrored=True), View("blur", blur), View("noise", add_noise))


def to_original(boxes: np.ndarray, b: int, content: Content, mirrored: bool) -> np.ndarray:
    """A view's boxes (network pixels) of image ``b`` in original pixels: mirrored back first
    when the view mirrored the content, then divided by s and clipped to the image."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    if mirrored:
        w = float(content.widths[b])
        out[:, [0, 2]] = w - out[:, [2, 0]]
    width, height = content.sizes[b]
    out /= content.scales[b]
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def signals(
    boxes: np.ndarray,
    classes: np.ndarray,
    views: Sequence[tuple[np.ndarray, np.ndarray]],
    mode: Literal["all", "rank"] = "all",
) -> tuple[np.ndarray, np.ndarray]:
    """(cons_iou float32 [K], cons_cls bool [K]) of K detections (original-pixel ``boxes``,
    ``classes``) against each view's (boxes, classes) in rank order (module docstring)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    classes = np.asarray(classes)
    n = len(boxes)
    ious = np.zeros((len(views), n))
    same = np.ones(n, dtype=bool)
    for v, (v_boxes, v_classes) in enumerate(views):
        v_classes = np.asarray(v_classes)
        if len(v_boxes) == 0 or n == 0:
            same[:] = False
            continue
        m = box_iou(boxes, np.asarray(v_boxes, dtype=np.float64).reshape(-1, 4))
        j = m.argmax(axis=1)  # first maximum: the higher-ranked detection
        ious[v] = m[np.arange(n), j]
        if mode == "all":
            same &= (ious[v] > 0) & (v_classes[j] == classes)
    if mode == "rank":
        same &= _same_class_at_rank(n, [np.asarray(c) for _, c in views])
    cons = ious.mean(axis=0) if len(views) else np.zeros(n)
    return cons.astype(np.float32), same


def _same_class_at_rank(n: int, view_classes: Sequence[np.ndarray]) -> np.ndarray:
    """Per rank k < n: every view has a detection at rank k and they share one class."""
    out = np.ones(n, dtype=bool)
    if not view_classes:
        return out
    padded = np.full((len(view_classes), n), -1, dtype=np.int64)
    for v, c in enumerate(view_classes):
        k = min(n, len(c))
        padded[v, :k] = c[:k]
        out[k:] = False
    return np.asarray(out & np.all(padded == padded[:1], axis=0), dtype=bool)


def view_signals(
    detect: Detect,
    x: Tensor,
    content: Content,
    seed: int,
    dets: Sequence[tuple[np.ndarray, np.ndarray]],
    mode: Literal["all", "rank"] = "all",
    views: Sequence[View] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(cons_iou, cons_cls) of each image's kept detections ``dets`` (original-pixel boxes,
    classes) from one ``detect`` pass per view of the network batch ``x`` (``views``: default
    ``VIEWS``)."""
    per_view: list[ViewDetections] = []
    for view in VIEWS if views is None else views:
        found = detect(view.apply(x, content, seed))
        per_view.append(
            [
                (to_original(boxes, b, content, view.mirrored), classes)
                for b, (boxes, classes) in enumerate(found)
            ]
        )
    return [
        signals(boxes, classes, [found[b] for found in per_view], mode)
        for b, (boxes, classes) in enumerate(dets)
    ]
