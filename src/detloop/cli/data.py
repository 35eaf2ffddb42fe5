"""Data verbs: ``make-dataset digits``, ``import coco|kitti|folder``, ``export coco``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from detloop.data.digits import SIZES, make_digits
from detloop.data.errors import MAX_LISTED
from detloop.data.export import export_coco
from detloop.data.importer import import_source
from detloop.data.rundir import RunDir
from detloop.data.schema import IMAGE_STATES, SPLITS


def _make_digits(args: argparse.Namespace) -> int:
    files = make_digits(
        args.out,
        args.size,
        seed=args.seed,
        imbalance=args.imbalance,
        canvas=args.canvas,
        balanced_test=args.balanced_test,
    )
    for split, path in files.items():
        sys.stdout.write(f"{split}: {path}  (images in {path.parent / 'images' / split})\n")
    return 0


def _import(args: argparse.Namespace) -> int:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    report = import_source(
        RunDir(args.run),
        args.format,
        args.source,
        args.split,
        images=args.images,
        classes=classes,
        lenient=args.lenient,
        decode=not args.no_decode,
    )
    sys.stdout.write(report.summary() + "\n")
    for problem in report.problems[:MAX_LISTED]:
        sys.stdout.write(f"  quarantined or skipped: {problem.describe()}\n")
    if len(report.problems) > MAX_LISTED:
        sys.stdout.write(f"  ... and {len(report.problems) - MAX_LISTED} more\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    counts = export_coco(
        RunDir(args.run_dir), args.out, state=args.state, split=args.split, boxes=args.boxes
    )
    sys.stdout.write(
        f"wrote {counts['images']} images, {counts['annotations']} annotations and "
        f"{counts['categories']} categories to {args.out}\n"
    )
    return 0


def _register_make_dataset(sub: Any) -> None:
    """``make-dataset digits`` and its options."""
    mk = sub.add_parser("make-dataset", help="generate a built-in dataset")
    kinds = mk.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    dg = kinds.add_parser("digits", help="digits-det: handwritten digits on noisy canvases")
    dg.add_argument(
        "--size",
        choices=list(SIZES),
        required=True,
        help="tiny 64/32/32, small 2000/300/300, bench 10000/1000/1000 images",
    )
    dg.add_argument("--out", required=True, help="output folder")
    dg.add_argument("--seed", type=int, default=0)
    dg.add_argument(
        "--imbalance",
        type=float,
        default=1.0,
        help="class imbalance r: p_k proportional to r^k (1 = uniform)",
    )
    dg.add_argument("--canvas", type=int, default=128, help="canvas side in pixels")
    dg.add_argument(
        "--balanced-test",
        action="store_true",
        help="the test split's classes uniform (pool and val keep --imbalance): rare-class AP",
    )
    dg.set_defaults(func=_make_digits)


def register(sub: Any) -> None:
    """Add the data verbs to the ``detloop`` sub-command parser."""
    _register_make_dataset(sub)

    imp = sub.add_parser("import", help="import a dataset split into a run")
    imp.add_argument("format", choices=["coco", "kitti", "folder"])
    imp.add_argument("source", help="COCO JSON file, KITTI label folder, or image folder")
    imp.add_argument("--run", required=True, help="run directory")
    imp.add_argument("--split", required=True, choices=list(SPLITS))
    imp.add_argument(
        "--images",
        help="images root (COCO: default the JSON's folder; KITTI: default the sibling image_2)",
    )
    imp.add_argument("--classes", help="comma-separated class names, in class-id order")
    imp.add_argument(
        "--lenient",
        action="store_true",
        help="quarantine bad images (state examine) instead of failing",
    )
    imp.add_argument(
        "--no-decode",
        action="store_true",
        help="skip decoding the images (faster; no corruption check, no phash)",
    )
    imp.set_defaults(func=_import)

    ex = sub.add_parser("export", help="export a run's images and boxes")
    ex.add_argument("format", choices=["coco"])
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--out", required=True, help="COCO JSON file to write")
    ex.add_argument("--state", choices=list(IMAGE_STATES))
    ex.add_argument("--split", choices=list(SPLITS))
    ex.add_argument(
        "--boxes",
        choices=["dataset", "gt", "labels"],
        default="dataset",
        help="dataset (default): the labeled dataset — pool images labeled by the oracle or "
        "people or auto-labeled, with their labels, other splits with their ground truth, each "
        "box with its provenance (detloop_source); gt: the imported ground truth; labels: the "
        "training labels (pseudo-labels included)",
    )
    ex.set_defaults(func=_export)
