"""Box-aware RandAugment of pseudo-labelled images (ALGORITHMS §11.1, learners/box_augment.py).

Geometric ops are checked against boxes transformed by hand (numpy corner maps) and against the
white pixels of a white rectangle drawn on black; pixel ops against their formulas on hand
images; RandAugment for dropping, reproducibility and its op probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch

from detloop.learners.box_augment import OPS, RandAugment, apply_op, op_argument

SIZE = 64
RECT = np.array([10.0, 20.0, 30.0, 40.0])  # xyxy: columns 10..29, rows 20..39


def rect_image(box: np.ndarray = RECT, size: int = SIZE) -> PIL.Image.Image:
    """A black square image with ``box`` filled white."""
    pixels = np.zeros((size, size, 3), np.uint8)
    x1, y1, x2, y2 = box.astype(int)
    pixels[y1:y2, x1:x2] = 255
    return PIL.Image.fromarray(pixels)


def white_box(image: PIL.Image.Image) -> np.ndarray:
    """The xyxy box enclosing the pure-white pixels."""
    ys, xs = np.nonzero((np.asarray(image) == 255).all(axis=2))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def corners(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float64)


def enclosing(points: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Enclosing xyxy box of points, clamped to a size×size canvas."""
    return np.concatenate([points.min(axis=0), points.max(axis=0)]).clip(0, size)


def sheared(box: np.ndarray, s: float, axis: int) -> np.ndarray:
    """Shear about the origin: x → x + s·y (axis 0) or y → y + s·x (axis 1)."""
    pts = corners(box)
    pts[:, axis] += s * pts[:, 1 - axis]
    return enclosing(pts)


def rotated(box: np.ndarray, degrees: float) -> np.ndarray:
    """Clockwise on screen (y down) about the image centre."""
    t = math.radians(degrees)
    d = corners(box) - SIZE / 2
    x = d[:, 0] * math.cos(t) - d[:, 1] * math.sin(t)
    y = d[:, 0] * math.sin(t) + d[:, 1] * math.cos(t)
    return enclosing(np.stack([x, y], axis=1) + SIZE / 2)


def run(
    name: str, level: float, negate: bool, image: PIL.Image.Image | None = None
) -> tuple[PIL.Image.Image, np.ndarray]:
    """``apply_op`` on ``image`` (default: the white rectangle) with the one box RECT."""
    img = rect_image() if image is None else image
    return apply_op(name, img, RECT[None], level, negate, np.random.default_rng(0))


# Level 4 on a 64-px image: 4/10 · 250 px · 64/640 = 10 px. Level 5: shear 0.15, rotation 15°.
SHIFT_X, SHIFT_Y = np.array([10.0, 0, 10, 0]), np.array([0.0, 10, 0, 10])
GEOMETRY_CASES = [
    ("TranslateX_BBox", 4, False, RECT + SHIFT_X),
    ("TranslateX_BBox", 4, True, RECT - SHIFT_X),
    ("TranslateY_BBox", 4, False, RECT + SHIFT_Y),
    ("TranslateY_BBox", 4, True, RECT - SHIFT_Y),
    ("ShearX_BBox", 5, False, sheared(RECT, 0.15, 0)),
    ("ShearX_BBox", 5, True, sheared(RECT, -0.15, 0)),
    ("ShearY_BBox", 5, False, sheared(RECT, 0.15, 1)),
    ("ShearY_BBox", 5, True, sheared(RECT, -0.15, 1)),
    ("Rotate_BBox", 5, False, rotated(RECT, 15.0)),
    ("Rotate_BBox", 5, True, rotated(RECT, -15.0)),
]


@pytest.mark.parametrize(("name", "level", "negate", "expected"), GEOMETRY_CASES)
def test_geometric_op_moves_box_with_pixels(
    name: str, level: float, negate: bool, expected: np.ndarray
) -> None:
    out, boxes = run(name, level, negate)
    assert out.size == (SIZE, SIZE) and out.mode == "RGB"
    np.testing.assert_allclose(boxes, expected[None], atol=1e-6)
    # the box encloses the moved white pixels, tightly (nearest resampling: within 1.5 px)
    assert np.abs(white_box(out) - boxes[0]).max() <= 1.5


def test_hand_cases_are_what_they_claim() -> None:
    """The hand formulas themselves, on numbers worked out on paper."""
    np.testing.assert_allclose(sheared(RECT, 0.15, 0), [13, 20, 36, 40])
    np.testing.assert_allclose(sheared(RECT, 0.15, 1), [10, 21.5, 30, 44.5])
    c, s = math.cos(math.radians(15)), math.sin(math.radians(15))
    # left edge's bottom corner (-22, 8) from the centre → x = -22c - 8s; top-left (-22, -12)
    # → y = -22s - 12c
    np.testing.assert_allclose(rotated(RECT, 15)[:2], [32 - 22 * c - 8 * s, 32 - 22 * s - 12 * c])


