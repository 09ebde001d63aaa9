"""``tessera demo``: the embedded demo (local Ray, 4 CPU workers, tiny models built on first use)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the embedded demo on a local Ray with 4 CPU workers",
        description="Start a local Ray, place 4 CPU workers as a mesh, and run each demo section "
        "(mesh collectives; MoE generation and diffusion once built). Tiny models are generated "
        "on first use and cached.",
    )
    parser.add_argument("--only", nargs="*", default=None, metavar="SECTION", help="run only these sections")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tessera.launch.demo import run_demo

    return run_demo(only=args.only)
