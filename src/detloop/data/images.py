"""Image files: cheap existence checks, header sizes, full decode checks and perceptual hashes.

The existence check of a whole dataset lists each referenced directory once (``os.scandir``)
instead of calling ``stat`` per file, so checking 100,000 files costs a few directory reads.
Decoding (which also catches truncated files) and hashing is a separate, slower pass
(``decode_images``), optionally in worker processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
HASH_SIZE = (512, 256)  # (width, height) the image is resized to before hashing (ALGORITHMS §9.5)

HashMethod = Literal["p", "w"]


def missing_files(files: Sequence[str]) -> np.ndarray:
    """Boolean mask of ``files`` (absolute paths) that are not existing regular files.

    Lists each distinct parent directory once with ``os.scandir`` rather than calling ``stat``
    per file: checking 100,000 files in a few directories takes a fraction of a second.
    """
    present: set[str] = set()
    for directory in {os.path.dirname(f) for f in files}:
        try:
            with os.scandir(directory) as it:
                present.update(e.path for e in it if e.is_file())
        except OSError:
            continue
    return np.fromiter((f not in present for f in files), dtype=bool, count=len(files))


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively, hidden entries skipped), sorted."""
    out: list[Path] = []
    stack = [root]
    while stack:
        directory = stack.pop()
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append(Path(entry.path))
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    out.append(Path(entry.path))
    return sorted(out)


def header_size(path: Path) -> tuple[int, int]:
    """Width and height from the image header (no pixel decoding).

    Raises:
        OSError: the file is missing or not an image Pillow can identify.
    """
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except UnidentifiedImageError as exc:
        raise OSError(f"not a readable image ({exc})") from exc


def hash_image(image: Image.Image, method: HashMethod = "p") -> int:
    """64-bit perceptual hash of ``image`` resized to 512×256, as an unsigned integer.

    ``p`` is the DCT hash (``imagehash.phash``), ``w`` the wavelet hash; both 8×8 bits, read
    row by row, most significant bit first.
    """
    small = image.convert("L").resize(HASH_SIZE)
    h = imagehash.phash(small, hash_size=8) if method == "p" else imagehash.whash(small, 8)
    bits = np.asarray(h.hash, dtype=bool).reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@dataclass(frozen=True)
class Decoded:
    """Outcome of decoding one image: its size and hash, or why it failed."""

    width: int = 0
    height: int = 0
    phash: int | None = None
    error: str | None = None


def decode_image(path: Path, with_hash: bool, method: HashMethod = "p") -> Decoded:
    """Fully decode ``path`` (catching truncated and corrupt files) and hash it on request."""
    try:
        with Image.open(path) as im:
            im.load()
            ph = hash_image(im, method) if with_hash else None
            return Decoded(int(im.width), int(im.height), ph)
    except FileNotFoundError:
        return Decoded(error="image file not found")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        # Pillow raises OSError for truncated data, SyntaxError for some broken headers.
        return Decoded(error=f"cannot decode image: {exc}")
    except Image.DecompressionBombError as exc:
        return Decoded(error=f"image too large to decode safely: {exc}")


def _decode_one(item: tuple[Path, bool, HashMethod]) -> Decoded:
    return decode_image(*item)


def decode_images(
    files: Sequence[Path],
    with_hash: Sequence[bool],
    *,
    method: HashMethod = "p",
    workers: int | None = None,
) -> list[Decoded]:
    """Decode (and optionally hash) many images, results in input order.

    Decoding and hashing hold the GIL for much of their time (threads do not help), so
    parallel work uses processes, started with ``spawn`` (safe beside threads of torch or Ray
    in the caller; the caller's main module must be importable, as for any ``spawn`` pool).

    Args:
        files: image paths.
        with_hash: per file, whether to compute its perceptual hash.
        method: hash method (``p`` DCT, ``w`` wavelet).
        workers: processes; 1 (the default) decodes in this process.
    """
    if len(files) != len(with_hash):
        raise ValueError("files and with_hash must have the same length")
    items = [(Path(f), bool(h), method) for f, h in zip(files, with_hash, strict=True)]
    if workers is None or workers <= 1 or len(items) < 2:
        return [_decode_one(item) for item in items]
    chunk = max(1, min(256, len(items) // (4 * workers)))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_decode_one, items, chunksize=chunk))
