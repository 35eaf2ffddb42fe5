"""Decoding encoded boxes and their variances into corner means and corner stds (ALGORITHMS §2).

Every function works on encoded means ``t`` ordered ``(t_x, t_y, t_w, t_h)`` with any leading
dimensions (images, MC samples) in front of the anchor dimension, anchors given as
``(x1, y1, x2, y2)`` in network-input pixels, and returns corners ordered ``(x1, y1, x2, y2)``.
The encoded coordinates are treated as independent; corner covariances are not reported.

Methods (``uncert_adjust_method``):

- ``l-norm``: closed form with log-normal moments of the sizes (exact, the default);
- ``n-flow``: the same moments read from ``torch.distributions`` objects;
- ``sample``: Monte Carlo over ``n_samples`` draws decoded with the plain decoder;
- ``falsedec``: the "decode the variance like a box" baseline (wrong on purpose).
"""

from __future__ import annotations

import math
from typing import Final

import torch
from torch import Tensor
from torch.distributions import LogNormal, Normal

METHODS: Final = ("l-norm", "n-flow", "sample", "falsedec")

#: Largest log-size offset ever exponentiated: torchvision ``BoxCoder.bbox_xform_clip``, so a
#: decoded box is at most 1000/16 = 62.5 times its anchor. Applied to the exponent of every
#: size in every method and every MC or ``sample`` draw (the +v/2 shift of the log-normal mean
#: included), which keeps every decoded corner finite.
LOG_SIZE_CLIP: Final = math.log(1000.0 / 16)
#: Corner-std bound when the caller gives none (network pixels, 2²⁰): larger than any image a
#: detector takes in, so it only guards against overflow. The predictor passes the image's
#: larger side instead (§2.1: a std beyond the image's extent carries no more information).
DEFAULT_STD_CAP: Final = float(2**20)
#: Up to this log-variance e^v − 1 is computed directly (float32: e^80 ≈ 5.5e34, finite with
#: room for the size factor); beyond it the size std is formed in the log domain.
_V_DIRECT: Final = 80.0
#: Elements of the [chunk, n_samples, 4] draw tensor held at once by ``sample``.
_SAMPLE_BUDGET: Final = 1 << 24


