"""``detloop glc CONFIG --run RUN [--iteration N] [--stress SEED] [--tag TAG] [--set k=v]...``.

GLC — ground-truth label correction (ALGORITHMS §11.5) as a standalone tool: the run's teacher
(the checkpoint of iteration N, default 0) predicts the run's labeled images in consistency
mode (§11.6) and the GLC rules correct their labels. The corrected set is written as new tables
under ``RUN/glc/<tag>/`` (``detloop.orchestrator.evaluation.glc``); the run's own tables are
never changed and a used tag is refused. ``--stress SEED`` corrupts the labels first (seeded)
and reports how much of the damage GLC undid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detloop.cli.common import UsageError, add_set_option, open_run


def cmd_glc(args: argparse.Namespace) -> int:
    from detloop.orchestrator.evaluation.glc import run_glc

    cfg, run = open_run(args)
    if not run.images_file.exists():
        raise UsageError(f"{run.path}: no imported data; run `detloop import ... --run` first")
    report = run_glc(run, cfg, iteration=args.iteration or 0, tag=args.tag, stress_seed=args.stress)
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
    add_set_option(p)
    p.set_defaults(func=cmd_glc)
