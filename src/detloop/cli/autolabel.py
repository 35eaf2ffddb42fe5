"""``detloop autolabel``: auto-label frames with a trained model, as a journaled run of its own.

    detloop autolabel CONFIG (--run RUN_DIR [--iteration N] | --checkpoint PATH)
                      [--images DIR] [--first N --last M] [--fresh] [--set k=v]...

The model is ``RUN_DIR``'s checkpoint of iteration N (default: its latest) or ``PATH`` (a
checkpoint directory or a model bundle); the frames are the images under ``--images`` (else the
config's ``data.pool``, whose ground truth, when it has any, measures the auto-labels); the
validation split is the config's ``data.val`` (else ``RUN_DIR``'s). The run lives in
``<runs_root>/<name>/autolabel-s<seed>`` (``loop: autolabel``; ``detloop resume`` continues
it) and never writes into ``RUN_DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from detloop.cli.common import UsageError, add_set_option


def _model_source(args: argparse.Namespace) -> Path | None:
    """The checkpoint the arguments name (None: the config's ``autolabel.model``)."""
    from detloop.data.rundir import RunDir
    from detloop.orchestrator.evaluation.common import resolve_model

    if args.checkpoint is not None:
        return Path(args.checkpoint).resolve()
    if args.run is None:
        if args.iteration is not None:
            raise UsageError("--iteration needs --run (the run whose model it is)")
        return None
    if not RunDir(args.run).exists():
        raise UsageError(f"{args.run} is not a run directory (no run.json)")
    if args.iteration is not None and args.iteration < 0:
        raise UsageError(f"--iteration must be >= 0, got {args.iteration}")
    return resolve_model(RunDir(args.run), args.iteration, None).checkpoint.resolve()


def autolabel_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items that make the config an auto-labeling run of the arguments."""
    import json

    out = ["loop=autolabel"]
    model = _model_source(args)
    if model is not None:
        out.append(f"autolabel.model={json.dumps(str(model))}")
    if args.images is not None:
        if not Path(args.images).is_dir():
            raise UsageError(f"--images {args.images} is not a directory")
        frames = {"format": "folder", "source": str(Path(args.images).resolve())}
        out.append(f"data.pool={json.dumps(frames)}")
    for key, value in (("infer_first_frame", args.first), ("infer_last_frame", args.last)):
        if value is not None:
            out.append(f"autolabel.{key}={value}")
    return out


def _source_val(run_dir: Path | None) -> list[str]:
    """A ``--set`` of the model's run's validation split (for a config that names none)."""
    import json

    from detloop.data.rundir import RunDir
    from detloop.orchestrator.engine.runs import stored_config

    val = stored_config(RunDir(run_dir)).data.val if run_dir is not None else None
    return [] if val is None else [f"data.val={json.dumps(val.model_dump(mode='json'))}"]


def cmd_autolabel(args: argparse.Namespace) -> int:
    from detloop import console
    from detloop.cli.loops import run_summary_text
    from detloop.config import load_config
    from detloop.orchestrator.engine.runs import create_run, stored_config
    from detloop.orchestrator.loops.execute import execute

    if args.first is not None and args.last is not None and args.last <= args.first:
        raise UsageError(f"--last ({args.last}) must be greater than --first ({args.first})")
    overrides = [*autolabel_overrides(args), *args.overrides]
    cfg = load_config(args.config, overrides)
    if cfg.data.val is None and args.run is not None:
        cfg = load_config(args.config, [*_source_val(args.run), *overrides])
    if cfg.data.pool is None:
        raise UsageError("no frames: pass --images DIR or set data.pool in the config")
    run = create_run(cfg, fresh=args.fresh)
    console.say("run directory: %s", run.path)
    outcome = execute(run, stored_config(run))
    if outcome.exit_code:
        sys.stderr.write(f"detloop: {outcome.stop_message}\n")
    else:
        sys.stdout.write(run_summary_text(run) + "\n")
    return outcome.exit_code


def register(sub: Any) -> None:
    """``autolabel``."""
    text = "auto-label frames with a trained model; export uncertain ones for human review"
    p = sub.add_parser("autolabel", help=text, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", type=Path, metavar="CONFIG", help="experiment YAML")
    p.add_argument("--run", type=Path, metavar="RUN_DIR", help="the run whose model labels")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iteration", type=int, metavar="N", help="RUN_DIR's model of iteration N "
                   "(default: its latest checkpoint)")  # fmt: skip
    g.add_argument("--checkpoint", type=Path, metavar="PATH", help="a checkpoint or model bundle")
    p.add_argument("--images", type=Path, metavar="DIR", help="folder of frames (default: the "
                   "config's data.pool)")  # fmt: skip
    p.add_argument("--first", type=int, metavar="N", help="first frame (sorted ids), inclusive")
    p.add_argument("--last", type=int, metavar="M", help="last frame, exclusive")
    p.add_argument("--fresh", action="store_true", help="start a new run directory")
    add_set_option(p)
    p.set_defaults(func=cmd_autolabel)
