"""Non-maximum suppression that returns kept indices (ALGORITHMS §3, step 3).

Returning indices rather than boxes lets the predict loop gather every per-anchor quantity
(logits, MC statistics, aleatoric and epistemic stds) of the kept anchors without fusing
anything over the suppressed cluster.
"""

from __future__ import annotations

from typing import Final

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

NMS_METHODS: Final = ("hard", "gaussian")


def hard_nms(
    boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float, max_output: int
) -> Tensor:
    """Per-class hard NMS (torchvision ``batched_nms``), top ``max_output`` by score.

    Returns:
        Kept indices, sorted by decreasing score.
    """
    keep: Tensor = batched_nms(boxes, scores, classes, iou_threshold)
    return keep[:max_output]


def gaussian_soft_nms(
    boxes: Tensor, scores: Tensor, sigma: float, max_output: int, score_thresh: float
) -> tuple[Tensor, Tensor]:
    """Class-agnostic Gaussian soft-NMS (Bodla et al., ICCV 2017), as the reference.

    Repeatedly emit the highest-scoring remaining box M and rescore every other remaining box
    with s_i ← s_i·exp(−IoU(M, b_i)²/σ); boxes falling below ``score_thresh`` are dropped.

    Returns:
        Kept indices (in emission order, i.e. by non-increasing rescored score) and their
        rescored scores.
    """
    current = scores.clone()
    alive = current >= score_thresh
    kept: list[int] = []
    kept_scores: list[Tensor] = []
    neg_inf = torch.tensor(float("-inf"), dtype=current.dtype, device=current.device)
    while len(kept) < max_output and bool(alive.any()):
        best = int(torch.argmax(torch.where(alive, current, neg_inf)))
        kept.append(best)
        kept_scores.append(current[best])
        alive[best] = False
        row = box_iou(boxes[best : best + 1], boxes)[0]  # O(N) per output, ≤ max_output rows
        current = current * torch.exp(-(row**2) / sigma)
        alive &= current >= score_thresh
    idx = torch.tensor(kept, dtype=torch.long, device=boxes.device)
    out = torch.stack(kept_scores) if kept_scores else scores.new_zeros(0)
    return idx, out


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    *,
    method: str = "hard",
    iou_threshold: float = 0.5,
    sigma: float = 0.5,
    max_output: int = 100,
    score_thresh: float = 0.001,
) -> tuple[Tensor, Tensor]:
    """Select detections among decoded candidates of one image (§3 step 3).

    Args:
        boxes: candidate boxes [N, 4] as (x1, y1, x2, y2).
        scores: candidate scores [N].
        classes: candidate classes [N] (long); used by ``hard`` only.
        method: ``hard`` (per-class hard NMS, the default) or ``gaussian`` (class-agnostic
            Gaussian soft-NMS, the reference's uncertainty path).
        iou_threshold: IoU above which ``hard`` suppresses a box of the same class.
        sigma: σ_nms of the Gaussian rescoring.
        max_output: at most this many detections are returned.
        score_thresh: candidates (and, for ``gaussian``, rescored boxes) below it are dropped.

    Returns:
        Kept indices into the inputs (LongTensor [K], sorted by output score, descending) and
        the output scores [K] (the input scores under ``hard``, rescored under ``gaussian``).

    Raises:
        ValueError: for an unknown method or mismatched shapes.
    """
    if method not in NMS_METHODS:
        raise ValueError(f"unknown NMS method {method!r}; choose one of {', '.join(NMS_METHODS)}")
    n = boxes.shape[0]
    if boxes.shape != (n, 4) or scores.shape != (n,) or classes.shape != (n,):
        raise ValueError(
            f"expected boxes [N, 4], scores [N], classes [N], got {tuple(boxes.shape)}, "
            f"{tuple(scores.shape)}, {tuple(classes.shape)}"
        )
    candidates = torch.nonzero(scores >= score_thresh).flatten()
    if method == "hard":
        keep = hard_nms(
            boxes[candidates], scores[candidates], classes[candidates], iou_threshold, max_output
        )
        idx = candidates[keep]
        return idx, scores[idx]
    keep, out = gaussian_soft_nms(
        boxes[candidates], scores[candidates], sigma, max_output, score_thresh
    )
    return candidates[keep], out