def test_translation_vacates_grey() -> None:
    out, _ = run("TranslateX_BBox", 4, False)
    pixels = np.asarray(out)
    assert (pixels[:, :10] == 128).all() and (pixels[:, 10:] != 128).all()


def test_argument_table_at_default_magnitude() -> None:
    """Reference level_to_arg at level 15; pixel constants scale with the long side / 640."""
    expected = {
        "Rotate_BBox": 45.0,
        "ShearX_BBox": 0.45,
        "ShearY_BBox": 0.45,
        "TranslateX_BBox": 375.0,
        "TranslateY_BBox": 375.0,
        "Solarize": 384.0,
        "SolarizeAdd": 165.0,
        "Color": 2.8,
        "Cutout": 150.0,
        "Equalize": 0.0,
    }
    assert set(expected) == set(OPS)
    for name, value in expected.items():
        assert op_argument(name, 15, False, 640) == pytest.approx(value), name
        signed = -value if name.endswith("_BBox") else value
        assert op_argument(name, 15, True, 640) == pytest.approx(signed), name
    assert op_argument("TranslateX_BBox", 15, False, 64) == 38.0  # 37.5 px, whole pixels
    assert op_argument("Cutout", 15, False, 64) == 15.0
    assert op_argument("Rotate_BBox", 15, False, 64) == 45.0  # size-free


def gradient_image() -> PIL.Image.Image:
    """16×16 image holding every value 0..255 once per channel (channels offset)."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return PIL.Image.fromarray(np.stack([values, values[::-1], values.T], axis=2))


@pytest.mark.parametrize("level", [2, 5, 15])
def test_solarize_inverts_pixels_at_or_above_threshold(level: float) -> None:
    before = np.asarray(gradient_image()).astype(int)
    out, boxes = run("Solarize", level, True, gradient_image())
    threshold = int(level / 10 * 256)  # 51, 128, 384 (above every pixel: the identity)
    expected = np.where(before >= threshold, 255 - before, before)
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(boxes, RECT[None])
    assert (expected != before).any() == (threshold <= 255)


@pytest.mark.parametrize("level", [5, 15])
def test_solarize_add_adds_below_128_only_clipped(level: float) -> None:
    before = np.asarray(gradient_image()).astype(int)
    out, boxes = run("SolarizeAdd", level, True, gradient_image())
    addition = int(level / 10 * 110)  # 55, 165 (clips: 127 + 165 > 255); never negated
    expected = np.where(before < 128, np.minimum(before + addition, 255), before)
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(boxes, RECT[None])


def test_equalize_stretches_a_two_level_image() -> None:
    pixels = np.full((32, 32, 3), 50, np.uint8)
    pixels[:, 16:] = 100  # half 50, half 100: PIL's equalize maps them to 0 and 255
    out, boxes = run("Equalize", 15, False, PIL.Image.fromarray(pixels))
    result = np.asarray(out)
    assert (result[:, :16] == 0).all() and (result[:, 16:] == 255).all()
    np.testing.assert_array_equal(boxes, RECT[None])


@pytest.mark.parametrize("level", [0, 10])
def test_color_blends_with_grey(level: float) -> None:
    rgb = np.array([[[200, 100, 50], [20, 240, 90], [77, 77, 77], [0, 0, 255]]], np.uint8)
    out, boxes = run("Color", level, False, PIL.Image.fromarray(rgb))
    factor = level / 10 * 1.8 + 0.1  # 0.1 (almost grey), 1.9 (over-saturated, clipped)
    grey = (rgb.astype(float) @ [0.299, 0.587, 0.114])[..., None]
    expected = np.clip(grey + factor * (rgb - grey), 0, 255)
    assert np.abs(np.asarray(out) - expected).max() <= 1.0
    np.testing.assert_array_equal(boxes, RECT[None])


def test_cutout_greys_a_square_at_the_drawn_place() -> None:
    pad = 10  # level 10 on 64 px: 100 · 64/640
    image = PIL.Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8))
    places = set()
    for seed in range(8):
        out, boxes = apply_op("Cutout", image, RECT[None], 10, False, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)
        cy, cx = int(replay.integers(SIZE)), int(replay.integers(SIZE))
        places.add((cy, cx))
        expected = np.full((SIZE, SIZE, 3), 200)
        expected[max(0, cy - pad) : cy + pad, max(0, cx - pad) : cx + pad] = 128
        np.testing.assert_array_equal(np.asarray(out), expected)
        np.testing.assert_array_equal(boxes, RECT[None])
    assert len(places) > 1


def test_translation_drops_boxes_pushed_out() -> None:
    # ±38 px (level 15 on 64 px): box 1 leaves either way; boxes 0 and 2 keep ≥ 6 px either way
    boxes = np.array([[0, 5, 64, 15], [26, 20, 38, 30], [20, 40, 44, 50]], np.float64)
    image = PIL.Image.new("RGB", (SIZE, SIZE))
    signs = set()
    for seed in range(10):
        augment = RandAugment(ops=("TranslateX_BBox",), prob_range=(1.0, 1.0))
        t = -38.0 if augment.draw(np.random.default_rng(seed)).negate else 38.0
        signs.add(t)
        _, kept, keep = augment(image, boxes, np.random.default_rng(seed))
        np.testing.assert_array_equal(keep, [0, 2])
        expected = (boxes[[0, 2]] + [t, 0, t, 0]).clip(0, SIZE)
        np.testing.assert_allclose(kept, expected)
        strict = RandAugment(ops=("TranslateX_BBox",), prob_range=(1.0, 1.0), min_box_size=7)
        _, kept, keep = strict(image, boxes, np.random.default_rng(seed))
        np.testing.assert_array_equal(keep, [0])  # box 2 keeps only 6 px
    assert signs == {38.0, -38.0}


def random_scene(seed: int = 0) -> tuple[PIL.Image.Image, np.ndarray]:
    """A noise image 80 wide, 48 high, and six boxes inside it."""
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    xy = rng.uniform(0, 1, (6, 2)) * [50, 20]
    return image, np.concatenate([xy, xy + rng.uniform(4, [30, 28], (6, 2))], axis=1)


def global_numpy_state() -> np.ndarray:
    """Key and position of numpy's global (legacy) generator."""
    state = np.random.get_state(legacy=False)["state"]
    return np.append(state["key"], state["pos"])


