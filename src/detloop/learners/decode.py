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

#: Largest natural log of a variance (or mean size) before exponentiating (decision 3): e^80 is
#: far beyond any pixel scale yet finite in float32, so no inf/NaN reaches a table.
LOG_CLAMP: Final = 80.0
_MAX_VALUE: Final = math.exp(LOG_CLAMP)
#: Elements of the [chunk, n_samples, 4] draw tensor held at once by ``sample``.
_SAMPLE_BUDGET: Final = 1 << 24


def anchor_geometry(anchors: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centre x, centre y, width and height of xyxy anchors (each of shape [N])."""
    x1, y1, x2, y2 = anchors.unbind(-1)
    return (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1


def _corners(xc: Tensor, yc: Tensor, w: Tensor, h: Tensor) -> Tensor:
    return torch.stack((xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2), dim=-1)


def _corner_stds(var_xc: Tensor, var_yc: Tensor, var_w: Tensor, var_h: Tensor) -> Tensor:
    var_x = var_xc + var_w / 4
    var_y = var_yc + var_h / 4
    return torch.stack((var_x, var_y, var_x, var_y), dim=-1).sqrt()


def _size(t_s: Tensor, a_s: Tensor) -> Tensor:
    """a_s·exp(t_s), or e^LOG_CLAMP where its log exceeds ``LOG_CLAMP``.

    The product form keeps float32 accuracy (exponentiating a summed log loses ~|log|·2⁻²⁴).
    """
    too_big = t_s + a_s.log() > LOG_CLAMP
    return torch.where(too_big, _MAX_VALUE, a_s * torch.exp(t_s.clamp(max=LOG_CLAMP)))


def plain_decode(t: Tensor, anchors: Tensor) -> Tensor:
    """Plain (Faster R-CNN) box decoding without any variance shift.

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


def _lnorm(t: Tensor, v: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
    """§2.1: log-normal moments in closed form; a variance whose log exceeds 80 is e^80."""
    xa, ya, wa, ha = anchor_geometry(anchors)
    tx, ty, tw, th = t.unbind(-1)
    vx, vy, vw, vh = v.unbind(-1)
    w = _size(tw + vw / 2, wa)
    h = _size(th + vh / 2, ha)

    def size_var(v_s: Tensor, mean_s: Tensor, log_a: Tensor, t_s: Tensor) -> Tensor:
        # Var = (a·e^(t+v/2))²·expm1(v); its total log decides the clamp (decision 3), the
        # product form gives the value where unclamped.
        growth = torch.expm1(v_s)
        log_var = 2 * log_a + growth.log() + 2 * t_s + v_s
        std = mean_s * growth.sqrt()
        return torch.where(log_var > LOG_CLAMP, _MAX_VALUE, std**2)

    means = _corners(tx * wa + xa, ty * ha + ya, w, h)
    var_w = size_var(vw, w, wa.log(), tw)
    var_h = size_var(vh, h, ha.log(), th)
    stds = _corner_stds(vx * wa**2, vy * ha**2, var_w, var_h)
    return means, stds


def _nflow(t: Tensor, v: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
    """§2.2: analytic moments of Normal (centres) and LogNormal (sizes) distributions.

    Computed in float64 (exp of 2·t overflows float32 long before the clamp applies) and cast
    back to the input dtype.
    """
    dtype = t.dtype
    t64, v64 = t.double(), v.double()
    xa, ya, wa, ha = anchor_geometry(anchors.double())
    scale = v64.sqrt()
    centre = Normal(t64[..., :2], scale[..., :2], validate_args=False)
    size = LogNormal(t64[..., 2:], scale[..., 2:], validate_args=False)
    a_size = torch.stack((wa, ha), dim=-1)
    a_centre = torch.stack((xa, ya), dim=-1)
    c_mean = centre.mean * a_size + a_centre
    c_var = centre.variance * a_size**2
    s_mean = (size.mean * a_size).clamp(max=_MAX_VALUE)
    s_var = (size.variance * a_size**2).clamp(max=_MAX_VALUE)
    means = _corners(c_mean[..., 0], c_mean[..., 1], s_mean[..., 0], s_mean[..., 1])
    stds = _corner_stds(c_var[..., 0], c_var[..., 1], s_var[..., 0], s_var[..., 1])
    return means.to(dtype), stds.to(dtype)


def sample_moments(t: Tensor, v: Tensor, anchors: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """§2.3 for given standard-normal draws: decode t + √v·ε plainly, take mean and population std.

    Args:
        t: encoded means [M, 4].
        v: encoded variances [M, 4].
        anchors: anchors [M, 4] (one per row of ``t``).
        eps: draws [M, n, 4].

    Returns:
        Corner means and stds, each [M, 4].
    """
    draws = t[:, None, :] + v.sqrt()[:, None, :] * eps
    boxes = plain_decode(draws.transpose(0, 1), anchors).transpose(0, 1)  # [M, n, 4]
    mean = boxes.mean(dim=1)
    var = ((boxes - mean[:, None, :]) ** 2).mean(dim=1)
    return mean, var.clamp(max=_MAX_VALUE).sqrt()


def _sample(
    t: Tensor, v: Tensor, anchors: Tensor, n_samples: int, generator: torch.Generator | None
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
        mean, std = sample_moments(flat_t[sl], flat_v[sl], flat_a[sl], eps)
        means.append(mean)
        stds.append(std)
    return torch.cat(means).reshape(*lead, 4), torch.cat(stds).reshape(*lead, 4)


def _falsedec(t: Tensor, v: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
    """§2.4: plain means; variances decoded as if they were box offsets (a deliberate error)."""
    xa, ya, wa, ha = anchor_geometry(anchors)
    vx, vy, vw, vh = v.unbind(-1)
    d_w = _size(vw, wa)
    d_h = _size(vh, ha)
    d_xc = vx * wa + xa
    d_yc = vy * ha + ya
    var = torch.stack(
        ((d_xc - d_w / 2).abs(), (d_yc - d_h / 2).abs(), d_xc + d_w / 2, d_yc + d_h / 2), dim=-1
    )
    return plain_decode(t, anchors), var.clamp(min=0).sqrt()


def decode_boxes(
    t: Tensor,
    v: Tensor | None,
    anchors: Tensor,
    method: str = "l-norm",
    n_samples: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode encoded box means and variances into corner means and corner stds (§2).

    Args:
        t: encoded means [..., N, 4] ordered (t_x, t_y, t_w, t_h); leading dimensions (batch,
            MC samples) broadcast against the anchors.
        v: encoded variances [..., N, 4] (σ², same order), or None for a deterministic box
            (zero variances: plain decoding and zero stds, except for ``falsedec``).
        anchors: anchors [N, 4] as (x1, y1, x2, y2) in network-input pixels.
        method: one of ``l-norm``, ``n-flow``, ``sample``, ``falsedec``.
        n_samples: draws per anchor for ``sample``.
        generator: torch generator for ``sample`` (the stage's seeded generator).

    Returns:
        Corner means and corner stds, each [..., N, 4] as (x1, y1, x2, y2), float32 unless
        ``t`` is float64.

    Raises:
        ValueError: for an unknown method or mismatched shapes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; choose one of {', '.join(METHODS)}")
    if t.shape[-1] != 4 or anchors.shape != (t.shape[-2], 4):
        raise ValueError(
            f"expected t [..., N, 4] and anchors [N, 4], got {tuple(t.shape)} and "
            f"{tuple(anchors.shape)}"
        )
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    t = t.to(dtype)
    anchors = anchors.to(device=t.device, dtype=dtype)
    v = torch.zeros_like(t) if v is None else v.to(dtype).clamp(min=0).expand_as(t)
    if method == "l-norm":
        return _lnorm(t, v, anchors)
    if method == "n-flow":
        return _nflow(t, v, anchors)
    if method == "sample":
        return _sample(t, v, anchors, n_samples, generator)
    return _falsedec(t, v, anchors)
