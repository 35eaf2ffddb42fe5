"""``detloop glc CONFIG --run RUN [--iteration N] [--stress SEED] [--tag TAG] [--set k=v]...
[--min-score S] [--rules md,mistakes,noisy] [--md-max-inter X] [--iou-consist X] ...``.

GLC — ground-truth label correction (ALGORITHMS §11.5) as a standalone tool: the run's teacher
(the checkpoint of iteration N, default 0) predicts the run's labeled images in consistency
mode (§11.6) and the GLC rules correct their labels. The corrected set is written as new tables
under ``RUN/glc/<tag>/`` (``detloop.orchestrator.evaluation.glc``); the run's own tables are
never changed and a used tag is refused. ``--stress SEED`` corrupts the labels first (seeded)
and reports how much of the damage GLC undid. The rules and their thresholds default to §11.5's
(the reference's); ``--min-score`` is the floor of the teacher detections the rules see.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detloop.cli.common import UsageError, add_set_option, open_run

if TYPE_CHECKING:
    from detloop.selectors.ssl_glc import GlcParams

#: threshold options of the GLC rules: (flag, GlcParams field)
THRESHOLDS = (
    ("--md-max-inter", "md_max_inter", "md: a detection's max IoU with every GT at most X"),
    ("--iou-consist", "iou_consist", "md: the detection's cons_iou at least X"),
    ("--noisy-consist", "noisy_consist", "noisy: the matched detection's cons_iou above X"),
    ("--correct-max-inter", "correct_max_inter", "noisy: IoU(GT, detection) at most X"),
    ("--correct-score", "correct_score", "noisy: the detection's score at least X"),
)


def glc_settings(args: argparse.Namespace) -> tuple[GlcParams, float]:
    """(GlcParams, teacher score floor) of the command line: §11.5's unless given.

    Raises:
        UsageError: no rule or an unknown one, a value outside [0, 1].
    """
    from dataclasses import replace

    from detloop.orchestrator.evaluation.glc import DEFAULT_PARAMS, GLC_MIN_SCORE

    try:
        params = DEFAULT_PARAMS if args.rules is None else DEFAULT_PARAMS.only(args.rules)
    except ValueError as exc:
        raise UsageError(f"--rules: {exc}") from None
    values = {"--min-score": args.min_score, **{f: getattr(args, a) for f, a, _ in THRESHOLDS}}
    for flag, value in values.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise UsageError(f"{flag} must be in [0, 1], got {value}")
    params = replace(
        params, **{a: getattr(args, a) for _, a, _ in THRESHOLDS if getattr(args, a) is not None}
    )
    return params, GLC_MIN_SCORE if args.min_score is None else args.min_score


def cmd_glc(args: argparse.Namespace) -> int:
    from detloop.orchestrator.evaluation.glc import run_glc

    params, min_score = glc_settings(args)
    cfg, run = open_run(args)
    if not run.images_file.exists():
        raise UsageError(f"{run.path}: no imported data; run `detloop import ... --run` first")
    report = run_glc(
        run,
        cfg,
        iteration=args.iteration or 0,
        tag=args.tag,
        stress_seed=args.stress,
        params=params,
        min_score=min_score,
    )
    sys.stdout.write(report.summary() + "\n")
    sys.stdout.write(f"corrected labels and report in {report.folder}\n")
    return 0


def register(sub: Any) -> None:
    """Add ``glc`` to the ``detloop`` sub-command parser."""
    p = sub.add_parser(
        "glc",
        help="correct the labeled set with the run's teacher (new tables, never overwriting)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG", help="experiment YAML")
    p.add_argument("--run", required=True, type=Path, metavar="RUN_DIR", help="run directory")
    p.add_argument("--iteration", type=int, metavar="N",
                   help="the teacher: the run's checkpoint of iteration N (default 0)")  # fmt: skip
    p.add_argument("--stress", type=int, metavar="SEED",
                   help="corrupt the labels first (seeded) and measure the recovery")  # fmt: skip
    p.add_argument("--tag", help="output folder under RUN/glc/ (default i<N>[-stress<SEED>])")
    p.add_argument("--min-score", type=float, metavar="S",
                   help="floor of the teacher detections the rules see (default 0.1)")  # fmt: skip
    p.add_argument("--rules", metavar="R[,R]",
                   help="rules applied: md, mistakes, noisy (default all three)")  # fmt: skip
    for flag, attr, text in THRESHOLDS:
        p.add_argument(flag, dest=attr, type=float, metavar="X", help=f"{text} (§11.5 default)")
    add_set_option(p)
    p.set_defaults(func=cmd_glc)
