"""digits-det: sizes, determinism, split disjointness, tight boxes, class imbalance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from detloop.data.digits import (
    INK_THRESHOLD,
    class_probabilities,
    load_mnist,
    make_digits,
    split_digits,
)
from detloop.data.errors import DataError


def _load(root: Path, split: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / f"{split}.json").read_text())
    return doc


def test_tiny_has_the_documented_layout(digits_tiny: Path) -> None:
    for split, n in (("pool", 64), ("val", 32), ("test", 32)):
        doc = _load(digits_tiny, split)
        assert len(doc["images"]) == n
        assert [c["name"] for c in doc["categories"]] == [str(k) for k in range(10)]
        assert [c["id"] for c in doc["categories"]] == list(range(1, 11))
        per_image = np.bincount([a["image_id"] for a in doc["annotations"]], minlength=n + 1)
        assert per_image[1:].min() >= 1 and per_image.max() <= 5
        for img in doc["images"][:3]:
            im = Image.open(digits_tiny / "images" / split / img["file_name"])
            assert im.mode == "RGB" and im.size == (128, 128)


def test_boxes_are_tight_and_do_not_overlap(digits_tiny: Path) -> None:
    doc = _load(digits_tiny, "pool")
    by_image: dict[int, list[list[float]]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
        assert 4 <= max(w, h) <= 48 and a["area"] == w * h
    for boxes in by_image.values():
        for i, (x1, y1, w1, h1) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1 :]:
                assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1
    # the ink is dark on a light background: inside a box is darker than the canvas mean
    img = doc["images"][0]
    pixels = np.asarray(Image.open(digits_tiny / "images/pool" / img["file_name"]), np.float64)
    x, y, w, h = (int(v) for v in by_image[img["id"]][0])
    assert pixels[y : y + h, x : x + w].min() < pixels.mean() - 60


def test_test_digits_are_never_in_the_pool(digits_tiny: Path) -> None:
    used = {
        s: {a["mnist_index"] for a in _load(digits_tiny, s)["annotations"]}
        for s in ("pool", "val", "test")
    }
    assert not used["pool"] & used["test"]
    assert not used["pool"] & used["val"] and not used["val"] & used["test"]
    _, labels = load_mnist()
    parts = split_digits(labels, seed=0)
    for split, indices in used.items():
        allowed = set(np.concatenate(list(parts[split].values())).tolist())
        assert indices <= allowed
    everything = [np.concatenate(list(parts[s].values())) for s in ("pool", "val", "test")]
    assert sorted(np.concatenate(everything).tolist()) == list(range(5000))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, digits_tiny: Path) -> None:
    counts = (6, 3, 3)
    make_digits(tmp_path / "a", seed=0, counts=counts)
    make_digits(tmp_path / "b", seed=0, counts=counts)
    make_digits(tmp_path / "c", seed=1, counts=counts)
    for split in ("pool", "val", "test"):
        assert (
            _load(tmp_path / "a", split)["annotations"]
            == _load(tmp_path / "b", split)["annotations"]
        )
        a = (tmp_path / "a" / "images" / split / "000001.png").read_bytes()
        assert a == (tmp_path / "b" / "images" / split / "000001.png").read_bytes()
        assert a != (tmp_path / "c" / "images" / split / "000001.png").read_bytes()
    # the first canvases of a bigger dataset with the same seed are the same canvases
    assert _load(tmp_path / "a", "pool")["images"] == _load(digits_tiny, "pool")["images"][:6]


def test_imbalance_knob() -> None:
    assert np.allclose(class_probabilities(1.0), 0.1)
    p = class_probabilities(0.5)
    assert np.isclose(p.sum(), 1) and np.allclose(p[1:] / p[:-1], 0.5)
    with pytest.raises(DataError, match="positive"):
        class_probabilities(0)


def test_imbalanced_dataset_and_canvas(tmp_path: Path) -> None:
    make_digits(tmp_path, seed=3, imbalance=0.5, canvas=64, counts=(60, 2, 2))
    doc = _load(tmp_path, "pool")
    classes = np.bincount([a["category_id"] - 1 for a in doc["annotations"]], minlength=10)
    assert classes[0] > classes[3] > classes[6:].sum()
    assert {(i["width"], i["height"]) for i in doc["images"]} == {(64, 64)}
    assert max(max(a["bbox"][2:]) for a in doc["annotations"]) <= 24


def test_balanced_test_split(tmp_path: Path) -> None:
    """``balanced_test``: a long-tailed pool and val as without it (the same files), and a test
    split whose classes are drawn uniformly, so the rare classes have test boxes to score."""
    counts = (40, 20, 300)
    make_digits(tmp_path / "lt", seed=3, imbalance=0.5, canvas=64, counts=counts)
    make_digits(
        tmp_path / "bt", seed=3, imbalance=0.5, canvas=64, counts=counts, balanced_test=True
    )
    for split in ("pool", "val"):
        assert (tmp_path / "lt" / f"{split}.json").read_bytes() == (
            tmp_path / "bt" / f"{split}.json"
        ).read_bytes()
    boxes = {
        d: np.bincount(
            [a["category_id"] - 1 for a in _load(tmp_path / d, "test")["annotations"]], minlength=10
        )
        for d in ("lt", "bt")
    }
    assert boxes["lt"][7:].sum() < 0.02 * boxes["lt"].sum()  # r = 0.5: '7'-'9' ~1.2 % of boxes
    n = boxes["bt"].sum()
    assert boxes["bt"].min() >= 0.07 * n and boxes["bt"].max() <= 0.13 * n  # ~10 % each
    assert _load(tmp_path / "bt", "test")["info"]["imbalance"] == 1.0
    assert _load(tmp_path / "bt", "pool")["info"]["imbalance"] == 0.5


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown size 'huge'"):
        make_digits(tmp_path, "huge")
    with pytest.raises(DataError, match="at least 32"):
        make_digits(tmp_path, "tiny", canvas=16)


def test_ink_threshold_is_a_fraction() -> None:
    assert 0 < INK_THRESHOLD < 1
