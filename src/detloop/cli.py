"""``detloop <command> ...``: the command line.

Each area registers its verbs from its own small module (``register(subparsers)``); handlers
import heavy libraries (torch, ray, mlflow) only when they run, so ``detloop --help`` and the
data verbs start fast. Every handler returns an exit code; user errors exit 2 with a message,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from detloop.config import ConfigError
from detloop.data.errors import DataError
from detloop.runtime_env import apply_local_env

# Modules that contribute verbs; each defines ``register(subparsers) -> None``.
COMMAND_MODULES = (
    "detloop.data.cli",
    "detloop.learners.cli",
    "detloop.selectors.cli",
    "detloop.orchestrator.cli",
    "detloop.orchestrator.autolabel_cli",
)


class UsageError(Exception):
    """A user error detected by a command handler (bad argument combination, missing file)."""


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detloop",
        description="Active learning, SSL and uncertainty-based auto-labeling for detectors.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # area not built yet
                continue
            raise
        module.register(sub)
    return parser


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


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    if os.environ.get("DETLOOP_LOG"):
        level = getattr(logging, os.environ["DETLOOP_LOG"].upper(), level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 failure, 2 user error)."""
    apply_local_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
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