def test_same_seed_same_output_and_no_global_rng() -> None:
    image, boxes = random_scene()
    augment = RandAugment()
    np_state, torch_state = global_numpy_state(), torch.get_rng_state().clone()
    outputs = []
    for seed in range(30):
        a = augment(image, boxes, np.random.default_rng(seed))
        b = augment(image, boxes, np.random.default_rng(seed))
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
        assert a[0].size == image.size and a[2].dtype == np.int64
        outputs.append(np.asarray(a[0]).tobytes())
    assert len(set(outputs)) > 5  # the seed matters
    np.testing.assert_array_equal(global_numpy_state(), np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_op_probabilities_lie_in_range_and_are_used() -> None:
    augment = RandAugment()
    draws = [augment.draw(np.random.default_rng(seed)) for seed in range(3000)]
    probs = np.array([d.prob for d in draws])
    assert probs.min() >= 0.2 and probs.max() <= 0.8
    assert probs.min() < 0.22 and probs.max() > 0.78
    assert abs(np.mean([d.applied for d in draws]) - 0.5) < 0.04
    assert abs(np.mean([d.negate for d in draws]) - 0.5) < 0.04
    assert {d.name for d in draws} == set(OPS)


def test_call_applies_the_drawn_op_with_its_sign() -> None:
    image, boxes = random_scene(1)
    augment = RandAugment()
    fired = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        draw = augment.draw(rng)
        expected_image, expected = image, boxes
        if draw.applied:
            fired += 1
            expected_image, expected = apply_op(draw.name, image, boxes, 15, draw.negate, rng)
        out, kept, keep = augment(image, boxes, np.random.default_rng(seed))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected_image))
        np.testing.assert_allclose(kept, expected[keep].clip(0, [80, 48, 80, 48]))
    assert 0 < fired < 40


def test_never_fires_at_probability_zero_but_clips_the_input() -> None:
    image, boxes = random_scene(2)
    outside = np.array([[70, 40, 90, 60], [85, 0, 95, 10]], np.float64)  # overhangs, outside
    augment = RandAugment(prob_range=(0.0, 0.0), num_layers=3)
    for seed in range(10):
        out, kept, keep = augment(image, np.vstack([boxes, outside]), np.random.default_rng(seed))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(image))
        np.testing.assert_array_equal(kept, np.vstack([boxes, [[70, 40, 80, 48]]]))
        np.testing.assert_array_equal(keep, np.arange(7))


def test_unknown_op_is_named() -> None:
    with pytest.raises(ValueError, match="Posterize"):
        apply_op("Posterize", rect_image(), RECT[None], 5, False, np.random.default_rng(0))
    with pytest.raises(ValueError, match="Sharpness"):
        RandAugment(ops=("Equalize", "Sharpness"))
