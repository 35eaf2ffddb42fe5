"""What every verb module shares: the user-error type and the common arguments.

Verb modules import this, never ``detloop.cli.main`` (which imports them all).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detloop.config import ExperimentConfig, load_config
from detloop.data.rundir import RunDir


class UsageError(Exception):
    """A user error detected by a command handler (bad argument combination, missing file)."""


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """The shared ``--set key=value`` option."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=5 (repeatable)",
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG, --run, --iteration | --checkpoint and --set."""
    p.add_argument("config", type=Path, metavar="CONFIG", help="experiment YAML")
    p.add_argument("--run", required=True, type=Path, metavar="RUN_DIR", help="run directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iteration", type=int, metavar="N", help="model of iteration N (default: "
                   "the latest checkpoint)")  # fmt: skip
    g.add_argument("--checkpoint", type=Path, metavar="PATH", help="a checkpoint directory")
    add_set_option(p)


def open_run(args: argparse.Namespace) -> tuple[ExperimentConfig, RunDir]:
    """Load the config and check the run directory exists."""
    cfg = load_config(args.config, args.overrides)
    if not Path(args.run).is_dir():
        raise UsageError(f"run directory {args.run} does not exist (import data first)")
    if args.iteration is not None and args.iteration < 0:
        raise UsageError(f"--iteration must be >= 0, got {args.iteration}")
    return cfg, RunDir(args.run)
