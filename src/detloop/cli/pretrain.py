"""``detloop pretrain digits``: a preset's backbone pretrained offline on scikit-learn's UCI
digits, written where ``model.weights`` (with ``model.weights_kind: backbone``) reads it.

torch loads only when the verb runs. A folder that already holds weights made with the same
settings is reused, not retrained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detloop.cli.common import UsageError
from detloop.learners.presets import PRESETS


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _pretrain_digits(args: argparse.Namespace) -> int:
    """Validate the arguments, then train (or reuse) and say where the weights are."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    from detloop.learners.pretrain import PretrainSettings, pretrain_backbone

    given = {"preset": args.preset, "seed": args.seed, "epochs": args.epochs}
    given["max_steps"] = args.max_steps
    try:
        settings = PretrainSettings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    result = pretrain_backbone(out, settings, threads=args.threads)
    meta = result.metadata
    summary = (
        f"preset {settings.preset}, seed {settings.seed}, {settings.epochs} epochs; held-out "
        f"accuracy {meta['accuracy']:.3f} on {meta['n_heldout']} UCI digits"
    )
    if result.reused:
        _out(f"reusing {result.weights} (made with the same settings: {summary})")
    else:
        _out(f"wrote {result.weights} in {meta['seconds']:.0f} s ({summary})")
    _out(f"start from it with: --set model.weights={result.weights}")
    _out("                     --set model.weights_kind=backbone")
    return 0


def register(sub: Any) -> None:
    """Add ``pretrain digits`` to the ``detloop`` sub-command parser."""
    p = sub.add_parser("pretrain", help="pretrain a model preset's backbone offline")
    kinds = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    d = kinds.add_parser(
        "digits",
        help="classify scikit-learn's UCI handwritten digits (none of them is in digits-det)",
        description="Train the preset's backbone as a 10-class digit classifier on the 1,797 "
        "UCI digits shipped with scikit-learn and write backbone.pt + pretrain.json to --out. "
        "Rerunning with the same settings reuses the folder's weights.",
    )
    d.add_argument("--out", required=True, type=Path, help="output folder")
    d.add_argument("--preset", default="tiny", choices=list(PRESETS), help="default tiny")
    d.add_argument("--seed", type=int, help="held-out split, views, init, order (default 0)")
    d.add_argument("--epochs", type=int, help="passes over the digits (default: the recipe's)")
    d.add_argument("--max-steps", type=int, help="stop after N steps (quick checks)")
    d.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    d.set_defaults(func=_pretrain_digits)
