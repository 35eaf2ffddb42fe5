"""Matching and COCO mAP (ALGORITHMS §4, "Tests that pin it" (a)–(d))."""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detloop.data.errors import DataError
from detloop.data.schema import CATEGORIES, GT, IMAGES, PREDICTIONS, validate_table
from detloop.learners.evaluate import (
    background_false_positives,
    coco_map,
    match_coco,
    match_reference,
    performance_summary,
)

COCO_STATS = (
    "map",
    "map50",
    "map75",
    "map_s",
    "map_m",
    "map_l",
    "ar1",
    "ar10",
    "ar100",
    "ar_s",
    "ar_m",
    "ar_l",
)
NAMES = ("car", "person", "bike", "truck")


def gt_table(rows: list[dict[str, Any]]) -> pa.Table:
    """GT rows given as image_id, class_id, box (xyxy), optional iscrowd/occluded/truncated."""
    cols: dict[str, list[Any]] = {f.name: [] for f in GT.schema}
    for k, r in enumerate(rows):
        x1, y1, x2, y2 = r["box"]
        for name, value in zip(("x1", "y1", "x2", "y2"), r["box"], strict=True):
            cols[name].append(float(value))
        cols["image_id"].append(r["image_id"])
        cols["box_id"].append(r.get("box_id", 100 + k))
        cols["class_id"].append(r["class_id"])
        cols["area"].append(r.get("area", (x2 - x1) * (y2 - y1)))
        cols["iscrowd"].append(r.get("iscrowd", 0))
        cols["occluded"].append(r.get("occluded", -1))
        cols["truncated"].append(r.get("truncated", -1))
        cols["source_id"].append(None)
    return validate_table(pa.table(cols, schema=GT.schema), GT)


