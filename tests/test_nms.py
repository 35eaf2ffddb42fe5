"""NMS returning kept indices (ALGORITHMS §3, "Tests that pin it" (a)–(c))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detloop.learners.nms import select_detections

torch.set_num_threads(1)


def iou_np(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with many, float64."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def nms_reference(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float, max_out: int
) -> list[int]:
    """Greedy hard NMS per class, merged by score."""
    kept: list[int] = []
    for c in np.unique(classes):
        idx = [int(i) for i in np.flatnonzero(classes == c)[np.argsort(-scores[classes == c])]]
        while idx:
            best, rest = idx[0], np.array(idx[1:], dtype=int)
            kept.append(best)
            idx = [int(i) for i in rest[iou_np(boxes[best], boxes[rest]) <= thr]] if idx[1:] else []
    return sorted(kept, key=lambda i: -scores[i])[:max_out]


def soft_nms_reference(
    boxes: np.ndarray, scores: np.ndarray, sigma: float, max_out: int, thr: float
) -> tuple[list[int], list[float]]:
    """Gaussian soft-NMS written as the loop of §3, float64."""
    s = scores.astype(np.float64).copy()
    remaining = [i for i in range(len(s)) if s[i] >= thr]
    order, out = [], []
    while remaining and len(order) < max_out:
        best = max(remaining, key=lambda i: (s[i], -i))
        order.append(best)
        out.append(s[best])
        remaining.remove(best)
        for i in remaining:
            s[i] *= math.exp(-(iou_np(boxes[best], boxes[[i]])[0] ** 2) / sigma)
        remaining = [i for i in remaining if s[i] >= thr]
    return order, out


def clustered_boxes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes jittered around a few centres (so they overlap), random scores and 3 classes."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(50, 400, size=(6, 2))
    c = centres[rng.integers(0, 6, n)] + rng.normal(0, 12, (n, 2))
    wh = rng.uniform(20, 80, size=(n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    scores = ((rng.permutation(n) + 0.5) / n).astype(np.float32)  # distinct: no tie order
    return boxes, scores, rng.integers(0, 3, n)


def select(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, **kw: object):  # type: ignore[no-untyped-def]
    idx, out = select_detections(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes).long(), **kw
    )
    assert idx.dtype == torch.long and out.dtype == torch.float32
    return idx.numpy(), out.numpy()


@pytest.mark.parametrize(("n", "seed", "max_out"), [(300, 0, 100), (2000, 1, 100), (500, 2, 7)])
def test_hard_equals_per_class_reference(n: int, seed: int, max_out: int) -> None:
    boxes, scores, classes = clustered_boxes(n, seed)
    idx, out = select(boxes, scores, classes, max_output=max_out, score_thresh=0.0)
    expected = nms_reference(boxes, scores, classes, 0.5, max_out)
    assert idx.tolist() == expected
    np.testing.assert_array_equal(out, scores[idx])
    assert np.all(np.diff(out) <= 0)


def test_hard_drops_low_scores_first() -> None:
    boxes, scores, classes = clustered_boxes(400, 3)
    idx, _ = select(boxes, scores, classes, score_thresh=0.3, iou_threshold=0.6)
    mask = scores >= 0.3
    sub = np.flatnonzero(mask)
    expected = sub[nms_reference(boxes[mask], scores[mask], classes[mask], 0.6, 100)]
    assert idx.tolist() == expected.tolist()


def test_gaussian_hand_example() -> None:
    boxes = np.array(
        [
            [0, 0, 10, 10],  # A, 0.9
            [0, 0, 10, 5],  # B: IoU(A, B) = 0.5
            [20, 20, 30, 30],  # C: disjoint from A, B
            [21, 20, 31, 30],  # D: IoU(C, D) = 90/110
            [1, 0, 11, 10],  # E: IoU(A, E) = 90/110
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.75, 0.3], dtype=np.float32)
    idx, out = select(boxes, scores, np.zeros(5, dtype=np.int64), method="gaussian")
    order, ref = soft_nms_reference(boxes, scores, 0.5, 100, 0.001)
    assert idx.tolist() == order == [0, 3, 1, 2, 4]
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)
    # by hand: B after A: 0.8·e^(−0.5²/0.5); C after D: 0.7·e^(−(9/11)²/0.5)
    np.testing.assert_allclose(out[2], 0.8 * math.exp(-0.5), rtol=1e-6)
    np.testing.assert_allclose(out[3], 0.7 * math.exp(-((9 / 11) ** 2) / 0.5), rtol=1e-6)


@pytest.mark.parametrize(("sigma", "max_out"), [(0.5, 100), (0.1, 100), (0.5, 10)])
def test_gaussian_random_matches_reference(sigma: float, max_out: int) -> None:
    boxes, scores, classes = clustered_boxes(250, 4)
    idx, out = select(boxes, scores, classes, method="gaussian", sigma=sigma, max_output=max_out)
    order, ref = soft_nms_reference(boxes, scores, sigma, max_out, 0.001)
    assert idx.tolist() == order
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)
    assert np.all(np.diff(out) <= 0) and np.all(out >= 0.001)


@pytest.mark.parametrize("method", ["hard", "gaussian"])
def test_kept_indices_gather_identity(method: str) -> None:
    """Every per-anchor attribute gathered by a kept index belongs to that anchor's box,
    whatever the order of the candidates."""
    boxes, scores, classes = clustered_boxes(600, 5)
    attrs = np.random.default_rng(0).normal(size=(600, 9)).astype(np.float32)
    idx, out = select(boxes, scores, classes, method=method)
    perm = np.random.default_rng(1).permutation(600)
    pidx, pout = select(boxes[perm], scores[perm], classes[perm], method=method)
    np.testing.assert_array_equal(boxes[perm][pidx], boxes[idx])
    np.testing.assert_array_equal(attrs[perm][pidx], attrs[idx])
    np.testing.assert_array_equal(classes[perm][pidx], classes[idx])
    np.testing.assert_allclose(pout, out, rtol=1e-6)
    if method == "hard":
        np.testing.assert_array_equal(out, scores[idx])
    else:
        assert np.all(out <= scores[idx])


@pytest.mark.parametrize("method", ["hard", "gaussian"])
def test_empty_and_all_below_threshold(method: str) -> None:
    idx, out = select(
        np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), method=method
    )
    assert idx.shape == (0,) and out.shape == (0,)
    boxes, scores, classes = clustered_boxes(20, 6)
    idx, out = select(boxes, scores * 1e-4, classes, method=method)
    assert idx.shape == (0,) and out.shape == (0,)


def test_bad_arguments() -> None:
    b, s, c = torch.zeros(3, 4), torch.ones(3), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown NMS method"):
        select_detections(b, s, c, method="soft")
    with pytest.raises(ValueError, match="expected boxes"):
        select_detections(b, torch.ones(2), c)
