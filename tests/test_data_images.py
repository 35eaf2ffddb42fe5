"""Image helpers: existence check by directory listing, decoding, perceptual hashes."""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageFilter

from detloop.data.images import decode_image, decode_images, find_images, hash_image, missing_files


def _save(path: Path, seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)  # smooth structure, hashable
    img = Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def test_missing_files_matches_stat(tmp_path: Path) -> None:
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a" / "dir.png").mkdir()
    names = ["a/1.png", "a/2.png", "a/9.png", "b/3.png", "c/4.png", "a/dir.png"]
    files = [str(tmp_path / n) for n in names]
    expected = [not Path(f).is_file() for f in files]
    assert missing_files(files).tolist() == expected == [False, False, True, False, True, True]


def test_hash_is_64_bit_and_matches_imagehash(tmp_path: Path) -> None:
    img = _save(tmp_path / "x.png", 0)
    h = hash_image(img)
    assert 0 <= h < 2**64
    ref = imagehash.phash(img.convert("L").resize((512, 256)), hash_size=8)
    assert f"{h:016x}" == str(ref)
    wavelet = imagehash.whash(img.convert("L").resize((512, 256)), hash_size=8)
    assert f"{hash_image(img, 'w'):016x}" == str(wavelet) != str(ref)


@pytest.mark.parametrize("method", ["p", "w"])
def test_al_hash_method_chooses_the_stored_pool_hash(tmp_path: Path, method: str) -> None:
    """``al.hash_method`` reaches the import: the pool's ``phash`` column holds that hash."""
    from detloop.config import build_config
    from detloop.data.rundir import RunDir
    from detloop.orchestrator.engine.runs import import_data

    saved = {f"pool/{k}": _save(tmp_path / "pool" / f"{k}.png", k) for k in range(3)}
    cfg = build_config(
        {"data": {"pool": {"format": "folder", "source": str(tmp_path / "pool")}}},
        [f"al.hash_method={method}"],
    )
    run = RunDir(tmp_path / "run")
    import_data(run, cfg)
    images = run.read_images()
    stored = dict(zip(images["image_id"].to_pylist(), images["phash"].to_pylist(), strict=True))
    assert stored == {iid: hash_image(img, method) for iid, img in saved.items()}


def test_near_duplicates_hash_close_and_others_far(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.png", 1)
    blurred = a.filter(ImageFilter.GaussianBlur(1))
    other = _save(tmp_path / "b.png", 2)

    def dist(x: Image.Image, y: Image.Image) -> int:
        return (hash_image(x) ^ hash_image(y)).bit_count()

    assert dist(a, a.resize((200, 150))) <= 4
    assert dist(a, blurred) <= 4
    assert dist(a, other) >= 16
    assert hash_image(a, "w") != hash_image(a, "p")


def test_decode_catches_corrupt_and_truncated_files(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _save(good, 3)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff junk")
    ok = decode_image(good, with_hash=True)
    assert (ok.width, ok.height, ok.error) == (96, 64, None) and ok.phash is not None
    assert decode_image(good, with_hash=False).phash is None
    assert "cannot decode" in (decode_image(tmp_path / "trunc.png", False).error or "")
    assert "cannot decode" in (decode_image(tmp_path / "junk.jpg", False).error or "")
    assert decode_image(tmp_path / "none.png", False).error == "image file not found"


@pytest.mark.slow
def test_process_pool_decoding_keeps_order(tmp_path: Path) -> None:
    files = []
    for k in range(20):
        _save(tmp_path / f"{k:02d}.png", k, size=(40 + k, 30))
        files.append(tmp_path / f"{k:02d}.png")
    results = decode_images(files, [True] * 20, workers=2)  # worker processes
    assert [r.width for r in results] == [40 + k for k in range(20)]
    serial = decode_images(files, [True] * 20, workers=1)
    assert [r.phash for r in results] == [r.phash for r in serial]
    assert find_images(tmp_path) == files