def pred_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Prediction rows given as image_id, det_id, class_id, score, box; heads absent (null)."""
    cols: dict[str, list[Any]] = {f.name: [] for f in PREDICTIONS.schema}
    for r in rows:
        for f in PREDICTIONS.schema:
            cols[f.name].append(None)
        for key in ("image_id", "det_id", "class_id", "score"):
            cols[key][-1] = r[key]
        for name, value in zip(("x1", "y1", "x2", "y2"), r["box"], strict=True):
            cols[name][-1] = float(value)
    return validate_table(pa.table(cols, schema=PREDICTIONS.schema), PREDICTIONS)


def images_table(sizes: dict[str, tuple[int, int]]) -> pa.Table:
    n = len(sizes)
    return validate_table(
        pa.table(
            {
                "image_id": list(sizes),
                "file": [f"{i}.png" for i in sizes],
                "width": [w for w, _ in sizes.values()],
                "height": [h for _, h in sizes.values()],
                "split": ["val"] * n,
                "state": ["labeled"] * n,
                "iteration": [None] * n,
                "phash": pa.array([None] * n, pa.uint64()),
                "source_id": [None] * n,
                "reason": [None] * n,
            }
        ),
        IMAGES,
    )


def categories_table(n: int) -> pa.Table:
    return validate_table(
        pa.table(
            {"class_id": list(range(n)), "name": list(NAMES[:n]), "source_id": list(range(n))}
        ),
        CATEGORIES,
    )


def random_fixture(seed: int, n_images: int = 12, n_classes: int = 4) -> dict[str, Any]:
    """Images with GT of every size class (small < 32², medium, large > 96²), crowd boxes,
    and predictions: jittered true positives, duplicates, wrong classes, strays, tied scores."""
    rng = np.random.default_rng(seed)
    sizes = {
        f"img{i:02d}": (int(rng.integers(300, 640)), int(rng.integers(300, 480)))
        for i in range(n_images)
    }
    gts: list[dict[str, Any]] = []
    preds: list[dict[str, Any]] = []
    for image_id, (w, h) in sizes.items():
        for _ in range(int(rng.integers(0, 7))):
            side = float(
                rng.choice([rng.uniform(8, 30), rng.uniform(35, 90), rng.uniform(100, 200)])
            )
            bw, bh = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = np.array([x1, y1, x1 + bw, y1 + bh])
            cls = int(rng.integers(0, n_classes))
            crowd = int(rng.random() < 0.15)
            gts.append(
                {
                    "image_id": image_id,
                    "class_id": cls,
                    "box": box,
                    "iscrowd": crowd,
                    "area": bw * bh * rng.uniform(0.6, 1.0),
                }
            )
            for _ in range(int(rng.integers(0, 3))):  # detections near this GT
                jitter = rng.normal(0, 0.15 * side, 4)
                wrong = rng.random() < 0.2
                preds.append(
                    {
                        "image_id": image_id,
                        "box": box + jitter,
                        "class_id": int(rng.integers(0, n_classes)) if wrong else cls,
                    }
                )
        for _ in range(int(rng.integers(0, 3))):  # strays
            x1, y1 = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
            preds.append(
                {
                    "image_id": image_id,
                    "class_id": int(rng.integers(0, n_classes)),
                    "box": np.array([x1, y1, x1 + 40, y1 + 30]),
                }
            )
    for p in preds:
        p["score"] = float(
            np.float32(rng.choice([0.5, 0.25]) if rng.random() < 0.2 else rng.random())
        )
    order = rng.permutation(len(preds))
    det_ids: dict[str, int] = {}
    preds = [preds[i] for i in order]
    for p in preds:
        p["det_id"] = det_ids.setdefault(p["image_id"], 0)
        det_ids[p["image_id"]] += 1
        p["box"] = np.clip(p["box"], 0, None)
        p["box"][2:] = np.maximum(p["box"][2:], p["box"][:2] + 1)
    return {
        "images": images_table(sizes),
        "gt": gt_table(gts),
        "predictions": pred_table(preds),
        "categories": categories_table(n_classes),
    }


def independent_cocoeval(fx: dict[str, Any]) -> COCOeval:
    """COCOeval on COCO dicts built here from the tables, the standard loadRes way."""
    images = fx["images"].to_pylist()
    img_id = {r["image_id"]: 1000 + 3 * i for i, r in enumerate(images)}
    gt_json = {
        "images": [
            {"id": img_id[r["image_id"]], "width": r["width"], "height": r["height"]}
            for r in images
        ],
        "categories": [
            {"id": r["class_id"] + 1, "name": r["name"]} for r in fx["categories"].to_pylist()
        ],
        "annotations": [
            {
                "id": r["box_id"] + 1,
                "image_id": img_id[r["image_id"]],
                "category_id": r["class_id"] + 1,
                "bbox": [r["x1"], r["y1"], r["x2"] - r["x1"], r["y2"] - r["y1"]],
                "area": r["area"],
                "iscrowd": r["iscrowd"],
            }
            for r in fx["gt"].to_pylist()
        ],
    }
    dets = [
        {
            "image_id": img_id[r["image_id"]],
            "category_id": r["class_id"] + 1,
            "score": r["score"],
            "bbox": [r["x1"], r["y1"], r["x2"] - r["x1"], r["y2"] - r["y1"]],
        }
        for r in fx["predictions"].to_pylist()
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_json
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_map_equals_pycocotools(seed: int) -> None:
    fx = random_fixture(seed)
    gt = fx["gt"].to_pandas()
    area = gt["area"]
    assert gt["iscrowd"].sum() >= 2 and gt["class_id"].nunique() >= 3
    assert (area < 32**2).any() and ((area > 32**2) & (area < 96**2)).any() and (area > 96**2).any()
    result = coco_map(fx["predictions"], fx["gt"], fx["images"], fx["categories"])
    ev = independent_cocoeval(fx)
    for key, value in zip(COCO_STATS, ev.stats, strict=True):
        assert result[key] == pytest.approx(value, abs=1e-9), key
    assert 0.05 < result["map"] < 0.95  # a non-trivial fixture
    for k, name in enumerate(NAMES):
        pr = ev.eval["precision"][:, :, k, 0, -1]
        assert result[f"ap/{name}"] == pytest.approx(pr[pr > -1].mean(), abs=1e-9)


def test_perfect_predictions_give_ap_one() -> None:
    fx = random_fixture(3)
    gt = [r for r in fx["gt"].to_pylist() if not r["iscrowd"]]
    perfect = pred_table(
        [
            {
                "image_id": r["image_id"],
                "det_id": k,
                "class_id": r["class_id"],
                "score": 1.0,
                "box": (r["x1"], r["y1"], r["x2"], r["y2"]),
            }
            for k, r in enumerate(gt)
        ]
    )
    result = coco_map(perfect, fx["gt"], fx["images"], fx["categories"])
    assert result["map"] == 1.0 and result["map50"] == 1.0 and result["map75"] == 1.0
    assert result["ar100"] == 1.0
    assert all(result[f"ap/{n}"] == 1.0 for n in NAMES)


def test_coco_map_empty_predictions_and_unknown_image() -> None:
    fx = random_fixture(4)
    empty = fx["predictions"].slice(0, 0)
    assert coco_map(empty, fx["gt"], fx["images"], fx["categories"])["map"] == 0.0
    stray = pred_table(
        [{"image_id": "nope", "det_id": 0, "class_id": 0, "score": 0.5, "box": (0, 0, 5, 5)}]
    )
    with pytest.raises(DataError, match="nope"):
        coco_map(stray, fx["gt"], fx["images"], fx["categories"])


@pytest.mark.parametrize("seed", [5, 6, 7, 8])
def test_coco_matcher_agrees_with_cocoeval_dt_matches(seed: int) -> None:
    fx = random_fixture(seed, n_images=15)
    ev = independent_cocoeval(fx)
    preds = fx["predictions"].to_pylist()
    gt_box_id = {r["box_id"] + 1: r["box_id"] for r in fx["gt"].to_pylist()}
    expected: dict[tuple[str, int], tuple[bool, bool, int | None]] = {}
    for e in ev.evalImgs:
        if e is None or e["aRng"] != [0, 1e10] or e["maxDet"] != 100:
            continue
        for j, dt_id in enumerate(e["dtIds"]):
            p = preds[dt_id - 1]
            m, ig = int(e["dtMatches"][0, j]), bool(e["dtIgnore"][0, j])
            expected[p["image_id"], p["det_id"]] = (m > 0 and not ig, ig, gt_box_id.get(m))
    got = match_coco(fx["predictions"], fx["gt"], iou_threshold=0.5).to_pylist()
    assert len(got) == len(preds) == len(expected)
    n_tp = n_ig = 0
    for r in got:
        assert (r["tp"], r["ignored"], r["gt_id"]) == expected[r["image_id"], r["det_id"]]
        n_tp += r["tp"]
        n_ig += r["ignored"]
    assert 5 < n_tp < len(got) and n_ig >= 1  # crowd absorptions are exercised


def hand_case() -> tuple[pa.Table, pa.Table]:
    """GT A and B are both best matched by detection 7 (IoU 9/11 and 2/3)."""
    gt = gt_table(
        [
            {"image_id": "a", "class_id": 0, "box": (0, 0, 10, 10), "box_id": 1, "occluded": 2},
            {"image_id": "a", "class_id": 0, "box": (3, 0, 13, 10), "box_id": 2, "truncated": 1},
            {"image_id": "a", "class_id": 1, "box": (100, 100, 120, 120), "box_id": 3},
            {"image_id": "b", "class_id": 2, "box": (0, 0, 50, 50), "box_id": 4},
        ]
    )
    dets = [
        {
            "det_id": i,
            "class_id": 1,
            "score": 0.5 - 0.01 * i,
            "box": (200 + 30 * i, 0, 220 + 30 * i, 20),
        }
        for i in range(7)
    ]
    dets[2] = {"det_id": 2, "class_id": 2, "score": 0.45, "box": (101, 100, 121, 120)}
    dets[5] = {"det_id": 5, "class_id": 1, "score": 0.40, "box": (101, 100, 121, 120)}
    dets.append({"det_id": 7, "class_id": 0, "score": 0.9, "box": (1, 0, 11, 10)})
    return pred_table([{"image_id": "a", **d} for d in dets]), gt


def test_reference_and_coco_hand_example() -> None:
    preds, gt = hand_case()
    m = match_reference(preds, gt).to_pylist()
    assert [r["det_id"] for r in m] == [7, 7, 2, None]  # det 2 and 5 tie on GT 3: lowest id
    assert m[0]["iou"] == pytest.approx(9 / 11) and m[1]["iou"] == pytest.approx(2 / 3)
    assert m[3]["iou"] == 0.0
    assert (m[0]["gt_occl"], m[0]["gt_trunc"], m[1]["gt_trunc"]) == (2, -1, 1)
    assert [r["gt_id"] for r in m] == [1, 2, 3, 4]
    coco = {r["det_id"]: r for r in match_coco(preds, gt).to_pylist()}
    assert coco[7]["tp"] and coco[7]["gt_id"] == 1  # the higher-IoU GT; GT 2 is a miss
    assert coco[5]["tp"] and coco[5]["gt_id"] == 3  # det 2 has the wrong class
    assert not coco[2]["tp"] and coco[2]["gt_id"] is None
    assert sum(r["tp"] for r in coco.values()) == 2


def test_reference_assign_modes() -> None:
    preds, gt = hand_case()
    mse = match_reference(preds, gt, assign="MSE").to_pylist()
    assert [r["det_id"] for r in mse] == [7, 7, 2, None]
    index = match_reference(preds, gt, assign="index").to_pylist()
    # positions within image a by box_id: GT 1 → det 0 (no overlap), GT 2 → det 1, GT 3 → det 2
    assert [r["det_id"] for r in index] == [None, None, 2, None]
    with pytest.raises(ValueError, match="assign_gt_box"):
        match_reference(preds, gt, assign="iou")


def test_background_false_positives_hand_example() -> None:
    gt = gt_table(
        [
            {"image_id": "a", "class_id": 0, "box": (0, 0, 10, 10)},
            {"image_id": "a", "class_id": 1, "box": (20, 20, 40, 40)},
            {"image_id": "b", "class_id": 0, "box": (0, 0, 100, 100), "iscrowd": 1},
        ]
    )
    rows = [
        ("a", 0, 0, 0.9, (0, 0, 10, 11)),  # TP
        ("a", 1, 1, 0.8, (21, 20, 41, 40)),  # TP
        ("a", 2, 0, 0.7, (60, 60, 80, 80)),  # stray: the background FP
        ("a", 3, 0, 0.3, (60, 0, 80, 20)),  # stray below min_score: not counted
        ("a", 4, 0, 0.4, (90, 0, 99, 20)),  # exactly min_score: not counted
        ("b", 0, 0, 0.9, (10, 10, 30, 30)),  # inside a crowd region: ignored
    ]
    preds = pred_table(
        [
            dict(zip(("image_id", "det_id", "class_id", "score", "box"), r, strict=True))
            for r in rows
        ]
    )
    assert background_false_positives(preds, gt, iou=0.5, min_score=0.4) == 1
    assert background_false_positives(preds, gt, iou=0.5, min_score=0.35) == 2
    assert background_false_positives(preds, gt, iou=0.95, min_score=0.4) == 3


def test_performance_summary_hand_example() -> None:
    preds, gt = hand_case()
    s = performance_summary(match_reference(preds, gt), preds, decode_method="l-norm")
    assert s["n_gt"] == 4 and s["missing_pct"] == pytest.approx(25.0)
    assert s["misclass_rate"] == pytest.approx(1 / 3)  # GT 3 (class 1) took det 2 (class 2)
    ious = [9 / 11, 2 / 3, 20 * 19 / (21 * 20)]
    assert s["miou_matched"] == pytest.approx(np.mean(ious), rel=1e-6)
    assert s["miou_all"] == pytest.approx(np.sum(ious) / 4, rel=1e-6)
    # corner errors on non-zero GT coordinates: GT1 (x2, y2): 1, 0; GT2 (x1, x2, y2): 2, 2, 0;
    # GT3: 1, 0, 1, 0
    assert s["rmse"] == pytest.approx(math.sqrt(11 / 9))
    assert s["decode_method"] == "l-norm"
    empty = performance_summary(match_reference(preds.slice(0, 0), gt), preds)
    assert empty["missing_pct"] == 100.0 and math.isnan(empty["miou_matched"])


def test_matchers_on_empty_tables() -> None:
    preds, gt = hand_case()
    assert match_coco(preds.slice(0, 0), gt).num_rows == 0
    assert match_reference(preds, gt.slice(0, 0)).num_rows == 0
    no_gt = match_coco(preds, gt.slice(0, 0)).to_pandas()
    assert len(no_gt) == preds.num_rows and not no_gt["tp"].any() and no_gt["gt_id"].isna().all()
