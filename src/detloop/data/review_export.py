"""Exports for human review: COCO with pre-annotations and Label Studio tasks (ARCHITECTURE §2).

Both take the same inputs: an images frame (``image_id, file, width, height``), a boxes frame
(``image_id, class_id, x1, y1, x2, y2`` in absolute pixels, optionally ``score`` and ``u``) and
the categories frame (``class_id, name, source_id``), so the COCO export restores the original
category ids. The COCO file is written by ``detloop.data.export.write_coco`` with the
``review`` id policy (1-based positions, image files as stored). Label Studio boxes are in
percent of the image, each carrying its score and uncertainty; the matching labeling-config XML
is written beside the tasks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import pandas as pd
import pyarrow as pa

from detloop.data.errors import DataError
from detloop.data.export import finite_or_none, write_coco
from detloop.data.io import atomic_open, write_json
from detloop.data.min_score import DEFAULT_MIN_SCORE
from detloop.data.rundir import RunDir
from detloop.data.schema import COORDS

FROM_NAME = "label"
TO_NAME = "image"


def _category_ids(categories: pd.DataFrame) -> dict[int, tuple[int, str]]:
    """class_id -> (COCO category id, name)."""
    return {int(r["class_id"]): (int(r["source_id"]), str(r["name"])) for r in _records(categories)}


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in r.items()} for r in df.to_dict(orient="records")]


def local_files_url(file: str, document_root: Path) -> str:
    """Label Studio local-files URL of ``file`` relative to ``document_root``
    (``LOCAL_FILES_DOCUMENT_ROOT``)."""
    return f"/data/local-files/?d={_under_root(file, document_root)}"


def _under_root(file: str, root: Path) -> str:
    """``file``'s path under ``root`` (POSIX); an image outside the root is an error."""
    rel = Path(os.path.relpath(Path(file).resolve(), root.resolve())).as_posix()
    if rel == ".." or rel.startswith("../") or Path(rel).is_absolute():
        raise DataError(file, None, "file", f"outside labeling.document_root {root}")
    return rel


def image_reference(file: str, document_root: Path | None, url_prefix: str | None = None) -> str:
    """How a review task names its image: the file itself; a Label Studio local-files URL
    under ``document_root``; or ``<url_prefix>/<path under document_root>`` (http, S3).

    Raises:
        DataError: an image outside ``document_root``.
    """
    if document_root is None:
        return file
    rel = _under_root(file, document_root)
    if url_prefix is not None:
        return f"{url_prefix.rstrip('/')}/{quote(rel)}"
    return f"/data/local-files/?d={rel}"


def _region(r: dict[str, Any], k: int, width: int, height: int, name: str) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(r[c]) for c in COORDS)
    score, u = finite_or_none(r.get("score")), finite_or_none(r.get("u"))
    region: dict[str, Any] = {
        "id": f"det{int(r.get('det_id', k))}",
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * x1 / width,
            "y": 100.0 * y1 / height,
            "width": 100.0 * (x2 - x1) / width,
            "height": 100.0 * (y2 - y1) / height,
            "rotation": 0,
            "rectanglelabels": [name],
        },
        "meta": {"text": [f"score {score}, uncertainty {u}"], "score": score, "uncertainty": u},
    }
    if score is not None:
        region["score"] = score
    return region


def label_studio_tasks(
    images: pd.DataFrame,
    boxes: pd.DataFrame,
    categories: pd.DataFrame,
    *,
    model_version: str = "detloop",
    document_root: Path | None = None,
    url_prefix: str | None = None,
) -> list[dict[str, Any]]:
    """Label Studio tasks, one per image, with the boxes as one prediction.

    ``data.image`` is the image's file, or its local-files URL when ``document_root`` is given.
    """
    names = {c: n for c, (_, n) in _category_ids(categories).items()}
    by_image: dict[str, list[dict[str, Any]]] = {}
    for d in _records(boxes):
        by_image.setdefault(str(d["image_id"]), []).append(d)
    tasks: list[dict[str, Any]] = []
    for r in _records(images.sort_values("image_id", kind="stable")):
        w, h = int(r["width"]), int(r["height"])
        dets = by_image.get(str(r["image_id"]), [])
        regions = [_region(d, k, w, h, names[int(d["class_id"])]) for k, d in enumerate(dets)]
        file = str(r["file"])
        image = image_reference(file, document_root, url_prefix)
        scores = [reg["score"] for reg in regions if "score" in reg]
        prediction: dict[str, Any] = {"model_version": model_version, "result": regions}
        if scores:
            prediction["score"] = float(min(scores))
        tasks.append(
            {
                "data": {"image": image, "detloop_id": str(r["image_id"])},
                "predictions": [prediction],
            }
        )
    return tasks


