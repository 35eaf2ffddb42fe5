"""Data-layer scale benchmark (issue 2 acceptance figures).

1. A generated 100,000-image COCO file (3 boxes per image on average; every image file exists,
   empty) is parsed, validated (keys, types, boxes, categories, duplicates, existence of every
   file) and written into a new run. Target: <= 10 s. Decoding is not part of this figure.
2. Image decode + perceptual-hash throughput (images/s) on real PNG/JPEG files, reported apart.
3. Write and read (both schema-validated) of a 1,000,000-image pool table. Target: <= 5 s each.

Prints the figures and writes them to ``bench/results/data_scale.json``.
Usage: ``python bench/data_scale.py [--images 100000] [--pool-rows 1000000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from detloop.data import schema
from detloop.data.coco import parse_coco
from detloop.data.images import decode_images
from detloop.data.importer import check_files, commit
from detloop.data.io import read_table, write_table
from detloop.data.rundir import RunDir

RESULTS = Path(__file__).resolve().parent / "results" / "data_scale.json"


def make_coco(root: Path, n_images: int, rng: np.random.Generator) -> Path:
    """A COCO file of ``n_images`` 640x480 images (empty files) with 1-5 random boxes each."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    n_boxes = rng.integers(1, 6, size=n_images)
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        os.close(os.open(images_dir / name, os.O_CREAT | os.O_WRONLY, 0o644))
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        for _ in range(n_boxes[i]):
            x, y = rng.uniform(0, 500), rng.uniform(0, 380)
            w, h = rng.uniform(4, 630 - x), rng.uniform(4, 470 - y)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 11)),
                    "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
    doc = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k, "name": f"class{k}"} for k in range(1, 11)],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def bench_import(tmp: Path, n_images: int) -> dict[str, Any]:
    path = make_coco(tmp / "coco", n_images, np.random.default_rng(0))
    run = RunDir(tmp / "run")
    t0 = time.perf_counter()
    parsed = parse_coco(path, tmp / "coco" / "images")
    t1 = time.perf_counter()
    check_files(parsed, "pool")
    t2 = time.perf_counter()
    report = commit(run, parsed, "pool")
    t3 = time.perf_counter()
    assert report.n_images == n_images and not report.problems
    return {
        "images": n_images,
        "boxes": report.n_boxes,
        "json_mb": path.stat().st_size / 2**20,
        "parse_validate_s": t1 - t0,
        "existence_check_s": t2 - t1,
        "write_run_s": t3 - t2,
        "total_s": t3 - t0,
        "target_s": 10.0,
        "pass": t3 - t0 <= 10.0,
    }


def bench_decode(tmp: Path, n: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    for label, size, ext in (
        ("png_128x128", (128, 128), "png"),
        ("jpeg_1242x375", (1242, 375), "jpg"),
        ("jpeg_640x480", (640, 480), "jpg"),
    ):
        files = []
        for i in range(n):
            small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
            files.append(tmp / f"{label}_{i}.{ext}")
            img.save(files[-1])
        out[label] = {"images": n}
        for workers in (1, 2):
            t0 = time.perf_counter()
            results = decode_images(files, [True] * n, workers=workers)
            dt = time.perf_counter() - t0
            assert all(r.error is None and r.phash is not None for r in results)
            out[label][f"images_per_s_{workers}_proc"] = n / dt
    return out


def bench_pool_table(tmp: Path, n: int) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    states = np.array(schema.IMAGE_STATES)[rng.integers(0, 4, n)]
    table = pa.table(
        {
            "image_id": pa.array([f"pool/{i:09d}" for i in range(n)]),
            "file": pa.array([f"/data/images/{i:09d}.jpg" for i in range(n)]),
            "width": pa.array(np.full(n, 1242, np.int32)),
            "height": pa.array(np.full(n, 375, np.int32)),
            "split": pa.array(np.full(n, "pool")),
            "state": pa.array(states),
            "iteration": pa.array(rng.integers(0, 8, n).astype(np.int32)),
            "phash": pa.array(rng.integers(0, 2**63, n, dtype=np.uint64) * 2),
            "source_id": pa.array([str(i) for i in range(n)]),
            "reason": pa.nulls(n, pa.string()),
        }
    )
    path = tmp / "images.parquet"
    t0 = time.perf_counter()
    write_table(table, schema.IMAGES, path)
    t1 = time.perf_counter()
    back = read_table(schema.IMAGES, path)
    t2 = time.perf_counter()
    assert back.num_rows == n
    return {
        "rows": n,
        "write_s": t1 - t0,
        "read_s": t2 - t1,
        "file_mb": path.stat().st_size / 2**20,
        "target_s": 5.0,
        "pass": max(t1 - t0, t2 - t1) <= 5.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--pool-rows", type=int, default=1_000_000)
    parser.add_argument("--decode-images", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="detloop-bench-") as tmp:
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "load_avg_1min": os.getloadavg()[0],
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "coco_import": bench_import(Path(tmp), args.images),
            "decode_phash": bench_decode(Path(tmp), args.decode_images),
            "pool_table": bench_pool_table(Path(tmp), args.pool_rows),
        }
    imp, pool = result["coco_import"], result["pool_table"]
    print(
        f"COCO import, {imp['images']:,} images / {imp['boxes']:,} boxes: "
        f"{imp['total_s']:.2f} s (parse+validate {imp['parse_validate_s']:.2f}, existence "
        f"{imp['existence_check_s']:.2f}, write {imp['write_run_s']:.2f}) "
        f"[target <= 10 s: {'ok' if imp['pass'] else 'MISSED'}]"
    )
    for label, d in result["decode_phash"].items():
        print(
            f"decode + phash {label}: {d['images_per_s_1_proc']:.0f} images/s in one process, "
            f"{d['images_per_s_2_proc']:.0f} images/s with 2 worker processes"
        )
    print(
        f"pool table {pool['rows']:,} rows: write {pool['write_s']:.2f} s, read "
        f"{pool['read_s']:.2f} s [target <= 5 s: {'ok' if pool['pass'] else 'MISSED'}]"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if imp["pass"] and pool["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
