"""Draw detections on their images: the one renderer of predictions and auto-labeling.

Each box gets an outline and a text above it, in the colour and with the text its ``BoxStyle``
gives; with ``draw_uncert`` its localisation uncertainty is a translucent band of ±σ per edge.
``render_predictions`` colours by class and writes "name score" — and, with ``per_uncertainty``,
draws each image once more per predicted uncertainty (the reference's ``infer_draw_uncert``),
colouring each box from green (the lowest value among the rendered detections) to red (the
highest); auto-labeling colours by its verdict and writes u (``uncertainty_style``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from detloop.data.errors import DataError
from detloop.data.min_score import DEFAULT_MIN_SCORE

log = logging.getLogger(__name__)

_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
RED, LIME = (255, 0, 0), (0, 255, 0)

Color = tuple[int, int, int]
#: A detection row (column name -> value) to its colour and text.
BoxStyle = Callable[[Mapping[str, Any]], tuple[Color, str]]


def class_style(class_names: list[str] | None = None) -> BoxStyle:
    """A colour per class; the text is the class name (or id) and the score."""

    def style(row: Mapping[str, Any]) -> tuple[Color, str]:
        cls = int(row["class_id"])
        name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
        return _COLORS[cls % len(_COLORS)], f"{name} {row['score']:.2f}"

    return style


def uncertainty_style(delta: float) -> BoxStyle:
    """Red when u ≥ δ̄ (or u is unknown), green otherwise; the text is u."""

    def style(row: Mapping[str, Any]) -> tuple[Color, str]:
        u = row["u"]
        return (RED if not u < delta else LIME), f"{u:.3f}"

    return style


#: The views of ``per_uncertainty`` rendering: name -> (value of a row, band std prefix or None).
#: Box uncertainties are the mean of the four corner stds (pixels), drawn as ±σ bands too.
UNCERTAINTY_VIEWS: dict[str, tuple[Callable[[Mapping[str, Any]], float], str | None]] = {
    "entropy": (lambda r: float(r["entropy"]), None),
    "mc_class": (lambda r: float(r["mc_class"]), None),
    "al_box": (lambda r: _mean_std(r, "al_"), "al_"),
    "mc_box": (lambda r: _mean_std(r, "mc_"), "mc_"),
}


def _mean_std(row: Mapping[str, Any], prefix: str) -> float:
    vals = [row.get(f"{prefix}{c}") for c in ("x1", "y1", "x2", "y2")]
    if any(v is None for v in vals):
        return float("nan")
    return float(np.mean([float(v) for v in vals if v is not None]))


def value_style(
    name: str, value: Callable[[Mapping[str, Any]], float], lo: float, hi: float
) -> BoxStyle:
    """Green at ``lo``, red at ``hi`` (linear between, grey when the value is unknown); the text
    is the value."""

    def style(row: Mapping[str, Any]) -> tuple[Color, str]:
        v = value(row)
        if not np.isfinite(v):
            return (128, 128, 128), f"{name} ?"
        t = 0.0 if hi <= lo else float(np.clip((v - lo) / (hi - lo), 0.0, 1.0))
        return (int(255 * t), int(200 * (1 - t)), 0), f"{v:.3g}"

    return style


def _edge_bands(box: np.ndarray, std: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Rectangles covering each edge ± its std: left, top, right, bottom."""
    x1, y1, x2, y2 = box
    s1, s2, s3, s4 = std
    return [
        (x1 - s1, y1, x1 + s1, y2),
        (x1, y1 - s2, x2, y1 + s2),
        (x2 - s3, y1, x2 + s3, y2),
        (x1, y2 - s4, x2, y2 + s4),
    ]


def _band_std(
    row: Mapping[str, Any], prefixes: tuple[str, ...] = ("al_", "mc_")
) -> np.ndarray | None:
    """The std columns of the first of ``prefixes`` a row has (aleatoric, else epistemic)."""
    for prefix in prefixes:
        vals = [row.get(f"{prefix}{c}") for c in ("x1", "y1", "x2", "y2")]
        if all(v is not None and v == v for v in vals):  # v == v: not NaN
            return np.array(vals, dtype=float)
    return None


def _rows(dets: pa.Table | pd.DataFrame) -> list[dict[str, Any]]:
    if isinstance(dets, pa.Table):
        rows: list[dict[str, Any]] = dets.to_pylist()
        return rows
    return [{str(k): v for k, v in r.items()} for r in dets.to_dict(orient="records")]


