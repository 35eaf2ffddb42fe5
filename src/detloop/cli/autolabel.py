"""``detloop autolabel``: auto-label new frames with a validated, calibrated, thresholded model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from detloop.cli.common import UsageError, add_model_arguments, open_run
from detloop.orchestrator.evaluation.autolabel import autolabel_frames, frame_images


def cmd_autolabel(args: argparse.Namespace) -> int:
    from detloop.orchestrator.evaluation.common import resolve_model
    from detloop.seeding import derive_seed

    cfg, run = open_run(args)
    if not Path(args.images).is_dir():
        raise UsageError(f"--images {args.images} is not a directory")
    first = args.first if args.first is not None else cfg.autolabel.infer_first_frame
    last = args.last if args.last is not None else cfg.autolabel.infer_last_frame
    if first is not None and last is not None and last <= first:
        raise UsageError(f"--last ({last}) must be greater than --first ({first})")
    ref = resolve_model(run, args.iteration, args.checkpoint)
    frames = frame_images(run, Path(args.images), first, last, cfg.data.lenient)
    if frames.num_rows == 0:
        raise UsageError(f"no images under {args.images} in frames [{first}, {last})")
    report = autolabel_frames(run, cfg, ref, frames, derive_seed(cfg.seed, ref.iteration,
                                                                 "autolabel"))  # fmt: skip
    report.pop("rankings", None)
    sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def register(sub: Any) -> None:
    """``autolabel``."""
    text = "auto-label new frames; export uncertain ones for human review"
    p = sub.add_parser("autolabel", help=text, description=text)
    add_model_arguments(p)
    p.add_argument("--images", required=True, type=Path, metavar="DIR", help="folder of frames")
    p.add_argument("--first", type=int, metavar="N", help="first frame (sorted ids), inclusive")
    p.add_argument("--last", type=int, metavar="M", help="last frame, exclusive")
    p.set_defaults(func=cmd_autolabel)
