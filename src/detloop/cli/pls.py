"""``detloop pls CONFIG --run RUN [--round R] [--tag TAG] [--set k=v]``.

The oracle analysis of one SSL round's pseudo-labels (ALGORITHMS §11.7): per pseudo-labeled
image drate_0..10, S, C, D, its GT and the GT its pseudo-labels miss; the ROC AUC of S, C, D
(and the drate drops, #detections, mean score) against "missing rate > {0, 0.25, 0.5, 0.75}".
Written to ``RUN/pls/<tag>/`` (``orchestrator.loops.pls_analysis``); an existing tag is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detloop.cli.common import UsageError, add_set_option
from detloop.config import load_config
from detloop.data.rundir import RunDir


def cmd_pls(args: argparse.Namespace) -> int:
    from detloop.orchestrator.loops.pls_analysis import pls_analysis

    cfg = load_config(args.config, args.overrides)
    run = RunDir(args.run)
    if not run.exists():
        raise UsageError(f"{run.path} is not a run directory (no run.json)")
    if args.round < 1:
        raise UsageError(f"--round must be >= 1 (round 0 is the teacher's), got {args.round}")
    result = pls_analysis(run, cfg, iteration=args.round, tag=args.tag)
    sys.stdout.write(result.summary() + "\n")
    return 0


def register(sub: Any) -> None:
    """Add ``pls`` to the ``detloop`` sub-command parser."""
    p = sub.add_parser(
        "pls",
        help="oracle analysis of an SSL round's pseudo-labels: PLS signals S, C, D vs missed GT",
    )
    p.add_argument("config", type=Path, metavar="CONFIG", help="experiment YAML (δ_S, β)")
    p.add_argument("--run", required=True, type=Path, metavar="RUN_DIR", help="an SSL run")
    p.add_argument(
        "--round",
        type=int,
        default=1,
        metavar="R",
        help="the round whose pseudo-labels are analysed (default 1: the teacher's)",
    )
    p.add_argument("--tag", help="output folder under RUN/pls/ (default round_<R>)")
    add_set_option(p)
    p.set_defaults(func=cmd_pls)
