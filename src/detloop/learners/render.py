"""Draw detections with their localisation uncertainty: a translucent band of ±σ per edge."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from detloop.data.errors import DataError

log = logging.getLogger(__name__)

_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


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


def render_image(
    image: Image.Image,
    dets: pa.Table,
    class_names: list[str] | None = None,
    draw_uncert: bool = True,
) -> Image.Image:
    """``image`` with the rows of ``dets`` (one image's predictions) drawn on it.

    The band uses the aleatoric std columns when present, else the epistemic ones.
    """
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    d = dets.to_pydict()
    for r in range(dets.num_rows):
        cls = int(d["class_id"][r])
        color = _COLORS[cls % len(_COLORS)]
        box = np.array([d[c][r] for c in ("x1", "y1", "x2", "y2")], dtype=float)
        std = _band_std(d, r)
        if draw_uncert and std is not None:
            for band in _edge_bands(box, std):
                draw.rectangle(band, fill=(*color, 70))
        draw.rectangle(tuple(box), outline=(*color, 255), width=1)
        name = class_names[cls] if class_names and cls < len(class_names) else str(cls)
        draw.text(
            (box[0] + 1, max(0.0, box[1] - 10)), f"{name} {d['score'][r]:.2f}", fill=(*color, 255)
        )
    return Image.alpha_composite(base, overlay).convert("RGB")


def _band_std(d: dict[str, list[object]], r: int) -> np.ndarray | None:
    for prefix in ("al_", "mc_"):
        names = [f"{prefix}{c}" for c in ("x1", "y1", "x2", "y2")]
        vals = [d[n][r] if n in d else None for n in names]
        if all(v is not None for v in vals):
            return np.array(vals, dtype=float)
    return None


def render_predictions(
    predictions: pa.Table,
    images: pa.Table,
    out_dir: Path,
    *,
    min_score: float = 0.4,
    class_names: list[str] | None = None,
    draw_uncert: bool = True,
) -> list[Path]:
    """Write one PNG per image of ``images`` with its detections scoring ≥ ``min_score``.

    File names are the image ids with ``/`` replaced by ``__``. Returns the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import pyarrow.compute as pc

    kept = predictions.filter(pc.greater_equal(predictions.column("score"), min_score))
    written = []
    for image_id, file in zip(
        images.column("image_id").to_pylist(), images.column("file").to_pylist(), strict=True
    ):
        try:
            with Image.open(file) as im:
                image = im.convert("RGB")
        except OSError as exc:
            raise DataError(str(file), None, "file", f"cannot read image ({exc})") from None
        dets = kept.filter(pc.equal(kept.column("image_id"), image_id))
        path = out_dir / f"{str(image_id).replace('/', '__')}.png"
        render_image(image, dets, class_names, draw_uncert).save(path)
        written.append(path)
    log.info("rendered %d images into %s", len(written), out_dir)
    return written
