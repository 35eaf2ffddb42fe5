"""Verbs ``validate``, ``calibrate`` and ``threshold``:
``detloop <verb> CONFIG --run RUN_DIR [--iteration N | --checkpoint PATH] [--set k=v]...``.

Outputs go into the run directory (ARCHITECTURE §8): ``iter_N/val_predictions.parquet``,
``val_matches.parquet``, ``metrics.json``, ``calibration/``, ``thresholds.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from detloop.cli.common import add_model_arguments, open_run

VERBS = {
    "validate": "validation report: matches, runtime, mAP, uncertainty quality, decoding methods",
    "calibrate": "fit calibrators on validation (report on 80/20, store the fit on all pairs)",
    "threshold": "cost-sensitive thresholds and uncertainty weights (FD@CD / CD@FD)",
}


def _print(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def cmd_validate(args: argparse.Namespace) -> int:
    from detloop.orchestrator.evaluation.common import resolve_model
    from detloop.orchestrator.evaluation.validation import validate_model
    from detloop.seeding import derive_seed

    cfg, run = open_run(args)
    ref = resolve_model(run, args.iteration, args.checkpoint)
    report = validate_model(run, cfg, ref, derive_seed(cfg.seed, ref.iteration, "validate"),
                            compare=not args.no_compare)  # fmt: skip
    keys = ("split", "n_images", "decode_method", "mean_matched_score", "min_score", "runtime_ms")
    _print({k: report[k] for k in keys} | {"map": report["map"].get("map")})
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from detloop.orchestrator.evaluation.common import resolve_model
    from detloop.orchestrator.evaluation.validation import _headline, calibrate_model
    from detloop.seeding import derive_seed

    cfg, run = open_run(args)
    ref = resolve_model(run, args.iteration, args.checkpoint)
    seed = derive_seed(cfg.seed, ref.iteration, "calibrate")
    report = calibrate_model(
        run, cfg, ref.iteration, ref.iteration, seed, checkpoint=args.checkpoint
    )
    _print(_headline(report))
    return 0


def cmd_threshold(args: argparse.Namespace) -> int:
    from detloop.orchestrator.evaluation.common import resolve_model
    from detloop.orchestrator.evaluation.validation import threshold_model
    from detloop.seeding import derive_seed

    cfg, run = open_run(args)
    ref = resolve_model(run, args.iteration, args.checkpoint)
    seed = derive_seed(cfg.seed, ref.iteration, "threshold")
    _print(threshold_model(run, cfg, ref.iteration, ref.iteration, seed,
                           diagnostics=args.diagnostics, checkpoint=args.checkpoint))  # fmt: skip
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
