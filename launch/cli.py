"""The ``tessera`` command line.

Each subcommand lives in its own module under ``tessera.launch.commands``
and exposes ``register(subparsers)``, which adds its parser and sets
``func`` (returning an exit code). Exit codes scripts can trust: 0 on
success; non-zero with a one-line reason on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys

from tessera.launch.commands import bench, demo, place, plan, run, serve, slurm, submit
from tessera.runtime.logs import configure_logging, default_log_level

# The CLI's commands (a fixed registry): each module's ``register`` adds its sub-parser.
COMMANDS = (run, serve, plan, submit, slurm, bench, place, demo)


class CliError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Run large MoE language models and diffusion transformers across many workers on Ray.",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log level of the driver and every worker (default: $TESSERA_LOG_LEVEL or INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.log_level or default_log_level())
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's contract: one line, non-zero
        if (args.log_level or default_log_level()) == "DEBUG":
            raise
        print(f"tessera {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2 if isinstance(err, (CliError, ValueError)) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
