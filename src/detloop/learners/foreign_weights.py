"""Weights users bring: a pretrained detector or an ImageNet classifier, loaded into the
uncertainty model wherever they fit.

``model.weights_kind`` says what the file is:

- ``backbone``: the backbone only. A detector checkpoint's ``backbone.*`` tensors, or — when the
  file has none — a plain timm classifier checkpoint (keys without the ``backbone.`` prefix): each
  key that names a backbone tensor is taken, the rest (classifier, final conv of the classifier
  head) is skipped. BiFPN and heads keep their fresh initialisation.
- ``detector``: an effdet checkpoint (COCO-pretrained ``tf_efficientdet_d0``, say): every tensor
  whose name and shape fit (backbone, BiFPN, the class and box towers). The predict layers are
  where a detector trained elsewhere does not fit: the class layer is re-initialised when the
  class count differs, and the box layer of a loss-attenuation model — 4 means + 4 variance
  channels per anchor where effdet has 4 — takes the checkpoint's box means and keeps its fresh
  variance channels.

Wrappers are unwrapped first (``model.`` of effdet's ``DetBenchTrain``, ``module.`` of
``DistributedDataParallel``). What was loaded, partly loaded and skipped is counted per part of
the network (:class:`LoadReport`, logged as a table); a file of which almost nothing fits (another
architecture) is refused rather than silently leaving a randomly initialised model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from detloop.data.errors import DataError

log = logging.getLogger(__name__)

PARTS = ("backbone", "fpn", "class_net", "box_net")
WRAPPERS = ("model.", "module.")
#: below this share of the target tensors set from the file, the file is refused
MIN_FIT = 0.5


@dataclass
class LoadReport:
    """What a load did, per part of the network (``backbone``, ``fpn``, ``class_net``,
    ``box_net``): tensors of the model set from the file (``partial`` names those set in part:
    the box means) or left as initialised, and the file's tensors that found no place (with
    the reason)."""

    kind: str
    loaded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    partial: list[str] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    skipped: dict[str, str] = field(default_factory=dict)  # file key -> reason

    def table(self) -> str:
        """One line per part: loaded / kept as initialised; then partial and skipped keys."""
        lines = [f"{'part':<10} {'loaded':>7} {'kept init':>10}"]
        for part in PARTS:
            if self.loaded[part] or self.kept[part]:
                lines.append(f"{part:<10} {self.loaded[part]:>7} {self.kept[part]:>10}")
        if self.partial:
            lines.append(
                "partly loaded (box means; variance channels kept): " + ", ".join(self.partial)
            )
        if self.skipped:
            reasons: dict[str, list[str]] = {}
            for key, why in self.skipped.items():
                reasons.setdefault(why, []).append(key)
            for why, keys in sorted(reasons.items()):
                shown = ", ".join(keys[:4]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 4 else ""
                )
                lines.append(f"skipped ({why}): {shown}")
        return "\n".join(lines)


def _part(key: str) -> str:
    return next((p for p in PARTS if key.startswith(p + ".")), "other")


def unwrap(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the wrapper prefixes that every key shares (``model.``, ``module.``)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPERS:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _box_means(model: nn.Module) -> set[str]:
    """The box predict tensors whose first rows are the box means (loss attenuation: rows
    [0, 4A) means, [4A, 8A) variances)."""
    if not getattr(model, "spec", None) or not model.spec.loss_attenuation:  # type: ignore[union-attr]
        return set()
    return {
        k for k in model.state_dict() if k.startswith("box_net.predict.") and "conv_dw" not in k
    }


def load_foreign(
    model: nn.Module, state: dict[str, torch.Tensor], kind: str, source: str
) -> LoadReport:
    """Load ``state`` into ``model`` as ``kind`` (``backbone`` or ``detector``) says.

    Raises:
        DataError: nothing of the expected kind in the file, or less than half of the target
            tensors fit (another architecture).
    """
    state = unwrap(dict(state))
    own = model.state_dict()
    report = LoadReport(kind)
    prefix = ""
    if kind == "backbone":
        if not any(k.startswith("backbone.") for k in state):  # a plain timm classifier
            prefix = "backbone."
            state = {f"{prefix}{k}": v for k, v in state.items()}
        targets = {k for k in own if k.startswith("backbone.")}
    elif kind == "detector":
        targets = set(own)
    else:
        raise ValueError(f"unknown weights kind {kind!r}")
    means = _box_means(model) if kind == "detector" else set()
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in targets:
            why = "not in the model" if key not in own else "not a backbone tensor"
            report.skipped[key.removeprefix(prefix)] = why  # the file's own name
            continue
        mine = own[key]
        if value.shape == mine.shape:
            new[key] = value.to(mine.dtype)
        elif (
            key in means
            and value.shape[1:] == mine.shape[1:]
            and 2 * value.shape[0] == mine.shape[0]
        ):
            merged = mine.clone()
            merged[: value.shape[0]] = value.to(mine.dtype)
            new[key] = merged
            report.partial.append(key)
        else:
            report.skipped[key] = "shape differs"
    fitted = [k for k in targets if k in new and k not in report.partial]
    share = len(fitted) / max(1, len(targets))
    if share < MIN_FIT:
        raise DataError(
            source,
            None,
            None,
            f"as weights_kind {kind}, only {len(fitted)} of the model's {len(targets)} "
            f"{'backbone ' if kind == 'backbone' else ''}tensors fit ({share:.0%}): another "
            "architecture? (model.preset / model.backbone must match the checkpoint's)",
        )
    model.load_state_dict(new, strict=False)
    for key in targets:
        counts = report.loaded if key in new else report.kept
        counts[_part(key)] = counts.get(_part(key), 0) + 1
    log.info("weights from %s (%s):\n%s", source, kind, report.table())
    return report
