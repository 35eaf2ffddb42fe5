"""Box-aware RandAugment: the strong augmentation of pseudo-labelled images (ALGORITHMS §11.1).

STAC trains the student on strongly augmented pseudo-labelled images (``stac_randaug``). The
augmentation is the detection RandAugment of the TensorFlow EfficientDet reference
(``autoaugment.distort_image_with_randaugment``): ``num_layers`` times (1), pick one op uniformly
from

    Equalize, Solarize, Color, Cutout, SolarizeAdd,
    TranslateX_BBox, TranslateY_BBox, ShearX_BBox, ShearY_BBox, Rotate_BBox

and apply it with a probability drawn from U(0.2, 0.8), at the shared magnitude (15). The last
five move the boxes with the image; the others leave the boxes as they are.

Level arithmetic (reference ``level_to_arg``, ``_MAX_LEVEL = 10``, f = level / 10; at the
default magnitude f = 1.5):

=============  ========================================  ============  =======
op             argument                                  at level 15   signed
=============  ========================================  ============  =======
Rotate_BBox    f·30 degrees                              45°           yes
Shear*_BBox    f·0.3 (shear factor, x' = x + s·y)        0.45          yes
Translate*     f·250 px · L/640, rounded to whole px     0.586·L       yes
Solarize       threshold int(f·256): v ≥ t → 255 − v     384 (no-op)   no
SolarizeAdd    addition int(f·110) to v < 128, clipped   165           no
Color          saturation factor f·1.8 + 0.1             2.8           no
Cutout         grey square of side 2·int(f·100 · L/640)  2·int(.234L)  no
Equalize       (none; PIL histogram equalisation)        –             no
=============  ========================================  ============  =======

A signed op's argument is negated with probability 0.5. L = max(height, width) of the image.
Sign conventions (immaterial, as the sign is random): positive translation
moves content right/down, positive shear maps x → x + s·y (ShearX) or y → y + s·x (ShearY) about
the top-left corner, positive rotation turns clockwise on screen about the image centre (the
reference's pivots: shear about the origin, rotation about the centre). Vacated pixels and the
Cutout square are grey (128), resampling is nearest-neighbour, as in the reference.

Where this departs from the reference, and why:

* Pixel constants scale with the image. The reference's 250-px translation and 100-px Cutout
  half-side were tuned on COCO images as decoded (long side 640: the EfficientDet input pipeline
  augments before resizing). Here both are ``const · L / 640``: identical on a 640-px image, and
  the same fraction of the image on any other (a 64-px image translates by 38 px at magnitude 15,
  not by 375 px, which would empty it). All other arguments are size-free and kept as they are.
* The op probability is used. The reference draws U(0.2, 0.8) per layer but discards it and
  always applies the chosen op; §11.1 says "applied with probability U(0.2, 0.8)", so it is.
* Boxes are dropped, not kept degenerate. The reference clips boxes and then widens zero-area
  ones; here boxes are clipped to the canvas and those narrower or lower than ``min_box_size``
  are dropped, on input and after every op (so a later rotation cannot revive a sliver), and
  the caller gets the survivors' indices to carry classes and weights along.
* Boxes are float pixels moved by torchvision (corners transformed, enclosing box, clamped), not
  integer-truncated as in the reference.

Kept from the reference on purpose: Solarize's threshold grows with the level, so from level
10 up it is ≥ 256, above every pixel value, and Solarize is the identity (at the default
magnitude the op set is, in effect, nine ops). SolarizeAdd is never negated.

All randomness comes from the numpy ``Generator`` passed in (op, probability, firing, sign,
Cutout centre), so a seed reproduces the output exactly; neither numpy's global RNG nor torch's
is touched. Images stay PIL RGB throughout: torchvision's v2 functionals run PIL's own C kernels
on them (the reference's ops are TF ports of those PIL ops), about 1–2 ms an op on a 640×480
image; boxes go through ``tv_tensors.BoundingBoxes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

MAX_LEVEL: Final = 10.0
REFERENCE_SIDE: Final = 640.0  # long side (px) the reference's pixel constants were tuned for
TRANSLATE_CONST: Final = 250.0
CUTOUT_CONST: Final = 100.0
SOLARIZE_ADD_THRESHOLD: Final = 128
FILL: Final = 128
OPS: Final[tuple[str, ...]] = (
    "Equalize",
    "Solarize",
    "Color",
    "Cutout",
    "SolarizeAdd",
    "TranslateX_BBox",
    "TranslateY_BBox",
    "ShearX_BBox",
    "ShearY_BBox",
    "Rotate_BBox",
)
SIGNED_OPS: Final = frozenset(
    ("TranslateX_BBox", "TranslateY_BBox", "ShearX_BBox", "ShearY_BBox", "Rotate_BBox")
)


def _pixels(fraction: float, const: float, long_side: int) -> float:
    """A reference pixel constant at ``fraction`` of its range, scaled to the image."""
    return fraction * const * long_side / REFERENCE_SIDE


_LEVEL_TO_ARG: Final[dict[str, Callable[[float, int], float]]] = {
    "Equalize": lambda f, side: 0.0,
    "Solarize": lambda f, side: float(int(f * 256)),
    "Color": lambda f, side: f * 1.8 + 0.1,
    "Cutout": lambda f, side: float(int(_pixels(f, CUTOUT_CONST, side))),
    "SolarizeAdd": lambda f, side: float(int(f * 110)),
    "TranslateX_BBox": lambda f, side: float(round(_pixels(f, TRANSLATE_CONST, side))),
    "TranslateY_BBox": lambda f, side: float(round(_pixels(f, TRANSLATE_CONST, side))),
    "ShearX_BBox": lambda f, side: f * 0.3,
    "ShearY_BBox": lambda f, side: f * 0.3,
    "Rotate_BBox": lambda f, side: f * 30.0,
}


def _check_op(name: str) -> None:
    if name not in _LEVEL_TO_ARG:
        raise ValueError(f"unknown augmentation op {name!r}; known ops: {', '.join(OPS)}")


def op_argument(name: str, level: float, negate: bool, long_side: int) -> float:
    """The argument of op ``name`` at ``level`` on an image whose longer side is ``long_side``.

    Degrees (Rotate), shear factor, pixels (Translate, Cutout half-side), threshold (Solarize),
    addition (SolarizeAdd) or saturation factor (Color); 0 for Equalize. ``negate`` flips the
    sign of the signed ops only. See the module docstring for the formulas.
    """
    _check_op(name)
    arg = _LEVEL_TO_ARG[name](level / MAX_LEVEL, long_side)
    return -arg if negate and name in SIGNED_OPS else arg


def _on_pil(kernel: Callable[..., Tensor], image: PIL.Image.Image, *args: Any) -> PIL.Image.Image:
    """Run a torchvision v2 functional on a PIL image (they dispatch on PIL images; their type
    hints only name tensors)."""
    return cast(PIL.Image.Image, kernel(image, *args))


@dataclass(frozen=True)
class _Affine:
    """An affine map in torchvision's terms: clockwise angle, pixel shift, shear in degrees,
    pivot (None: the image centre)."""

    angle: float = 0.0
    translate: tuple[float, float] = (0.0, 0.0)
    shear: tuple[float, float] = (0.0, 0.0)
    center: tuple[float, float] | None = None

    def __call__(
        self, image: PIL.Image.Image, boxes: np.ndarray
    ) -> tuple[PIL.Image.Image, np.ndarray]:
        """Warp the image and move the boxes by the same map (corners mapped, enclosing box
        taken, clamped to the canvas)."""
        center = None if self.center is None else list(self.center)
        shift, shear = list(self.translate), list(self.shear)
        fill = [float(FILL)] * len(image.getbands())
        nearest = InterpolationMode.NEAREST
        warped = _on_pil(F.affine, image, self.angle, shift, 1.0, shear, nearest, fill, center)
        xyxy = tv_tensors.BoundingBoxFormat.XYXY
        moved = F.affine(
            tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format=xyxy, canvas_size=(image.height, image.width)
            ),
            self.angle,
            shift,
            1.0,
            shear,
            center=center,
        )
        return warped, moved.as_subclass(Tensor).numpy()


def _shear_degrees(factor: float) -> float:
    """torchvision's shear angle for the map x → x + factor·y (its positive angles shear the
    other way)."""
    return -math.degrees(math.atan(factor))


_GEOMETRY: Final[dict[str, Callable[[float], _Affine]]] = {
    "TranslateX_BBox": lambda px: _Affine(translate=(px, 0.0)),
    "TranslateY_BBox": lambda px: _Affine(translate=(0.0, px)),
    "ShearX_BBox": lambda s: _Affine(shear=(_shear_degrees(s), 0.0), center=(0.0, 0.0)),
    "ShearY_BBox": lambda s: _Affine(shear=(0.0, _shear_degrees(s)), center=(0.0, 0.0)),
    "Rotate_BBox": lambda degrees: _Affine(angle=degrees),
}


def _solarize(
    image: PIL.Image.Image, threshold: float, rng: np.random.Generator
) -> PIL.Image.Image:
    """Invert pixels ≥ threshold; a threshold above 255 inverts nothing (as the reference's
    ``where``; torchvision refuses such thresholds on tensors)."""
    return image.copy() if threshold > 255 else _on_pil(F.solarize, image, threshold)


def _solarize_add(
    image: PIL.Image.Image, addition: float, rng: np.random.Generator
) -> PIL.Image.Image:
    """Add ``addition`` to pixel values below 128, clipped to [0, 255]; others stay (a lookup
    table, applied by PIL per channel)."""
    values = np.arange(256)
    lut = np.where(values < SOLARIZE_ADD_THRESHOLD, np.clip(values + int(addition), 0, 255), values)
    return image.point(lut.tolist() * len(image.getbands()))


def _cutout(image: PIL.Image.Image, half_side: float, rng: np.random.Generator) -> PIL.Image.Image:
    """Grey the square of side 2·half_side centred on a uniform pixel (row drawn first), cut by
    the borders."""
    cy, cx = int(rng.integers(image.height)), int(rng.integers(image.width))
    pad = int(half_side)
    top, left = max(0, cy - pad), max(0, cx - pad)
    bottom, right = min(image.height, cy + pad), min(image.width, cx + pad)
    grey = torch.full((len(image.getbands()), 1, 1), FILL, dtype=torch.uint8)
    return _on_pil(F.erase, image, top, left, bottom - top, right - left, grey)


_PIXEL: Final[
    dict[str, Callable[[PIL.Image.Image, float, np.random.Generator], PIL.Image.Image]]
] = {
    "Equalize": lambda image, arg, rng: _on_pil(F.equalize, image),
    "Solarize": _solarize,
    "Color": lambda image, factor, rng: _on_pil(F.adjust_saturation, image, factor),
    "Cutout": _cutout,
    "SolarizeAdd": _solarize_add,
}


def _as_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    """A float64 (n, 4) copy of ``boxes`` (any empty array reads as no boxes)."""
    out = np.array(boxes, dtype=np.float64)
    if out.size == 0:
        return out.reshape(0, 4)
    if out.ndim != 2 or out.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4), got {out.shape}")
    return out


def _run_op(
    name: str,
    image: PIL.Image.Image,
    boxes: np.ndarray,
    level: float,
    negate: bool,
    rng: np.random.Generator,
) -> tuple[PIL.Image.Image, np.ndarray]:
    """``apply_op`` on a checked RGB image and float64 (n, 4) boxes."""
    arg = op_argument(name, level, negate, max(image.size))
    if name in _GEOMETRY:
        return _GEOMETRY[name](arg)(image, boxes)
    return _PIXEL[name](image, arg, rng), boxes


def apply_op(
    name: str,
    image: PIL.Image.Image,
    boxes: np.ndarray,
    level: float,
    negate: bool,
    rng: np.random.Generator,
) -> tuple[PIL.Image.Image, np.ndarray]:
    """Apply op ``name`` at ``level`` (signed ops negated when ``negate``) to an image and its
    xyxy pixel boxes.

    Deterministic given its arguments; only Cutout draws from ``rng`` (its centre row, then
    column). Returns the new RGB image (same size) and one box per input box, float64, in the
    input's order: moved and clamped to the canvas by the geometric ops (possibly degenerate),
    unchanged by the others.

    Raises:
        ValueError: ``name`` is not one of ``OPS``, or ``boxes`` is not (n, 4).
    """
    _check_op(name)
    return _run_op(name, _as_rgb(image), _as_boxes(boxes), level, negate, rng)


@dataclass(frozen=True)
class OpDraw:
    """One layer's draws: the op, its probability, whether it fires, and its sign."""

    name: str
    prob: float
    applied: bool
    negate: bool


