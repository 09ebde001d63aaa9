"""``tessera bench NAME``: run the benchmark program ``python -m tessera.benchmarks.bench_NAME``.

Benchmarks live in ``benchmarks/bench_<area>.py`` (each prints a table and
writes JSON to ``benchmarks/results/<area>.json``); this command finds their
files, lists them, and runs one or all as child processes with the remaining
arguments. It never imports them: benchmarks sit on top of tessera and nothing
in the package depends on them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in BENCHMARKS.glob("bench_*.py"))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark (tessera.benchmarks.bench_NAME), 'all', or 'list' them",
        description="Run tessera.benchmarks.bench_NAME as a program with the remaining arguments; "
        "'tessera bench list' lists the benchmarks, 'tessera bench all' runs each in turn. "
        "Results are written to benchmarks/results/NAME.json. Exit status is the benchmark's.",
    )
    parser.add_argument("name", help="benchmark name (e.g. launch), 'all' or 'list'")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    names = available()
    if args.name == "list":
        print("\n".join(names) if names else "(no benchmarks installed)")
        return 0
    if args.name == "all":
        failed = [n for n in names if _run_one(n, args.args) != 0]
        if failed:
            print(f"tessera bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    if args.name not in names:
        raise ValueError(f"no benchmark {args.name!r}; available: {', '.join(names) or 'none'} (tessera bench list)")
    return _run_one(args.name, args.args)


def _run_one(name: str, argv: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", f"tessera.benchmarks.bench_{name}", *argv])
