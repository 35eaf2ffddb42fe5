"""Verbs ``validate``, ``calibrate`` and ``threshold``:
``detloop <verb> CONFIG --run RUN_DIR [--iteration N | --checkpoint PATH] [--set k=v]...``.

Outputs go into the run directory (ARCHITECTURE §8): ``iter_N/val_predictions.parquet``,
``val_matches.parquet``, ``metrics.json``, ``calibration/``, ``thresholds.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from detloop.config import ExperimentConfig, load_config
from detloop.data.rundir import RunDir

VERBS = {
    "validate": "validation report: matches, runtime, mAP, uncertainty quality, decoding methods",
    "calibrate": "fit calibrators on validation (report on 80/20, store the fit on all pairs)",
    "threshold": "cost-sensitive thresholds and uncertainty weights (FD@CD / CD@FD)",
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG, --run, --iteration | --checkpoint and --set."""
    from detloop.cli import add_set_option

    p.add_argument("config", type=Path, metavar="CONFIG", help="experiment YAML")
    p.add_argument("--run", required=True, type=Path, metavar="RUN_DIR", help="run directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iteration", type=int, metavar="N", help="model of iteration N (default: "
                   "the latest checkpoint)")  # fmt: skip
    g.add_argument("--checkpoint", type=Path, metavar="PATH", help="a checkpoint directory")
    add_set_option(p)


def open_run(args: argparse.Namespace) -> tuple[ExperimentConfig, RunDir]:
    """Load the config and check the run directory exists."""
    from detloop.cli import UsageError

    cfg = load_config(args.config, args.overrides)
    if not Path(args.run).is_dir():
        raise UsageError(f"run directory {args.run} does not exist (import data first)")
    if args.iteration is not None and args.iteration < 0:
        raise UsageError(f"--iteration must be >= 0, got {args.iteration}")
    return cfg, RunDir(args.run)


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def cmd_validate(args: argparse.Namespace) -> int:
    from detloop.orchestrator.validation import validate_model
    from detloop.orchestrator.validation_common import resolve_model
    from detloop.seeding import derive_seed

    cfg, run = open_run(args)
    ref = resolve_model(run, args.iteration, args.checkpoint)
    report = validate_model(run, cfg, ref, derive_seed(cfg.seed, ref.iteration, "validate"),
                            compare=not args.no_compare)  # fmt: skip
    keys = ("split", "n_images", "decode_method", "mean_matched_score", "min_score", "runtime_ms")
    _print({k: report[k] for k in keys} | {"map": report["map"].get("map")})
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from detloop.orchestrator.validation import _headline, calibrate_model
    from detloop.orchestrator.validation_common import resolve_model
    from detloop.seeding import derive_seed

    cfg, run = open_run(args)
    ref = resolve_model(run, args.iteration, args.checkpoint)
    seed = derive_seed(cfg.seed, ref.iteration, "calibrate")
    _print(_headline(calibrate_model(run, cfg, ref.iteration, ref.iteration, seed)))
    return 0


def cmd_threshold(args: argparse.Namespace) -> int:
    from detloop.orchestrator.validation import threshold_model
    from detloop.orchestrator.validation_common import resolve_model
    from detloop.seeding import derive_seed

    cfg, run = open_run(args)
    ref = resolve_model(run, args.iteration, args.checkpoint)
    seed = derive_seed(cfg.seed, ref.iteration, "threshold")
    _print(threshold_model(run, cfg, ref.iteration, ref.iteration, seed,
                           diagnostics=args.diagnostics))  # fmt: skip
    return 0


def register(sub: Any) -> None:
    """Add the three verbs (skipping any another module already registered)."""
    handlers = {"validate": cmd_validate, "calibrate": cmd_calibrate, "threshold": cmd_threshold}
    for name, text in VERBS.items():
        if name in sub.choices:
            continue
        p = sub.add_parser(name, help=text, description=text)
        add_model_arguments(p)
        if name == "validate":
            p.add_argument("--no-compare", action="store_true",
                           help="skip the comparison of the four decoding methods")  # fmt: skip
        if name == "threshold":
            p.add_argument(
                "--diagnostics",
                action="store_true",
                help="also heatmaps over the image plane and top-10 image grids",
            )
        p.set_defaults(func=handlers[name])
