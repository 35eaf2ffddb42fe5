"""Synthetic predictions and images tables for tests and benchmarks (schema-valid, seeded)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from detloop.data import schema


def image_ids(n_images: int, prefix: str = "pool/img_") -> pa.Array:
    """``pool/img_0000000``-style ids, zero-padded so that string order equals number order."""
    width = max(1, len(str(max(n_images - 1, 0))))
    nums = np.char.zfill(np.arange(n_images).astype(str), width)
    return pa.array(np.char.add(prefix, nums).astype(object), pa.string())


def synthetic_images(ids: pa.Array, phash: np.ndarray | None = None) -> pa.Table:
    """An images table: every id an unlabeled pool image of 1280×720."""
    n = len(ids)
    table = pa.table(
        {
            "image_id": ids,
            "file": pa.compute.binary_join_element_wise(ids, pa.scalar(".png"), ""),
            "width": pa.array(np.full(n, 1280, dtype=np.int32)),
            "height": pa.array(np.full(n, 720, dtype=np.int32)),
            "split": pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), ["pool"]).cast("string"),
            "state": pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), ["unlabeled"]).cast(
                "string"
            ),
            "iteration": pa.nulls(n, pa.int32()),
            "phash": pa.nulls(n, pa.uint64()) if phash is None else pa.array(phash, pa.uint64()),
            "source_id": pa.nulls(n, pa.string()),
            "reason": pa.nulls(n, pa.string()),
        }
    )
    return schema.validate_table(table, schema.IMAGES)


def _f32(x: np.ndarray) -> pa.Array:
    return pa.array(x.astype(np.float32))


def synthetic_predictions(
    n_images: int,
    n_dets: int,
    rng: np.random.Generator,
    n_classes: int = 10,
    calibrated: bool = True,
) -> tuple[pa.Table, pa.Table]:
    """A predictions table of ``n_dets`` detections spread over ``n_images`` images.

    Detections are grouped by image (as inference writes them); some images get none.

    Returns:
        (predictions, images), both validated.
    """
    ids = image_ids(n_images)
    counts: np.ndarray = (
        rng.multinomial(n_dets, np.full(n_images, 1.0 / n_images))
        if n_images
        else np.zeros(0, np.int64)
    )
    codes = np.repeat(np.arange(n_images), counts)
    x1 = rng.uniform(0, 1000, n_dets)
    y1 = rng.uniform(0, 600, n_dets)
    w = rng.uniform(5, 250, n_dets)
    h = rng.uniform(5, 110, n_dets)
    cols: dict[str, pa.Array] = {
        "image_id": ids.take(pa.array(codes)) if n_dets else pa.array([], pa.string()),
        "det_id": pa.array(np.arange(n_dets) - np.repeat(np.cumsum(counts) - counts, counts)).cast(
            pa.int32()
        ),
        "class_id": pa.array(rng.integers(0, n_classes, n_dets, dtype=np.int32)),
        "score": _f32(rng.uniform(0.001, 1.0, n_dets)),
        "x1": _f32(x1),
        "y1": _f32(y1),
        "x2": _f32(x1 + w),
        "y2": _f32(y1 + h),
        "entropy": _f32(rng.uniform(0, np.log2(n_classes), n_dets)),
        "mc_class": _f32(rng.gamma(2.0, 0.05, n_dets)),
    }
    for head, scale in (("al", 4.0), ("mc", 2.0)):
        for c in schema.COORDS:
            cols[f"{head}_{c}"] = _f32(rng.gamma(2.0, scale, n_dets))
    cols["logits"] = pa.nulls(n_dets, pa.list_(pa.float32()))
    cols["mc_class_vec"] = pa.nulls(n_dets, pa.list_(pa.float32()))
    if calibrated:
        for name in schema.UNCERTAINTY_COLS:
            cols[f"{name}_cal"] = _f32(np.asarray(cols[name]) * rng.uniform(0.8, 1.2, n_dets))
    preds = schema.validate_table(pa.table(cols), schema.PREDICTIONS)
    return preds, synthetic_images(ids)


_DEFAULTS: dict[str, float] = {
    "class_id": 0,
    "score": 0.9,
    "x1": 0.0,
    "y1": 0.0,
    "x2": 10.0,
    "y2": 10.0,
    "entropy": 0.5,
    "mc_class": 0.1,
    **{f"{h}_{c}": 1.0 for h in ("al", "mc") for c in schema.COORDS},
}


def predictions_from_rows(rows: list[dict[str, object]], calibrated: bool = False) -> pa.Table:
    """A validated predictions table from a few hand-written rows (tests, examples).

    Each row needs ``image_id``; every other column defaults (score 0.9, a 10×10 box at the
    origin, entropy 0.5, mc_class 0.1, every std 1.0). ``det_id`` counts per image. With
    ``calibrated``, ``*_cal`` twins equal to the row's ``<name>_cal`` value or its plain one.
    """
    seen: dict[str, int] = {}
    data: dict[str, list[object]] = {"image_id": [], "det_id": []}
    names = list(_DEFAULTS) + ([f"{c}_cal" for c in schema.UNCERTAINTY_COLS] if calibrated else [])
    for name in names:
        data[name] = []
    for row in rows:
        image_id = str(row["image_id"])
        data["image_id"].append(image_id)
        data["det_id"].append(row.get("det_id", seen.get(image_id, 0)))
        seen[image_id] = seen.get(image_id, 0) + 1
        for name in names:
            base = name[: -len("_cal")] if name.endswith("_cal") else name
            data[name].append(row.get(name, row.get(base, _DEFAULTS.get(base))))
    n = len(rows)
    table = pa.table(
        {
            **{k: pa.array(v) for k, v in data.items()},
            "logits": pa.nulls(n, pa.list_(pa.float32())),
            "mc_class_vec": pa.nulls(n, pa.list_(pa.float32())),
        }
    )
    return schema.validate_table(table.select(_ordered(table.column_names)), schema.PREDICTIONS)


def _ordered(present: list[str]) -> list[str]:
    spec = [*schema.PREDICTIONS.schema.names, *(f.name for f in schema.PREDICTIONS.optional)]
    return [c for c in spec if c in present]