def draw_boxes(
    image: Image.Image,
    rows: Iterable[Mapping[str, Any]],
    style: BoxStyle,
    draw_uncert: bool,
    text_dx: int = 1,
    band_prefixes: tuple[str, ...] = ("al_", "mc_"),
) -> Image.Image:
    """``image`` (RGB) with ``rows`` (one image's detections) drawn on it; each text starts
    ``text_dx`` pixels right of its box's left edge, 10 above its top edge; with
    ``draw_uncert``, ±σ bands from the first std columns of ``band_prefixes`` a row has."""
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for row in rows:
        color, text = style(row)
        box = np.array([row[c] for c in ("x1", "y1", "x2", "y2")], dtype=float)
        std = _band_std(row, band_prefixes)
        if draw_uncert and std is not None:
            for band in _edge_bands(box, std):
                draw.rectangle(band, fill=(*color, 70))
        draw.rectangle(tuple(box), outline=(*color, 255), width=1)
        draw.text((box[0] + text_dx, max(0.0, box[1] - 10)), text, fill=(*color, 255))
    return Image.alpha_composite(base, overlay).convert("RGB")


def render_image(
    image: Image.Image,
    dets: pa.Table | pd.DataFrame,
    class_names: list[str] | None = None,
    draw_uncert: bool = True,
) -> Image.Image:
    """``image`` with the rows of ``dets`` (one image's predictions) drawn in class colours."""
    return draw_boxes(image, _rows(dets), class_style(class_names), draw_uncert)


def render_images(
    images: Iterable[tuple[str, str]],
    dets: pa.Table | pd.DataFrame,
    out_dir: Path,
    *,
    style: BoxStyle,
    draw_uncert: bool = False,
    text_dx: int = 1,
    band_prefixes: tuple[str, ...] = ("al_", "mc_"),
) -> list[Path]:
    """One PNG per ``(image_id, file)`` of ``images`` with its rows of ``dets`` drawn
    (``draw_boxes``).

    File names are the image ids with ``/`` replaced by ``__``. Returns the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_image: dict[str, list[dict[str, Any]]] = {}
    for row in _rows(dets):
        by_image.setdefault(str(row["image_id"]), []).append(row)
    written = []
    for image_id, file in images:
        try:
            with Image.open(file) as im:
                image = im.convert("RGB")
        except OSError as exc:
            raise DataError(str(file), None, "file", f"cannot read image ({exc})") from None
        path = out_dir / f"{str(image_id).replace('/', '__')}.png"
        rows = by_image.get(str(image_id), [])
        draw_boxes(image, rows, style, draw_uncert, text_dx, band_prefixes).save(path)
        written.append(path)
    log.info("rendered %d images into %s", len(written), out_dir)
    return written


def render_predictions(
    predictions: pa.Table,
    images: pa.Table,
    out_dir: Path,
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    class_names: list[str] | None = None,
    draw_uncert: bool = True,
    per_uncertainty: bool = False,
) -> list[Path]:
    """Write one PNG per image of ``images`` with its detections scoring ≥ ``min_score``; with
    ``per_uncertainty`` also ``uncertainty/<view>/`` PNGs, one per view of
    ``UNCERTAINTY_VIEWS`` whose columns the predictions have (the colour scale of a view spans
    its values over all rendered detections, so images compare).

    File names are the image ids with ``/`` replaced by ``__``. Returns the written paths.
    """
    kept = predictions.filter(pc.greater_equal(predictions.column("score"), min_score))
    pairs = list(
        zip(images.column("image_id").to_pylist(), images.column("file").to_pylist(), strict=True)
    )
    written = render_images(
        pairs, kept, out_dir, style=class_style(class_names), draw_uncert=draw_uncert
    )
    if not per_uncertainty:
        return written
    rows = _rows(kept)
    for name, (value, band) in UNCERTAINTY_VIEWS.items():
        values = np.array([value(r) for r in rows], dtype=float) if rows else np.array([])
        if rows and not np.isfinite(values).any():
            continue  # the model does not predict this uncertainty (e.g. no MC dropout)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        written += render_images(
            pairs,
            kept,
            Path(out_dir) / "uncertainty" / name,
            style=value_style(name, value, lo, hi),
            draw_uncert=band is not None,
            band_prefixes=(band,) if band else (),
        )
    return written
