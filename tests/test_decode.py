"""Decoding of box means and variances (ALGORITHMS §2, "Tests that pin it" (a)–(e))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detloop.learners.decode import (
    LOG_SIZE_CLIP,
    decode_boxes,
    plain_decode,
    sample_moments,
)

torch.set_num_threads(1)


def random_case(
    n: int, seed: int, v_range: tuple[float, float] = (0.001, 0.5), lead: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random anchors (xyxy, away from 0), encoded means and variances, float64."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(50.0, 600.0, size=(n, 2))
    wh = rng.uniform(8.0, 300.0, size=(n, 2))
    anchors = np.concatenate([xy, xy + wh], axis=1)
    t = np.concatenate(
        [rng.uniform(-0.5, 0.5, (*lead, n, 2)), rng.uniform(-1.0, 1.0, (*lead, n, 2))], axis=-1
    )
    v = rng.uniform(*v_range, size=(*lead, n, 4))
    return anchors, t, v


def lnorm_numpy(t: np.ndarray, v: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """§2.1 written out in float64 numpy, directly from the formulas."""
    xa = (anchors[:, 0] + anchors[:, 2]) / 2
    ya = (anchors[:, 1] + anchors[:, 3]) / 2
    wa = anchors[:, 2] - anchors[:, 0]
    ha = anchors[:, 3] - anchors[:, 1]
    tx, ty, tw, th = np.moveaxis(t, -1, 0)
    vx, vy, vw, vh = np.moveaxis(v, -1, 0)
    xc, yc = tx * wa + xa, ty * ha + ya
    w, h = wa * np.exp(tw + vw / 2), ha * np.exp(th + vh / 2)
    var_w = wa**2 * (np.exp(vw) - 1) * np.exp(2 * tw + vw)
    var_h = ha**2 * (np.exp(vh) - 1) * np.exp(2 * th + vh)
    var_x = vx * wa**2 + var_w / 4
    var_y = vy * ha**2 + var_h / 4
    means = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=-1)
    stds = np.sqrt(np.stack([var_x, var_y, var_x, var_y], axis=-1))
    return means, stds


def box_size(anchors: np.ndarray | None, means: np.ndarray) -> np.ndarray:
    """size_k per corner: predicted width for x corners, height for y corners."""
    w = means[..., 2] - means[..., 0]
    h = means[..., 3] - means[..., 1]
    return np.stack([w, h, w, h], axis=-1)


def assert_corners_close(actual: np.ndarray, desired: np.ndarray, tol: float) -> None:
    """Corner means agree to ``tol`` relative to max(|corner|, box size): corners near 0 are
    differences of large numbers, so a plain relative test there measures cancellation only."""
    scale = np.maximum(np.abs(desired), box_size(None, desired))
    err = np.abs(actual - desired) / scale
    assert err.max() <= tol, f"max scaled error {err.max():.3g} > {tol}"


def run(
    method: str, anchors: np.ndarray, t: np.ndarray, v: np.ndarray | None, **kw: object
) -> tuple[np.ndarray, np.ndarray]:
    vt = None if v is None else torch.tensor(v, dtype=torch.float32)
    m, s = decode_boxes(
        torch.tensor(t, dtype=torch.float32), vt, torch.tensor(anchors), method, **kw
    )
    assert m.dtype == torch.float32 and s.dtype == torch.float32
    return m.numpy().astype(np.float64), s.numpy().astype(np.float64)


def test_lnorm_matches_million_sample_monte_carlo() -> None:
    anchors, t, v = random_case(12, seed=1)
    means, stds = run("l-norm", anchors, t, v)
    rng = np.random.default_rng(123)
    n = 1_000_000
    for i in range(len(anchors)):
        draws = t[i] + np.sqrt(v[i]) * rng.standard_normal((n, 4))
        # v = 0 in the numpy formulas is plain decoding of each draw
        boxes = lnorm_numpy(draws[:, None, :], np.zeros((n, 1, 4)), anchors[[i]])[0][:, 0, :]
        mc_means, mc_stds = boxes.mean(axis=0), boxes.std(axis=0)
        size = box_size(anchors, means[i])
        np.testing.assert_array_less(np.abs(means[i] - mc_means), 0.01 * size)
        np.testing.assert_array_less(np.abs(stds[i] - mc_stds), 0.01 * mc_stds)


def test_nflow_equals_lnorm() -> None:
    anchors, t, v = random_case(500, seed=2, lead=(3,))
    m_l, s_l = run("l-norm", anchors, t, v)
    m_n, s_n = run("n-flow", anchors, t, v)
    assert_corners_close(m_n, m_l, 1e-6)
    np.testing.assert_allclose(s_n, s_l, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["l-norm", "n-flow"])
def test_zero_variance_is_plain_decoding(method: str) -> None:
    anchors, t, _ = random_case(200, seed=3)
    for v in (None, np.zeros_like(t)):
        means, stds = run(method, anchors, t, v)
        plain = plain_decode(torch.tensor(t, dtype=torch.float32), torch.tensor(anchors))
        assert_corners_close(means, plain.numpy().astype(np.float64), 1e-6)
        assert np.all(stds == 0)
    xa = (anchors[:, 0] + anchors[:, 2]) / 2
    wa = anchors[:, 2] - anchors[:, 0]
    expected_x1 = t[:, 0] * wa + xa - wa * np.exp(t[:, 2]) / 2
    np.testing.assert_allclose(plain.numpy()[:, 0], expected_x1, rtol=1e-5)


def test_lnorm_float32_agrees_with_float64_reference() -> None:
    anchors, t, v = random_case(2000, seed=4, v_range=(0.0, 2.0), lead=(2,))
    means, stds = run("l-norm", anchors, t, v)
    ref_m, ref_s = lnorm_numpy(t, v, anchors)
    assert_corners_close(means, ref_m, 1e-5)
    np.testing.assert_allclose(stds, ref_s, rtol=1e-5)


def test_leading_dims_equal_per_slice_decoding() -> None:
    anchors, t, v = random_case(50, seed=5, lead=(4, 2))
    means, stds = run("l-norm", anchors, t, v)
    assert means.shape == (4, 2, 50, 4)
    m1, s1 = run("l-norm", anchors, t[3, 1], v[3, 1])
    np.testing.assert_array_equal(means[3, 1], m1)
    np.testing.assert_array_equal(stds[3, 1], s1)


def test_falsedec_hand_example() -> None:
    anchors = np.array([[45.0, 90.0, 55.0, 110.0]])  # x_a = 50, w_a = 10
    t = np.array([[0.1, 0.0, 0.2, 0.0]])
    v = np.array([[0.2, 0.0, 0.1, 0.0]])
    means, stds = run("falsedec", anchors, t, v)
    np.testing.assert_allclose(stds[0, 0] ** 2, abs(52 - 5 * math.exp(0.1)), rtol=1e-6)
    np.testing.assert_allclose(stds[0, 0] ** 2, 46.4741, rtol=1e-6)
    np.testing.assert_allclose(stds[0, 2] ** 2, 57.5259, rtol=1e-6)
    # means: plain decoding, no +v/2 shift: x_c = 51, w = 10·e^0.2
    w = 10 * math.exp(0.2)
    np.testing.assert_allclose(means[0, [0, 2]], [51 - w / 2, 51 + w / 2], rtol=1e-6)


def test_sample_hand_example() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.0]])
    t = torch.zeros(2, 4)
    v = torch.tensor([[0.25, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    eps = torch.tensor([-1.0, 0.0, 1.0])[None, :, None].expand(2, 3, 4)
    mean, std = sample_moments(t, v, anchors, eps)
    # row 0: x_c ∈ {0, 5, 10}, w = 10 → x1 ∈ {-5, 0, 5}
    np.testing.assert_allclose(mean[0].numpy(), [0.0, 0.0, 10.0, 20.0], atol=1e-6)
    np.testing.assert_allclose(std[0].numpy(), [math.sqrt(50 / 3), 0, math.sqrt(50 / 3), 0])
    # row 1: w ∈ 10·{e⁻¹, 1, e} (plain decoding, no shift), x1 = 5 − w/2
    w = 10 * np.exp(np.array([-1.0, 0.0, 1.0]))
    np.testing.assert_allclose(mean[1, 0].item(), np.mean(5 - w / 2), rtol=1e-6)
    np.testing.assert_allclose(std[1, 2].item(), np.std(5 + w / 2), rtol=1e-6)


def test_sample_is_seeded_and_uses_its_draws() -> None:
    anchors, t, v = random_case(30, seed=6)
    args = (torch.tensor(t, dtype=torch.float32), torch.tensor(v, dtype=torch.float32))
    a = torch.tensor(anchors)
    m1, s1 = decode_boxes(*args, a, "sample", 100, torch.Generator().manual_seed(7))
    m2, s2 = decode_boxes(*args, a, "sample", 100, torch.Generator().manual_seed(7))
    m3, _ = decode_boxes(*args, a, "sample", 100, torch.Generator().manual_seed(8))
    assert torch.equal(m1, m2) and torch.equal(s1, s2) and not torch.equal(m1, m3)
    eps = torch.randn((30, 100, 4), generator=torch.Generator().manual_seed(7))
    m_ref, s_ref = sample_moments(*args, a.float(), eps)
    torch.testing.assert_close(m1, m_ref, rtol=0, atol=0)
    torch.testing.assert_close(s1, s_ref, rtol=0, atol=0)


def test_sample_converges_to_lnorm() -> None:
    anchors, t, v = random_case(4, seed=9, lead=(2,))
    m_s, s_s = run("sample", anchors, t, v, n_samples=200_000, generator=torch.Generator())
    m_l, s_l = run("l-norm", anchors, t, v)
    assert np.all(np.abs(m_s - m_l) < 0.02 * box_size(anchors, m_l))
    np.testing.assert_allclose(s_s, s_l, rtol=0.03)


@pytest.mark.parametrize("method", ["l-norm", "n-flow", "falsedec", "sample"])
def test_extreme_inputs_stay_finite(method: str) -> None:
    anchors = np.array([[0.0, 0.0, 512.0, 512.0]] * 4)
    t = np.array([[0, 0, 200.0, -200.0], [0, 0, 50.0, 50.0], [0, 0, 0, 0], [0, 0, -50, 0]])
    v = np.array([[1e6, 1e6, 1e6, 1e6], [0, 0, 0, 0], [1e-9, 0, 200.0, 0], [0, 0, 0, 1e-30]])
    means, stds = run(method, anchors, t, v, generator=torch.Generator().manual_seed(0))
    assert np.all(np.isfinite(means)) and np.all(np.isfinite(stds))
    assert np.all(stds >= 0)


METHODS = ["l-norm", "n-flow", "falsedec", "sample"]


def _run_seeded(
    method: str, anchors: np.ndarray, t: np.ndarray, v: np.ndarray | None, **kw: object
) -> tuple[np.ndarray, np.ndarray]:
    return run(method, anchors, t, v, generator=torch.Generator().manual_seed(0), **kw)


def test_log_size_clip_is_torchvisions() -> None:
    assert math.isclose(LOG_SIZE_CLIP, math.log(1000 / 16))


@pytest.mark.parametrize("method", METHODS)
def test_size_above_the_clip_is_62_5_anchors(method: str) -> None:
    """Hand case: a 16 x 32 anchor and log-size offsets far above the clip (v = 0): every
    method decodes a box of exactly 1000 x 2000 px around the anchor centre."""
    anchors = np.array([[0.0, 0.0, 16.0, 32.0]])  # centre (8, 16)
    t = np.array([[0.0, 0.0, 10.0, 30.0]])
    means, stds = _run_seeded(method, anchors, t, np.zeros_like(t))
    np.testing.assert_allclose(means[0], [8 - 500, 16 - 1000, 8 + 500, 16 + 1000], rtol=1e-6)
    if method != "falsedec":
        assert np.all(stds == 0)


@pytest.mark.parametrize("method", ["l-norm", "n-flow"])
def test_lognormal_mean_shift_is_clipped_too(method: str) -> None:
    """t_w + v_w/2 = 4 + 1 = 5 > clip: w = 1000 (not 16·e⁵); the size std stays the clipped
    mean times sqrt(e^v − 1), so Var(x1) = v_x·w_a² + (1000² (e² − 1))/4."""
    anchors = np.array([[0.0, 0.0, 16.0, 16.0]])
    t = np.array([[0.0, 0.0, 4.0, 0.0]])
    v = np.array([[0.01, 0.0, 2.0, 0.0]])
    means, stds = run(method, anchors, t, v)
    np.testing.assert_allclose(means[0, [0, 2]], [8 - 500, 8 + 500], rtol=1e-6)
    expected = math.sqrt(0.01 * 16**2 + 1000**2 * math.expm1(2.0) / 4)
    np.testing.assert_allclose(stds[0, [0, 2]], [expected, expected], rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_stds_above_the_cap_equal_the_cap(method: str) -> None:
    """Hand case: variances far beyond any image (v_w = 200, v_x = 10⁶) give stds of exactly
    ``std_cap``; the y corners of the same box (v = 0.01) stay below it and are unchanged."""
    anchors = np.array([[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 64.0, 64.0]])
    t = np.zeros((2, 4))
    v = np.array([[0.0, 0.01, 200.0, 0.0], [1e6, 0.01, 0.0, 0.0]])
    _, stds = _run_seeded(method, anchors, t, v, std_cap=300.0)
    if method == "falsedec":  # variances decoded as boxes: d_w = e^200·64 clipped to 62.5·64
        np.testing.assert_allclose(stds[0, 2], math.sqrt(32 + 62.5 * 64 / 2), rtol=1e-6)
        assert stds[1, 2] == 300.0  # d_xc = 10⁶·64 + 32: sqrt(6.4e7) px above the cap
        return
    np.testing.assert_array_equal(stds[:, [0, 2]], 300.0)
    if method != "sample":
        np.testing.assert_allclose(stds[:, [1, 3]], 0.1 * 64, rtol=1e-6)


@pytest.mark.parametrize("method", ["l-norm", "n-flow"])
def test_below_the_bounds_results_equal_the_unbounded_formulas(method: str) -> None:
    """Float64 in, float64 out: the bounded decoder equals §2.1 written out without any clamp
    (to 1e-9) wherever the sizes and stds stay below the bounds."""
    anchors, t, v = random_case(2000, seed=11, v_range=(0.0, 3.0), lead=(2,))
    m, s = decode_boxes(torch.tensor(t), torch.tensor(v), torch.tensor(anchors), method)
    assert m.dtype == torch.float64
    ref_m, ref_s = lnorm_numpy(t, v, anchors)
    assert ref_s.max() < 2**20
    assert_corners_close(m.numpy(), ref_m, 1e-9)
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-9)


def test_every_mc_sample_is_clipped() -> None:
    """[T, N, 4] input with one MC sample far above the clip: that slice decodes to the clipped
    box, the others are untouched, and the sample std over T stays finite."""
    anchors, t, v = random_case(20, seed=12, lead=(5,))
    t[3, :, 2] = 300.0  # a sampled log-width that overflows float32 when exponentiated
    means, stds = run("l-norm", anchors, t, v)
    wa = anchors[:, 2] - anchors[:, 0]
    np.testing.assert_allclose(means[3, :, 2] - means[3, :, 0], wa * 62.5, rtol=1e-5)
    m0, _ = run("l-norm", anchors, t[0], v[0])
    np.testing.assert_array_equal(means[0], m0)
    assert np.isfinite(means.std(axis=0)).all() and np.isfinite(stds).all()


def test_unknown_method_and_bad_shapes() -> None:
    t = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="unknown decoding method"):
        decode_boxes(t, None, torch.zeros(3, 4), "exact")
    with pytest.raises(ValueError, match="anchors"):
        decode_boxes(t, None, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="std_cap"):
        decode_boxes(t, None, torch.zeros(3, 4), std_cap=0.0)
