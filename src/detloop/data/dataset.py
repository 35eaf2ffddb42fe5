"""The torch Dataset over the images and labels tables (the one torch module of ``data``).

Images are letterboxed (ALGORITHMS §1.1): resized by s = min(H/H_in, W/W_in), padded at the
bottom and right, ImageNet-normalised. Training adds a horizontal flip and scale jitter
(s·r, r ~ U(lo, hi), then a random crop of the network size). Targets are what effdet's
anchor labeler takes: boxes y1, x1, y2, x2 in network pixels, classes 1-based, padding -1
(an ignore region, ``labels.IGNORE_CLASS_ID``, becomes class 0).
Augmentation draws come from ``(seed, epoch, index)``, so any worker order gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import Dataset

from detloop.data.errors import DataError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class StrongAugment(Protocol):
    """A box-aware image augmentation (e.g. ``learners.box_augment.RandAugment``): the image,
    its xyxy boxes in original pixels and a generator in; the image, the surviving boxes and
    their indices out."""

    def __call__(
        self, image: Image.Image, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[Image.Image, np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Augment:
    """Training augmentation; ``None`` in a dataset means none (prediction).

    ``strong`` is applied first (before the flip and the scale jitter) to the images from
    index ``strong_from`` of the dataset on (the pseudo-labeled part of an SSL student's data)
    and to those in ``strong_between`` [lo, hi) (RCF's RandAugment-ed copies of rare images).
    """

    hflip: bool = True
    scale_jitter: tuple[float, float] = (0.1, 2.0)
    seed: int = 0
    strong: StrongAugment | None = None
    strong_from: int = 0
    strong_between: tuple[int, int] = (0, 0)

    def is_strong(self, index: int) -> bool:
        """``strong`` applies to dataset row ``index``."""
        lo, hi = self.strong_between
        return self.strong is not None and (index >= self.strong_from or lo <= index < hi)


def _group_labels(labels: pa.Table | None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if labels is None or labels.num_rows == 0:
        return {}
    ids = np.asarray(labels.column("image_id").to_pylist(), dtype=object)
    boxes = np.stack(
        [labels.column(c).to_numpy().astype(np.float64) for c in ("x1", "y1", "x2", "y2")], 1
    )
    classes = labels.column("class_id").to_numpy().astype(np.int64)
    if "weight" in labels.column_names:
        weights = labels.column("weight").to_numpy().astype(np.float32)
    else:
        weights = np.ones(len(ids), np.float32)
    order = np.argsort(ids, kind="stable")
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    uniq, starts = np.unique(ids[order], return_index=True)
    ends = [*starts[1:], len(order)]
    for key, a, b in zip(uniq, starts, ends, strict=True):
        idx = order[a:b]
        out[str(key)] = (boxes[idx], classes[idx], weights[idx])
    return out


class DetectionDataset(Dataset[dict[str, Any]]):
    """Letterboxed images with optional targets.

    Args:
        images: rows with ``image_id``, ``file`` (absolute, or relative to ``root``),
            ``width``, ``height``.
        labels: label rows (xyxy original pixels, 0-based ``class_id``, ``weight``) or None.
        image_size: network input (H, W).
        augment: training augmentation, or None.
        max_instances: at most this many objects per image (the first ones are kept).
        root: base directory of relative ``file`` entries.
    """

    def __init__(
        self,
        images: pa.Table,
        labels: pa.Table | None,
        image_size: tuple[int, int],
        *,
        augment: Augment | None = None,
        max_instances: int = 100,
        root: Path | None = None,
    ) -> None:
        self.image_ids = [str(v) for v in images.column("image_id").to_pylist()]
        self.files = [str(v) for v in images.column("file").to_pylist()]
        self.image_size = image_size
        self.augment = augment
        self.max_instances = max_instances
        self.root = root
        self.epoch = 0
        self._labels = _group_labels(labels)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def _load(self, index: int) -> Image.Image:
        path = Path(self.files[index])
        if not path.is_absolute() and self.root is not None:
            path = self.root / path
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(str(path), index, "file", f"cannot read image ({exc})") from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self._load(index)
        empty = (np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, np.float32))
        boxes, classes, weights = self._labels.get(self.image_ids[index], empty)
        boxes = boxes[: self.max_instances].copy()
        classes, weights = classes[: self.max_instances], weights[: self.max_instances]
        h_net, w_net = self.image_size
        w_in, h_in = image.size
        scale = min(h_net / h_in, w_net / w_in)
        offset = (0, 0)
        if self.augment is not None:
            rng = np.random.default_rng([self.augment.seed, self.epoch, index])
            strong = self.augment.strong
            if strong is not None and self.augment.is_strong(index):
                image, boxes, keep = strong(image, boxes, rng)
                classes, weights = classes[keep], weights[keep]
            if self.augment.hflip and rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                boxes[:, [0, 2]] = w_in - boxes[:, [2, 0]]
            lo, hi = self.augment.scale_jitter
            scale *= float(rng.uniform(lo, hi))
        new_w, new_h = max(1, round(w_in * scale)), max(1, round(h_in * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        if self.augment is not None and (new_w > w_net or new_h > h_net):
            offset = (
                int(rng.integers(0, max(new_w - w_net, 0) + 1)),
                int(rng.integers(0, max(new_h - h_net, 0) + 1)),
            )
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        canvas = np.zeros((h_net, w_net, 3), np.float32)
        crop = pixels[offset[1] : offset[1] + h_net, offset[0] : offset[0] + w_net]
        canvas[: crop.shape[0], : crop.shape[1]] = crop
        boxes = boxes * scale - np.array([offset[0], offset[1], offset[0], offset[1]])
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, min(crop.shape[1], w_net))
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, min(crop.shape[0], h_net))
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1.0) & ((boxes[:, 3] - boxes[:, 1]) >= 1.0)
        return {
            "image": torch.from_numpy(canvas).permute(2, 0, 1).contiguous(),
            "index": index,
            "scale": scale,
            "boxes": torch.from_numpy(boxes[keep][:, [1, 0, 3, 2]].astype(np.float32)),
            "classes": torch.from_numpy(classes[keep] + 1),
            "weights": torch.from_numpy(weights[keep]),
        }


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack images; pad targets to the batch's largest object count (class -1)."""
    n = len(items)
    m = max(1, max(len(it["classes"]) for it in items))
    boxes = torch.zeros(n, m, 4)
    classes = torch.full((n, m), -1, dtype=torch.long)
    weights = torch.zeros(n, m)
    for i, it in enumerate(items):
        k = len(it["classes"])
        boxes[i, :k], classes[i, :k], weights[i, :k] = it["boxes"], it["classes"], it["weights"]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
        "scale": torch.tensor([it["scale"] for it in items], dtype=torch.float64),
        "boxes": boxes,
        "classes": classes,
        "weights": weights,
    }
