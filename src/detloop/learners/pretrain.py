"""A pretrained backbone made offline by the project's own code (issue 18).

The backbone of a preset (the module ``model.weights_kind: backbone`` loads) learns to classify
the UCI handwritten digits (:mod:`detloop.data.pretrain_digits`, another handwriting collection
than digits-det's MNIST digits) on canvases like digits-det's. A throw-away head — the mean of
every backbone level the BiFPN reads, concatenated, then one linear layer — makes it a 10-class
classifier; pooling all levels, not only the last, gives the finest level (stride 8, where
digits-det's small digits are found) a direct gradient. Only the backbone is saved.

Output, in ``out_dir``:

- ``backbone.pt``: a state dict of ``backbone.*`` tensors, what ``model.weights`` reads with
  ``model.weights_kind: backbone`` (BiFPN and heads keep their fresh initialisation);
- ``pretrain.json``: source, settings, held-out accuracy, seconds, preset, the file's sha256.

A call whose settings match the metadata beside an intact weights file reuses it. Real
detectors start from COCO or ImageNet weights instead; this is the demo's offline stand-in.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detloop.config import ModelConfig
from detloop.console import Bar, Progress, progress_bar
from detloop.data import pretrain_digits as pdata
from detloop.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from detloop.data.io import atomic_path, read_json, sha256_file, write_json
from detloop.learners.device import memory_format
from detloop.learners.model import UncertainEfficientDet, resolve_spec
from detloop.learners.presets import PRESETS
from detloop.learners.train import lr_at

log = logging.getLogger(__name__)

WEIGHTS_FILE: Final = "backbone.pt"
META_FILE: Final = "pretrain.json"
FORMAT: Final = "detloop-pretrained-backbone"
VERSION: Final = 1  # of the recipe: metadata of another version is not reused
NUM_CLASSES: Final = 10


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the weights (the cache key, with :data:`VERSION`).

    Attributes:
        preset: the model preset whose backbone is trained.
        seed: held-out split, views, initialisation and batch order derive from it.
        epochs: passes over the training digits, each with freshly drawn views.
        batch_size, lr, weight_decay: AdamW with a one-epoch linear warm-up, cosine decay.
        canvas: side of a view in pixels (digits keep digits-det's 16-48 px, up to the side).
        max_steps: stop after this many steps (short runs in tests); None: all epochs.
    """

    preset: str = "tiny"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.003
    weight_decay: float = 4e-5
    canvas: int = pdata.CANVAS
    max_steps: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"unknown preset {self.preset!r}; one of {', '.join(PRESETS)}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append(
                f"epochs and batch size must be >= 1, got {self.epochs}, {self.batch_size}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps}")
        if not 32 <= self.canvas <= 256:
            problems.append(f"canvas must be 32..256 px, got {self.canvas}")
        if problems:
            raise ValueError("; ".join(problems))

    def key(self) -> dict[str, Any]:
        """The JSON-ready cache key: these settings, the recipe (version, source, views)."""
        views = {
            "digit_px": list(pdata.DIGIT_PX),
            "contrast": list(pdata.CONTRAST),
            "heldout": pdata.HELDOUT_FRACTION,
        }
        return {**asdict(self), "version": VERSION, "source": pdata.SOURCE, "views": views}


@dataclass(frozen=True)
class PretrainResult:
    """The weights file, its metadata, and whether an earlier run's file was reused."""

    weights: Path
    metadata: dict[str, Any]
    reused: bool


