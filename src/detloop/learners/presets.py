"""Model presets in one place: for each name, the effdet base architecture, the network changes
and the training defaults it brings (a user's own config values always win over them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final


@dataclass(frozen=True)
class Preset:
    """A named model size.

    Attributes:
        base: the effdet config the network starts from.
        model: changes to that config (backbone, BiFPN, levels, input size, anchors).
        train: training defaults filled in where the config sets nothing.
    """

    base: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: Final[dict[str, Preset]] = {
    # A CPU-sized detector for tests and the demo on digits-det, trained from random init.
    "tiny": Preset(
        base="efficientdet_d0",
        model={
            "backbone": "mobilenetv3_small_100",
            "fpn_channels": 32,
            "fpn_cell_repeats": 1,
            "box_class_repeats": 1,
            "min_level": 3,
            "max_level": 5,
            "image_size": (128, 128),
            "anchor_scale": 1.5,  # P3–P5 anchors of 12–76 px: digits-det objects are 16–48 px
        },
        # AdamW converges far faster than the reference's SGD from random init; no flips (a
        # mirrored digit is another glyph); mild scale jitter for 16–48 px objects.
        train={
            "optimizer": "adamw",
            "lr": 0.003,
            "warmup_lr": 0.0003,
            "hflip": False,
            "scale_jitter": (0.8, 1.25),
            "batch_size": 8,
        },
    ),
    # The reference's D0 takes 1024x512 (W x H) inputs.
    "d0": Preset(base="tf_efficientdet_d0", model={"image_size": (512, 1024)}),
    **{f"d{i}": Preset(base=f"tf_efficientdet_d{i}") for i in range(1, 8)},
}
