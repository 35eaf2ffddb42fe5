"""``detloop rcc --run RUN [--classes A,B | -k N] [--scale] [--manual-augmentations] [--full-im]``.

Rare Class Collage (ALGORITHMS §11.3) as a standalone data tool: collages of the rare-class
crops of the run's labeled pool images, written under ``RUN/generated/rcc/<tag>/`` and appended
to the run's tables as labeled images with gt labels (``detloop.data.collage``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detloop.cli.common import UsageError
from detloop.data.collage import COMPAT_SEED, RccOptions, run_rcc
from detloop.data.rundir import RunDir


def _class_ids(run: RunDir, text: str | None) -> list[int] | None:
    """Class ids of the comma-separated class names (None: the default, the rarest)."""
    if text is None:
        return None
    names = run.class_names() or []
    wanted = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in names]
    if unknown or not wanted:
        raise UsageError(f"--classes: unknown {unknown or text!r}; the run's: {', '.join(names)}")
    return [names.index(c) for c in wanted]


def cmd_rcc(args: argparse.Namespace) -> int:
    run = RunDir(args.run)
    if not run.images_file.exists():
        raise UsageError(f"{run.path}: no imported data; run `detloop import ... --run` first")
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    options = RccOptions(
        scale=args.scale, manual_augmentations=args.manual_augmentations, full_im=args.full_im
    )
    report = run_rcc(
        run,
        classes=_class_ids(run, args.classes),
        k=args.k,
        seed=args.seed,
        options=options,
        tag=args.tag,
        iteration=args.iteration,
    )
    sys.stdout.write(report.summary() + "\n")
    if report.rows.provenance is not None:
        sys.stdout.write(f"images and provenance in {report.rows.provenance.parent}\n")
    return 0


def register(sub: Any) -> None:
    """Add ``rcc`` to the ``detloop`` sub-command parser."""
    p = sub.add_parser(
        "rcc", help="rare-class collages from the labeled images, added as labeled images"
    )
    p.add_argument("--run", required=True, type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--classes", metavar="A,B", help="target class names (default: the rarest)")
    p.add_argument("-k", type=int, default=2, help="how many rarest classes (default 2)")
    p.add_argument("--seed", type=int, default=COMPAT_SEED, help="seed (default 42)")
    p.add_argument("--scale", action="store_true", help="2x2 copies scaled 0.75 and 0.25")
    p.add_argument(
        "--manual-augmentations",
        action="store_true",
        help="one random flip, brightness, contrast, blur or noise per crop",
    )
    p.add_argument("--full-im", action="store_true", help="whole rare-class images instead")
    p.add_argument("--tag", help="output folder and image id part (default s<seed>[-options])")
    p.add_argument("--iteration", type=int, help="iteration written into the new rows")
    p.set_defaults(func=cmd_rcc)
