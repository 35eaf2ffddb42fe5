"""Tiny preset on digits-det small, CPU: mAP50 on the test split against training wall time.

Usage: python bench/train_tiny.py [--data DIR] [--epochs N] [--eval-every K] [--threads 2]
                                  [--limit N] [--set key=value ...]
Builds digits-det small (2000/300/300) into --data when absent, imports pool and test into a
temporary run, trains the tiny preset and evaluates test mAP after every K epochs (evaluation
time is not counted as training time). Prints the curve; writes bench/results/train_tiny.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from detloop.config import build_config
from detloop.data.digits import digits_source, make_digits
from detloop.data.importer import import_source
from detloop.data.rundir import RunDir
from detloop.learners.evaluate_run import evaluate_model
from detloop.learners.model import UncertainEfficientDet
from detloop.learners.train import effective_train_config, train_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(tempfile.gettempdir()) / "detloop_digits_small"  # built once, reused
    ap.add_argument("--data", type=Path, default=default_data)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N pool images")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, default=RESULTS / "train_tiny.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "test.json").exists():
        make_digits(args.data, "small", seed=0)
    run = RunDir(Path(tempfile.mkdtemp(prefix="train_tiny_")) / "run")
    for split in ("pool", "test"):
        source, images_dir = digits_source(args.data, split)
        import_source(run, "coco", source, split, images=images_dir, decode=False)
    images, gt = run.read_images(), run.read_gt()
    pool = images.filter(pc.equal(images.column("split"), "pool"))
    if args.limit:
        pool = pool.slice(0, args.limit)
    test = images.filter(pc.equal(images.column("split"), "test"))
    labels = gt.filter(pc.is_in(gt.column("image_id"), pool.column("image_id")))
    labels = labels.append_column("weight", pa.array(np.ones(labels.num_rows, np.float32)))
    test_gt = gt.filter(pc.is_in(gt.column("image_id"), test.column("image_id")))
    cfg = build_config(
        {"model": {"preset": "tiny"}, "train": {"epochs": args.epochs, "device": "cpu"}},
        overrides=args.overrides,
    )
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    eval_seconds = 0.0

    def on_epoch(epoch: int, model: UncertainEfficientDet) -> None:
        nonlocal eval_seconds
        if epoch % args.eval_every and epoch != args.epochs:
            return
        t0 = time.perf_counter()
        m = evaluate_model(model, cfg, test, test_gt, seed=0, categories=run.read_categories())
        eval_seconds += time.perf_counter() - t0
        wall = time.perf_counter() - start - eval_seconds
        curve.append({"epoch": epoch, "train_wall_s": wall, "map50": m["map50"], "map": m["map"]})
        print(
            f"epoch {epoch:3d}  train wall {wall:7.1f} s  "
            f"test mAP50 {m['map50']:.3f}  mAP {m['map']:.3f}",
            flush=True,
        )

    result = train_model(
        cfg, pool, labels, 10, run.path / "ckpt", seed=0, progress=False, on_epoch=on_epoch
    )
    tcfg = effective_train_config(cfg)
    summary = {
        "bench": "train_tiny",
        "device": "cpu",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "pool_images": pool.num_rows,
        "test_images": test.num_rows,
        "train": {
            "epochs": args.epochs,
            "lr": tcfg.lr,
            "batch_size": tcfg.batch_size,
            "scale_jitter": list(tcfg.scale_jitter),
            "overrides": args.overrides,
        },
        "steps": result.steps,
        "train_compute_s": result.seconds,
        "curve": curve,
        "final_map50": curve[-1]["map50"] if curve else None,
        "target": "mAP50 >= 0.6 within 900 s of training wall time",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1))


if __name__ == "__main__":
    main()