def anchor_geometry(anchors: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centre x, centre y, width and height of xyxy anchors (each of shape [N])."""
    x1, y1, x2, y2 = anchors.unbind(-1)
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def _corners(xc: Tensor, yc: Tensor, w: Tensor, h: Tensor) -> Tensor:
    return torch.stack((xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2), dim=-1)


def _corner_stds(
    var_xc: Tensor, var_yc: Tensor, std_w: Tensor, std_h: Tensor, cap: float
) -> Tensor:
    """Var(x1) = Var(x2) = Var(x_c) + Var(w)/4 (likewise y), as stds capped at ``cap``.

    Each term is bounded before the sum (a term above cap² alone puts the std above the cap),
    so nothing overflows whatever the variances; below the cap the result is exact.
    """
    cap2 = cap * cap
    var_x = var_xc.clamp(max=cap2) + (std_w.clamp(max=2 * cap) / 2) ** 2
    var_y = var_yc.clamp(max=cap2) + (std_h.clamp(max=2 * cap) / 2) ** 2
    std = torch.stack((var_x, var_y, var_x, var_y), dim=-1).sqrt()
    return std.clamp(max=cap)


def _size(t_s: Tensor, a_s: Tensor) -> Tensor:
    """a_s·exp(min(t_s, LOG_SIZE_CLIP)): the product form keeps float32 accuracy."""
    return a_s * torch.exp(t_s.clamp(max=LOG_SIZE_CLIP))


def _log_expm1(v: Tensor) -> Tensor:
    """log(e^v − 1) without overflow: v + log(1 − e^−v) (−inf at v = 0)."""
    return v + torch.log(-torch.expm1(-v))


def _size_std(size: Tensor, v_s: Tensor, cap: float, direct: Tensor | None = None) -> Tensor:
    """Std of a log-normal size with mean ``size`` and log-variance v: size·sqrt(e^v − 1).

    Computed directly for v ≤ 80 (``direct`` when the caller has it, e.g. from a distribution
    object), in the log domain above, and never beyond 2·cap (where every corner std is capped
    anyway), so the result is finite for any v ≥ 0.
    """
    if direct is None:
        direct = size * torch.expm1(v_s.clamp(max=_V_DIRECT)).sqrt()
    log_std = size.log() + 0.5 * _log_expm1(v_s)
    far = torch.exp(log_std.clamp(max=math.log(2 * cap)))
    return torch.where(v_s <= _V_DIRECT, direct, far).clamp(max=2 * cap)


def plain_decode(t: Tensor, anchors: Tensor) -> Tensor:
    """Plain (Faster R-CNN) box decoding without any variance shift, sizes clipped.

    Args:
        t: encoded boxes [..., N, 4] ordered (t_x, t_y, t_w, t_h).
        anchors: anchors [N, 4] as (x1, y1, x2, y2), network-input pixels.

    Returns:
        Corners [..., N, 4] as (x1, y1, x2, y2), in the dtype of ``t``.
    """
    anchors = anchors.to(t.dtype)
    xa, ya, wa, ha = anchor_geometry(anchors)
    tx, ty, tw, th = t.unbind(-1)
    return _corners(tx * wa + xa, ty * ha + ya, _size(tw, wa), _size(th, ha))


def _lnorm(t: Tensor, v: Tensor, anchors: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """§2.1: log-normal moments in closed form, bounded (sizes clipped, stds capped)."""
    xa, ya, wa, ha = anchor_geometry(anchors)
    tx, ty, tw, th = t.unbind(-1)
    vx, vy, vw, vh = v.unbind(-1)
    w = _size(tw + vw / 2, wa)
    h = _size(th + vh / 2, ha)
    means = _corners(tx * wa + xa, ty * ha + ya, w, h)
    # Var(w) = (w_a·e^(t+v/2))²·(e^v − 1): the std is the (clipped) mean size times sqrt(e^v − 1)
    stds = _corner_stds(vx * wa**2, vy * ha**2, _size_std(w, vw, cap), _size_std(h, vh, cap), cap)
    return means, stds


def _nflow(t: Tensor, v: Tensor, anchors: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """§2.2: analytic moments of Normal (centres) and LogNormal (sizes) distributions.

    Computed in float64 and cast back to the input dtype. The size clip enters as the
    log-normal's location min(t, LOG_SIZE_CLIP − v/2), so its mean exp(loc + v/2) is exactly
    the clipped mean of ``l-norm``.
    """
    dtype = t.dtype
    t64, v64 = t.double(), v.double()
    xa, ya, wa, ha = anchor_geometry(anchors.double())
    scale = v64.sqrt()
    centre = Normal(t64[..., :2], scale[..., :2], validate_args=False)
    loc = torch.minimum(t64[..., 2:], LOG_SIZE_CLIP - v64[..., 2:] / 2)
    size = LogNormal(loc, scale[..., 2:], validate_args=False)
    a_size = torch.stack((wa, ha), dim=-1)
    a_centre = torch.stack((xa, ya), dim=-1)
    c_mean = centre.mean * a_size + a_centre
    c_var = centre.variance * a_size**2
    s_mean = size.mean * a_size
    s_std = _size_std(s_mean, v64[..., 2:], cap, direct=size.stddev * a_size)
    means = _corners(c_mean[..., 0], c_mean[..., 1], s_mean[..., 0], s_mean[..., 1])
    stds = _corner_stds(c_var[..., 0], c_var[..., 1], s_std[..., 0], s_std[..., 1], cap)
    return means.to(dtype), stds.to(dtype)


def sample_moments(
    t: Tensor, v: Tensor, anchors: Tensor, eps: Tensor, cap: float = DEFAULT_STD_CAP
) -> tuple[Tensor, Tensor]:
    """§2.3 for given standard-normal draws: decode t + √v·ε plainly, take mean and population std.

    Args:
        t: encoded means [M, 4].
        v: encoded variances [M, 4].
        anchors: anchors [M, 4] (one per row of ``t``).
        eps: draws [M, n, 4].
        cap: largest corner std reported.

    Returns:
        Corner means and stds (capped at ``cap``), each [M, 4].
    """
    draws = t[:, None, :] + v.sqrt()[:, None, :] * eps
    boxes = plain_decode(draws.transpose(0, 1), anchors).transpose(0, 1)  # [M, n, 4]
    mean = boxes.mean(dim=1)
    var = ((boxes - mean[:, None, :]) ** 2).mean(dim=1)
    return mean, var.clamp(max=cap * cap).sqrt().clamp(max=cap)


def _sample(
    t: Tensor,
    v: Tensor,
    anchors: Tensor,
    n_samples: int,
    generator: torch.Generator | None,
    cap: float,
) -> tuple[Tensor, Tensor]:
    """§2.3: Monte Carlo with ``n_samples`` seeded draws, chunked over anchors."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    lead = t.shape[:-1]
    flat_t = t.reshape(-1, 4)
    flat_v = v.reshape(-1, 4)
    flat_a = anchors.expand(*lead, 4).reshape(-1, 4)
    chunk = max(1, _SAMPLE_BUDGET // (4 * n_samples))
    means, stds = [], []
    for start in range(0, flat_t.shape[0], chunk):
        sl = slice(start, start + chunk)
        m = flat_t[sl].shape[0]
        eps = torch.randn((m, n_samples, 4), generator=generator, dtype=t.dtype, device=t.device)
        mean, std = sample_moments(flat_t[sl], flat_v[sl], flat_a[sl], eps, cap)
        means.append(mean)
        stds.append(std)
    return torch.cat(means).reshape(*lead, 4), torch.cat(stds).reshape(*lead, 4)


def _falsedec(t: Tensor, v: Tensor, anchors: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """§2.4: plain means; variances decoded as if they were box offsets (a deliberate error).

    The variance "boxes" go through the same clipped decoder as every box.
    """
    xa, ya, wa, ha = anchor_geometry(anchors)
    vx, vy, vw, vh = v.unbind(-1)
    d_w = _size(vw, wa)
    d_h = _size(vh, ha)
    d_xc = vx * wa + xa
    d_yc = vy * ha + ya
    var = torch.stack(
        ((d_xc - d_w / 2).abs(), (d_yc - d_h / 2).abs(), d_xc + d_w / 2, d_yc + d_h / 2), dim=-1
    )
    return plain_decode(t, anchors), var.clamp(min=0, max=cap * cap).sqrt().clamp(max=cap)


def decode_boxes(
    t: Tensor,
    v: Tensor | None,
    anchors: Tensor,
    method: str = "l-norm",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
    std_cap: float = DEFAULT_STD_CAP,
) -> tuple[Tensor, Tensor]:
    """Decode encoded box means and variances into corner means and corner stds (§2).

    Bounded in every method (§2.1, revised): log-size exponents are clipped at
    ``LOG_SIZE_CLIP`` (in every leading slice, so in every MC sample and ``sample`` draw) and
    corner stds are capped at ``std_cap``; outputs are finite for any finite t and any v ≥ 0.
    Below both bounds the results are the unbounded formulas'. The predictor's v comes from
    ``model.sigma_squared`` with the training-time σ bounds, so decoding sees the variances
    the loss was trained on; a capped std equals ``std_cap`` exactly (callers count them).

    Args:
        t: encoded means [..., N, 4] ordered (t_x, t_y, t_w, t_h); leading dimensions (batch,
            MC samples) broadcast against the anchors.
        v: encoded variances [..., N, 4] (σ², same order), or None for a deterministic box
            (zero variances: plain decoding and zero stds, except for ``falsedec``).
        anchors: anchors [N, 4] as (x1, y1, x2, y2) in network-input pixels.
        method: one of ``l-norm``, ``n-flow``, ``sample``, ``falsedec``.
        n_samples: draws per anchor for ``sample``.
        generator: torch generator for ``sample`` (the stage's seeded generator).
        std_cap: largest corner std returned, in the anchors' pixels (the predictor passes the
            image's larger side).

    Returns:
        Corner means and corner stds, each [..., N, 4] as (x1, y1, x2, y2), float32 unless
        ``t`` is float64.

    Raises:
        ValueError: for an unknown method, mismatched shapes or a non-positive ``std_cap``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
    if t.shape[-1] != 4 or anchors.shape != (t.shape[-2], 4):
        raise ValueError(
            f"expected t [..., N, 4] and anchors [N, 4], got {tuple(t.shape)} and "
            f"{tuple(anchors.shape)}"
        )
    if not std_cap > 0:
        raise ValueError(f"std_cap must be positive, got {std_cap}")
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    t = t.to(dtype)
    anchors = anchors.to(device=t.device, dtype=dtype)
    v = torch.zeros_like(t) if v is None else v.to(dtype).clamp(min=0).expand_as(t)
    if method == "l-norm":
        return _lnorm(t, v, anchors, std_cap)
    if method == "n-flow":
        return _nflow(t, v, anchors, std_cap)
    if method == "sample":
        return _sample(t, v, anchors, n_samples, generator, std_cap)
    return _falsedec(t, v, anchors, std_cap)
