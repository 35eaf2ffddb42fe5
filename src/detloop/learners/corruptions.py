"""Test-time corruptions of validation images (ALGORITHMS §6.3, the reference's
``infer_augment``): how mAP and uncertainty quality move when the imagery degrades.

Groups, as ``predict.infer_augment`` names them:

- ``heq``: histogram equalisation of the luma channel (Y of YCbCr), chroma kept.
- ``alb``: weather and sensor corruptions — ``snow`` (white flakes and a brighter, washed-out
  scene), ``fog`` (a smooth random haze blended towards light grey), ``rain`` (slanted light
  streaks, slightly darker scene), ``noise`` (Gaussian, σ = 20 grey levels). The reference
  took these from albumentations; here they are numpy ops of the same kinds (no OpenCV needed).
- ``aug``: 10-level sweeps, level 0 the unchanged image — Gaussian noise variance 0…1000, a
  horizontal motion-blur kernel 1…51 px, contrast α 1 → 0 (``α·x``), brightness β 0…100 (``x + β``).
- ``flip``: horizontal and vertical mirror images; their ground truth is mirrored with them
  (:func:`flip_boxes`).

Every op maps an H×W×3 uint8 array to one of the same shape, deterministically for a given
``numpy.random.Generator`` state (the caller seeds one per image and variant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

U8 = NDArray[np.uint8]
Op = Callable[[U8, np.random.Generator], U8]
GROUPS = ("heq", "alb", "aug", "flip")
LEVELS = 10


@dataclass(frozen=True)
class Corruption:
    """One variant: its name (the suffix of its image ids), the image op and the mirror axis
    of its ground truth (``"h"``, ``"v"`` or None)."""

    name: str
    op: Op
    flip: str | None = None


def _clip(x: NDArray[np.float64]) -> U8:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def histogram_equalise(img: U8, rng: np.random.Generator | None = None) -> U8:
    """Equalise the luma histogram; chroma unchanged."""
    y, cb, cr = Image.fromarray(img).convert("YCbCr").split()
    out = Image.merge("YCbCr", (ImageOps.equalize(y), cb, cr)).convert("RGB")
    return np.asarray(out, dtype=np.uint8)


def gaussian_noise(variance: float) -> Op:
    def op(img: U8, rng: np.random.Generator) -> U8:
        if variance <= 0:
            return img.copy()
        return _clip(img + rng.normal(0.0, np.sqrt(variance), img.shape))

    return op


def motion_blur(kernel: int) -> Op:
    """Average over ``kernel`` horizontal neighbours (edges repeat the border pixel)."""

    def op(img: U8, rng: np.random.Generator) -> U8:
        if kernel <= 1:
            return img.copy()
        half = kernel // 2
        padded = np.pad(img.astype(np.float64), ((0, 0), (half, kernel - 1 - half), (0, 0)), "edge")
        csum = np.cumsum(np.pad(padded, ((0, 0), (1, 0), (0, 0))), axis=1)
        return _clip((csum[:, kernel:] - csum[:, :-kernel]) / kernel)

    return op


def contrast(alpha: float) -> Op:
    def op(img: U8, rng: np.random.Generator) -> U8:
        return _clip(alpha * img.astype(np.float64))

    return op


def brightness(beta: float) -> Op:
    def op(img: U8, rng: np.random.Generator) -> U8:
        return _clip(img.astype(np.float64) + beta)

    return op


def _smooth_field(
    shape: tuple[int, int], rng: np.random.Generator, cells: int = 4
) -> NDArray[np.float64]:
    """A smooth random field in [0, 1]: a coarse grid of uniform values, upsampled bilinearly."""
    h, w = shape
    coarse = rng.uniform(0.0, 1.0, (cells + 1, cells + 1))
    field = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR
    )
    return np.asarray(field, dtype=np.float64) / 255.0


def snow(img: U8, rng: np.random.Generator) -> U8:
    x = img.astype(np.float64)
    x = 0.7 * x + 0.3 * 200.0  # washed out, brighter
    flakes = rng.uniform(size=img.shape[:2]) < 0.02
    x[flakes] = 255.0
    return _clip(x)


def fog(img: U8, rng: np.random.Generator) -> U8:
    haze = 0.3 + 0.4 * _smooth_field(img.shape[:2], rng)  # 0.3..0.7 of the way to grey
    x = img.astype(np.float64)
    return _clip((1 - haze[..., None]) * x + haze[..., None] * 220.0)


def rain(img: U8, rng: np.random.Generator) -> U8:
    h, w = img.shape[:2]
    x = 0.85 * img.astype(np.float64)
    n = max(1, h * w // 400)
    length = max(3, h // 12)
    starts = np.stack([rng.integers(0, h, n), rng.integers(0, w, n)], axis=1)
    for step in range(length):  # slanted streaks: one pixel right every second step down
        rows = starts[:, 0] + step
        cols = starts[:, 1] + step // 2
        ok = (rows < h) & (cols < w)
        x[rows[ok], cols[ok]] = 0.5 * x[rows[ok], cols[ok]] + 0.5 * 200.0
    return _clip(x)


def flip_image(axis: str) -> Op:
    def op(img: U8, rng: np.random.Generator) -> U8:
        return np.ascontiguousarray(img[:, ::-1] if axis == "h" else img[::-1])

    return op


def flip_boxes(
    boxes: NDArray[np.float64], width: float, height: float, axis: str
) -> NDArray[np.float64]:
    """Mirror xyxy ``boxes`` [N, 4] of a ``width`` × ``height`` image (``h``: left-right,
    ``v``: top-bottom); the result is xyxy again."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = b.copy()
    if axis == "h":
        out[:, 0], out[:, 2] = width - b[:, 2], width - b[:, 0]
    elif axis == "v":
        out[:, 1], out[:, 3] = height - b[:, 3], height - b[:, 1]
    else:
        raise ValueError(f"flip axis must be 'h' or 'v', got {axis!r}")
    return out


def sweep_levels() -> dict[str, list[float]]:
    """The 10 levels of each ``aug`` sweep (level 0 leaves the image unchanged)."""
    return {
        "noise": np.linspace(0.0, 1000.0, LEVELS).tolist(),
        "blur": [float(1 + 2 * round(k)) for k in np.linspace(0, 25, LEVELS)],
        "contrast": np.linspace(1.0, 0.0, LEVELS).tolist(),
        "brightness": np.linspace(0.0, 100.0, LEVELS).tolist(),
    }


def corruptions(groups: Sequence[str]) -> list[Corruption]:
    """The variants of ``groups`` (a subset of ``GROUPS``), in a fixed order.

    Raises:
        ValueError: an unknown group.
    """
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown infer_augment group(s) {unknown}; choose from {list(GROUPS)}")
    out: list[Corruption] = []
    if "heq" in groups:
        out.append(Corruption("heq", histogram_equalise))
    if "alb" in groups:
        out += [
            Corruption("snow", snow),
            Corruption("fog", fog),
            Corruption("rain", rain),
            Corruption("noise", gaussian_noise(400.0)),
        ]
    if "aug" in groups:
        makers: dict[str, Callable[[float], Op]] = {
            "noise": gaussian_noise,
            "blur": lambda k: motion_blur(int(k)),
            "contrast": contrast,
            "brightness": brightness,
        }
        for kind, levels in sweep_levels().items():
            out += [Corruption(f"aug_{kind}_{i}", makers[kind](v)) for i, v in enumerate(levels)]
    if "flip" in groups:
        out += [
            Corruption("flip_h", flip_image("h"), "h"),
            Corruption("flip_v", flip_image("v"), "v"),
        ]
    return out