def labeling_config(categories: pd.DataFrame) -> str:
    """The Label Studio labeling config matching ``label_studio_tasks``."""
    labels = "\n".join(
        f"    <Label value={quoteattr(str(n))}/>"
        for n in categories.sort_values("class_id")["name"]
    )
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
        f'  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}">\n'
        f"{labels}\n"
        "  </RectangleLabels>\n"
        "</View>\n"
    )


def write_label_studio(
    images: pd.DataFrame,
    boxes: pd.DataFrame,
    categories: pd.DataFrame,
    path: Path,
    *,
    model_version: str = "detloop",
    document_root: Path | None = None,
    url_prefix: str | None = None,
) -> tuple[Path, Path]:
    """Write the tasks JSON to ``path`` and ``<stem>.xml`` (labeling config) beside it."""
    tasks = label_studio_tasks(
        images,
        boxes,
        categories,
        model_version=model_version,
        document_root=document_root,
        url_prefix=url_prefix,
    )
    write_json(tasks, path)
    xml_path = path.with_suffix(".xml")
    with atomic_open(xml_path) as fh:
        fh.write(labeling_config(categories))
    return path, xml_path


def run_categories(run: RunDir, class_ids: Sequence[int] = ()) -> pd.DataFrame:
    """The run's categories, or ``"<class_id>"`` names (COCO id class_id + 1) when it has none."""
    cats: pd.DataFrame = run.read_categories().to_pandas()
    if len(cats):
        return cats
    ids = sorted({int(c) for c in class_ids})
    return pd.DataFrame(
        {"class_id": ids, "name": [str(c) for c in ids], "source_id": [c + 1 for c in ids]}
    )


def export_review(
    run: RunDir,
    *,
    image_ids: Sequence[str],
    predictions: pa.Table | pd.DataFrame | None,
    out_stem: Path,
    min_score: float = DEFAULT_MIN_SCORE,
    document_root: Path | None = None,
    url_prefix: str | None = None,
) -> dict[str, Path]:
    """Export ``image_ids`` for human review, pre-annotated with their predictions.

    Writes ``<out_stem>.coco.json``, ``<out_stem>.label_studio.json`` and the labeling config
    ``<out_stem>.label_studio.xml``. Only detections with score > ``min_score`` become
    pre-annotations; a ``u`` column (uncertainty) is carried along when present.
    """
    images = run.read_images().to_pandas()
    images = images[images["image_id"].isin(list(image_ids))]
    if predictions is None:
        boxes = pd.DataFrame(columns=["image_id", "class_id", *COORDS, "score"])
    else:
        boxes = predictions.to_pandas() if isinstance(predictions, pa.Table) else predictions
        keep = boxes["image_id"].isin(list(image_ids)) & (boxes["score"] > min_score)
        boxes = boxes[keep].drop(columns=["logits", "mc_class_vec"], errors="ignore")
    cats = run_categories(run, boxes["class_id"].tolist())
    coco = write_coco(images, boxes, cats, Path(f"{out_stem}.coco.json"), policy="review")
    ls_json, ls_xml = write_label_studio(
        images,
        boxes,
        cats,
        Path(f"{out_stem}.label_studio.json"),
        document_root=document_root,
        url_prefix=url_prefix,
    )
    return {"coco": coco, "label_studio": ls_json, "label_studio_config": ls_xml}
