"""The pretraining set: UCI handwritten digits on canvases like digits-det's (issue 18).

scikit-learn ships 1,797 digits of the UCI "optical recognition of handwritten digits" set
(``sklearn.datasets.load_digits``: 8×8 grey levels 0..16, the counts of ink pixels in 4×4
blocks of a 32×32 bitmap). They are another handwriting collection than the MNIST digits that
digits-det is made of, so a backbone pretrained on them learns digit strokes without seeing
one digit of the benchmark. :func:`grid_code` and :func:`near_duplicates` check that claim: an
MNIST digit brought to UCI's 8×8 form lies far (in L1) from every UCI digit.

Each 8×8 digit is upsampled once to a 32×32 ink image (:func:`upsample`); a *view* of it is
one canvas of digits-det's renderer (:func:`detloop.data.digits.render_canvas`: light noisy
background, dark ink, brightness and tint jitter) holding that one digit at a random place and
size (longer side 16-48 px, digits-det's sizes, capped at the canvas: 16-32 px on the default
32 px canvas) with a random contrast. A stratified part of the digits is held out for measuring
accuracy. Pure numpy/PIL; everything derives from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from detloop import seeding
from detloop.data.digits import render_canvas

SOURCE: Final = "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)"
GRID: Final = 8  # side of a UCI digit
UPSAMPLED: Final = 32  # side of an upsampled digit (UCI's bitmaps were 32×32)
FAINT: Final = 24  # upsampled grey levels below this become background (ringing of bicubic)
HELDOUT_FRACTION: Final = 0.2
CANVAS: Final = 32  # a digit fills most of it: from scratch, larger canvases learn slowly
DIGIT_PX: Final = (16.0, 48.0)  # longer side of a digit in pixels, as in digits-det
CONTRAST: Final = (0.6, 1.0)  # contrast factor range around the canvas mean

U8 = NDArray[np.uint8]
I64 = NDArray[np.int64]


@dataclass(frozen=True)
class PretrainDigits:
    """The upsampled digits, their labels and the disjoint train / held-out indices."""

    digits: U8  # (N, 32, 32), ink high
    labels: I64  # (N,) 0..9
    train: I64
    heldout: I64


def load_uci_digits() -> tuple[U8, I64]:
    """The 1,797 UCI digits as ``(N, 8, 8)`` uint8 (0..16, ink high) and their labels.

    Read from the data files inside the installed scikit-learn; nothing is downloaded.
    """
    from sklearn.datasets import load_digits  # a second to import: only when needed

    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


def upsample(grid: U8) -> U8:
    """One 8×8 digit (0..16) → a 32×32 uint8 ink image (0..255), bicubic, faint ringing cut."""
    img = Image.fromarray(grid.astype(np.float32) * np.float32(255.0 / 16.0))  # mode F
    out = np.clip(np.asarray(img.resize((UPSAMPLED, UPSAMPLED), Image.Resampling.BICUBIC)), 0, 255)
    out[out < FAINT] = 0
    return np.asarray(out, dtype=np.uint8)


def split_heldout(labels: I64, seed: int, fraction: float = HELDOUT_FRACTION) -> tuple[I64, I64]:
    """Disjoint (train, held-out) indices, stratified by class, sorted."""
    rng = seeding.rng(seed, None, "pretrain-split")
    train: list[I64] = []
    held: list[I64] = []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_held = round(len(idx) * fraction)
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load_pretrain_digits(seed: int, fraction: float = HELDOUT_FRACTION) -> PretrainDigits:
    """The upsampled UCI digits with a seeded stratified held-out part."""
    grids, labels = load_uci_digits()
    train, held = split_heldout(labels, seed, fraction)
    return PretrainDigits(np.stack([upsample(g) for g in grids]), labels, train, held)


def render_views(
    digits: U8,
    rng: np.random.Generator,
    canvas: int = CANVAS,
    digit_px: tuple[float, float] = DIGIT_PX,
    contrast: tuple[float, float] = CONTRAST,
) -> U8:
    """One canvas per digit: ``(n, canvas, canvas, 3)`` uint8 RGB, dark ink on light noise.

    A digit's longer side is drawn from ``digit_px``, capped at the canvas side.
    """
    sizes = (min(digit_px[0], canvas), min(digit_px[1], canvas))
    out = np.empty((len(digits), canvas, canvas, 3), np.uint8)
    for i, digit in enumerate(digits):
        rgb, _ = render_canvas([digit], canvas, rng, digit_px=sizes)
        img = rgb.astype(np.float32)
        mean = img.mean()
        img = mean + (img - mean) * rng.uniform(*contrast)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def views(
    data: PretrainDigits, part: str, seed: int, epoch: int | None, canvas: int = CANVAS
) -> tuple[U8, I64]:
    """Views of the ``train`` or ``heldout`` digits and their labels.

    Each training epoch gets its own views (``epoch``); the held-out views are drawn once
    (``epoch=None``), so accuracy is measured on the same images whatever the schedule.
    """
    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', got {part!r}")
    idx = data.train if part == "train" else data.heldout
    rng = seeding.rng(seed, epoch, f"pretrain-views-{part}")
    return render_views(data.digits[idx], rng, canvas), data.labels[idx]


# ---- disjointness from digits-det --------------------------------------------------------------
def grid_code(digit: NDArray[np.generic]) -> I64:
    """Any ink-high digit image → UCI's 8×8 form: the ink box fitted (aspect kept) and centred
    into 32×32, binarised at 30 % of the peak, ink pixels counted in 4×4 blocks (0..16).

    UCI made its 8×8 digits so from size-normalised 32×32 bitmaps. In this form MNIST digits
    are comparable with UCI's: a UCI digit's nearest MNIST digit has its class 7 times in 10,
    and they carry as much ink on average (about 320 of 1,024 pixels).
    """
    img = digit.astype(np.float32)
    img = img / max(float(img.max()), 1e-6)
    rows, cols = np.flatnonzero(img.max(1) > 0.25), np.flatnonzero(img.max(0) > 0.25)
    if len(rows) == 0:
        return np.zeros((GRID, GRID), np.int64)
    crop = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    factor = UPSAMPLED / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * factor)), max(1, round(crop.shape[1] * factor))
    fitted = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))
    bitmap = np.zeros((UPSAMPLED, UPSAMPLED), np.int64)
    y, x = (UPSAMPLED - h) // 2, (UPSAMPLED - w) // 2
    bitmap[y : y + h, x : x + w] = fitted > 0.3
    block = UPSAMPLED // GRID
    return np.asarray(bitmap.reshape(GRID, block, GRID, block).sum(axis=(1, 3)), dtype=np.int64)


def near_duplicates(
    codes_a: NDArray[np.integer], codes_b: NDArray[np.integer], max_l1: int
) -> list[tuple[int, int, int]]:
    """Pairs (i, j, L1) of 8×8 codes of ``a`` and ``b`` at most ``max_l1`` apart (sum of
    absolute block differences; no two of UCI's 1,797 digits are closer than 16).
    """
    a = codes_a.reshape(len(codes_a), -1).astype(np.int16)
    b = codes_b.reshape(len(codes_b), -1).astype(np.int16)
    found: list[tuple[int, int, int]] = []
    for start in range(0, len(a), 256):  # (256, len(b), 64) int16 at a time
        dist = np.abs(a[start : start + 256, None, :] - b[None, :, :]).sum(-1, dtype=np.int32)
        for i, j in zip(*np.nonzero(dist <= max_l1), strict=True):
            found.append((start + int(i), int(j), int(dist[i, j])))
    return found