@dataclass(frozen=True)
class RandAugment:
    """Detection RandAugment (module docstring): ``num_layers`` ops, each picked uniformly from
    ``ops`` and applied at ``magnitude`` with a probability drawn from ``prob_range``."""

    num_layers: int = 1
    magnitude: float = 15.0
    prob_range: tuple[float, float] = (0.2, 0.8)
    ops: tuple[str, ...] = OPS
    min_box_size: float = 1.0

    def __post_init__(self) -> None:
        for name in self.ops:
            _check_op(name)
        if not self.ops:
            raise ValueError("RandAugment needs at least one op")
        lo, hi = self.prob_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"prob_range must satisfy 0 ≤ lo ≤ hi ≤ 1, got {self.prob_range}")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be ≥ 0, got {self.num_layers}")

    def draw(self, rng: np.random.Generator) -> OpDraw:
        """One layer's op, probability p ~ U(prob_range), firing (with probability p) and sign
        (negated with probability 0.5), drawn in that order."""
        name = self.ops[int(rng.integers(len(self.ops)))]
        prob = float(rng.uniform(*self.prob_range))
        applied = bool(rng.random() < prob)
        return OpDraw(name, prob, applied, negate=bool(rng.random() < 0.5))

    def _survivors(
        self, boxes: np.ndarray, keep: np.ndarray, canvas: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes clipped to the (H, W) canvas, less those under ``min_box_size`` on a side."""
        clipped = boxes.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0.0, canvas[1])
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0.0, canvas[0])
        sizes = clipped[:, 2:] - clipped[:, :2]
        alive = (sizes >= self.min_box_size).all(axis=1)
        return clipped[alive], keep[alive]

    def __call__(
        self, image: PIL.Image.Image, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[PIL.Image.Image, np.ndarray, np.ndarray]:
        """Augment an image and its xyxy pixel boxes.

        Returns:
            The RGB image (same size); the surviving boxes, (n_kept, 4) float64, clipped to the
            canvas with both sides ≥ ``min_box_size``; ``keep``, the int64 indices of the
            survivors in the input ``boxes`` (so classes and weights can follow). When no op
            fires, the image returned is the RGB input itself.
        """
        pixels = _as_rgb(image)
        canvas = (pixels.height, pixels.width)
        given = _as_boxes(boxes)
        out, keep = self._survivors(given, np.arange(len(given), dtype=np.int64), canvas)
        for _ in range(self.num_layers):
            layer = self.draw(rng)
            if layer.applied:
                pixels, out = _run_op(layer.name, pixels, out, self.magnitude, layer.negate, rng)
                out, keep = self._survivors(out, keep, canvas)
        return pixels, out, keep
