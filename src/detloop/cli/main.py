"""``detloop <command> ...``: the command line.

Each area registers its verbs from its own small module (``register(subparsers)``); handlers
import heavy libraries (torch, ray, mlflow) only when they run, so ``detloop --help`` and the
data verbs start fast. Every handler returns an exit code; user errors exit 2 with a message,
never a traceback.

What a person sees (``detloop.console``): results on stdout; on stderr the progress of long
verbs (phase lines, one live bar per worker, the numbers of each iteration), warnings and
errors. ``-q`` leaves only results, warnings and errors; ``-v`` adds detloop's debug logs and
the info lines of Ray and MLflow, ``-vv`` every library's debug logs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from detloop import console
from detloop.cli.common import UsageError
from detloop.config import ConfigError
from detloop.data.errors import DataError
from detloop.runtime_env import apply_local_env

# Modules that contribute verbs; each defines ``register(subparsers) -> None``.
COMMAND_MODULES = (
    "detloop.cli.data",
    "detloop.cli.learners",
    "detloop.cli.selectors",
    "detloop.cli.loops",
    "detloop.cli.validation",
    "detloop.cli.autolabel",
    "detloop.cli.pretrain",
    "detloop.cli.export",
    "detloop.cli.tracking_server",
    "detloop.cli.rcc",
    "detloop.cli.pls",
    "detloop.cli.glc",
)


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detloop",
        description="Active learning, SSL and uncertainty-based auto-labeling for detectors.",
    )
    _add_output_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for verb in sub.choices.values():  # `detloop -q run ...` and `detloop run -q ...` alike
        _add_output_options(verb)
    return parser


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q``; absent unless given (SUPPRESS), so a verb's own never hides the global."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="debug logs of detloop and info of Ray and MLflow (-vv: every library's debug)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress and no info: only results, warnings and errors",
    )


def _setup_logging(verbosity: int) -> None:
    """Logs (not progress, which ``console.session`` shows): warnings by default, detloop's
    debug and the libraries' info with -v, everything with -vv or ``DETLOOP_LOG=debug``."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    if os.environ.get("DETLOOP_LOG"):
        level = getattr(logging, os.environ["DETLOOP_LOG"].upper(), level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("detloop").setLevel(logging.DEBUG if verbosity > 0 else logging.NOTSET)
    if level > logging.INFO:  # MLflow's own handler shows its info lines unless told otherwise
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 failure, 2 user error)."""
    apply_local_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    quiet = bool(getattr(args, "quiet", False))
    _setup_logging(getattr(args, "verbose", 0))
    console.quiet_dependency_warnings()  # an entry point: covers every verb in this process
    with console.session(quiet=quiet):
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the verb's handler; errors become a message and an exit code."""
    func: Handler = args.func
    try:
        return func(args)
    except (ConfigError, DataError, UsageError) as exc:
        print(f"detloop {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    except KeyboardInterrupt:
        print("detloop: interrupted", file=sys.stderr)  # noqa: T201
        return 130
    except OSError as exc:  # permissions, full disk, missing directories
        print(f"detloop {args.command}: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except Exception as exc:
        logging.getLogger("detloop").debug("unexpected error", exc_info=True)
        print(  # noqa: T201
            f"detloop {args.command}: internal error: {type(exc).__name__}: {exc}\n"
            "(run with -vv or DETLOOP_LOG=debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