class DigitClassifier(nn.Module):
    """A backbone plus the throw-away head: mean of every level, concatenated, linear."""

    def __init__(self, backbone: nn.Module, channels: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(sum(channels), NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        out: Tensor = self.head(torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1))
        return out


def preset_model(preset: str, seed: int) -> UncertainEfficientDet:
    """A fresh detector of ``preset`` (10 classes) whose ``backbone`` is the one to train."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UncertainEfficientDet(resolve_spec(ModelConfig(preset=preset), NUM_CLASSES))


def backbone_state(model: nn.Module) -> dict[str, Tensor]:
    """The ``backbone.*`` entries of a detector's state dict (contiguous, on the CPU)."""
    return {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def cached(out_dir: Path, settings: PretrainSettings) -> dict[str, Any] | None:
    """The metadata in ``out_dir`` when it was made with ``settings`` and its weights file is
    intact (same sha256); else None."""
    meta_path, weights = Path(out_dir) / META_FILE, Path(out_dir) / WEIGHTS_FILE
    if not (meta_path.is_file() and weights.is_file()):
        return None
    try:
        meta = read_json(meta_path)
    except ValueError:  # a hand-edited or foreign file: retrain
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    if meta.get("settings") != settings.key() or meta.get("sha256") != sha256_file(weights):
        return None
    return meta


def to_batch(images: np.ndarray, fmt: torch.memory_format) -> Tensor:
    """uint8 ``(n, H, W, 3)`` views → normalised float ``[n, 3, H, W]``, as the detector's
    input (ImageNet mean and std, :class:`detloop.data.dataset.DetectionDataset`)."""
    pixels = (images.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(memory_format=fmt)


@torch.no_grad()
def accuracy(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    fmt: torch.memory_format,
    batch_size: int = 128,
) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on the views ``images``."""
    model.eval()
    hits = 0
    for start in range(0, len(images), batch_size):
        logits = model(to_batch(images[start : start + batch_size], fmt))
        hits += int((logits.argmax(1).numpy() == labels[start : start + batch_size]).sum())
    return hits / max(1, len(images))


def pretrain_backbone(
    out_dir: Path,
    settings: PretrainSettings,
    *,
    progress: Progress = True,
    threads: int | None = 1,
) -> PretrainResult:
    """Train ``settings.preset``'s backbone on the UCI digits and write it to ``out_dir``,
    unless ``out_dir`` already holds weights made with the same settings (then reused).

    Args:
        out_dir: folder of ``backbone.pt`` and ``pretrain.json`` (created).
        settings: the recipe; it is the cache key.
        progress: a progress bar (steps, running loss and accuracy), as ``train_model``'s.
        threads: torch CPU threads while training (None: the process's setting). One by
            default: a small backbone on 32 px views gains little from more (6.5 against 5
            steps/s with two on an idle 2-core machine), and on a busy machine several threads
            wait on each other (0.2 steps/s measured with two).
    """
    out_dir = Path(out_dir)
    meta = cached(out_dir, settings)
    if meta is not None:
        log.info("reusing the pretrained backbone in %s", out_dir)
        return PretrainResult(out_dir / WEIGHTS_FILE, meta, reused=True)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        model, record = _train(settings, progress)
    finally:
        torch.set_num_threads(old_threads)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return PretrainResult(*_write(out_dir, model, settings, record), reused=False)


def _train(
    settings: PretrainSettings, progress: Progress
) -> tuple[DigitClassifier, dict[str, Any]]:
    """The classifier trained by ``settings``, and what the metadata records of the run."""
    data = pdata.load_pretrain_digits(settings.seed)
    detector = preset_model(settings.preset, settings.seed)
    channels = [int(c) for c in detector.backbone.feature_info.channels()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 1)
        model = DigitClassifier(detector.backbone, channels)
    fmt = memory_format(ModelConfig().channels_last)  # the preset's inputs are channels-last
    model.to(memory_format=fmt)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    per_epoch = math.ceil(len(data.train) / settings.batch_size)
    total = per_epoch * settings.epochs
    total = min(total, settings.max_steps) if settings.max_steps else total
    bar = progress_bar(progress, total=total, desc="pretrain", unit="step")
    history: list[dict[str, float]] = []
    try:
        for epoch in range(math.ceil(total / per_epoch)):
            images, labels = pdata.views(data, "train", settings.seed, epoch, settings.canvas)
            views = (images, labels)
            history.append(_epoch(model, optimizer, views, epoch, total, settings, fmt, bar))
    finally:
        bar.close()
    held_images, held_labels = pdata.views(data, "heldout", settings.seed, None, settings.canvas)
    record = {
        "accuracy": round(accuracy(model, held_images, held_labels, fmt), 4),
        "n_train": len(data.train),
        "n_heldout": len(data.heldout),
        "steps": min(total, len(history) * per_epoch),
        "history": history,
    }
    return model, record


def _epoch(
    model: DigitClassifier,
    optimizer: torch.optim.Optimizer,
    views: tuple[np.ndarray, np.ndarray],
    epoch: int,
    total: int,
    settings: PretrainSettings,
    fmt: torch.memory_format,
    bar: Bar,
) -> dict[str, float]:
    """One pass over this epoch's views (seeded order), up to ``total`` steps in all; returns
    the epoch's mean loss and training accuracy."""
    images, labels = views
    bs = settings.batch_size
    per_epoch = math.ceil(len(images) / bs)
    order = np.random.default_rng([settings.seed, epoch, 11]).permutation(len(images))
    warmup = min(per_epoch, total // 2)
    model.train()
    losses: list[float] = []
    hits = seen = 0
    for i in range(min(per_epoch, total - epoch * per_epoch)):
        step = epoch * per_epoch + i
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, warmup, settings.lr, settings.lr / 10)
        idx = order[i * bs : (i + 1) * bs]
        target = torch.from_numpy(labels[idx])
        logits = model(to_batch(images[idx], fmt))
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
        hits += int((logits.detach().argmax(1) == target).sum())
        seen += len(idx)
        running = f"loss {np.mean(losses[-20:]):.3f}, acc {hits / seen:.3f}"
        bar.set_postfix_str(running, refresh=False)
        bar.update(1)
    return {"epoch": float(epoch), "loss": float(np.mean(losses)), "train_accuracy": hits / seen}


def _write(
    out_dir: Path, model: DigitClassifier, settings: PretrainSettings, record: dict[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """The backbone's weights, then the metadata (which marks them complete), atomically."""
    weights = out_dir / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        torch.save(backbone_state(model.backbone), tmp)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "source": pdata.SOURCE,
        "preset": settings.preset,
        "backbone": resolve_spec(ModelConfig(preset=settings.preset), NUM_CLASSES).backbone,
        "seed": settings.seed,
        "settings": settings.key(),
        "weights_file": WEIGHTS_FILE,
        "weights_kind": "backbone",
        "sha256": sha256_file(weights),
        "torch": torch.__version__,
        **record,
    }
    write_json(meta, out_dir / META_FILE)
    log.info("pretrained backbone: %s (held-out accuracy %.3f)", weights, record["accuracy"])
    return weights, meta
