"""``tessera bench NAME``: run the benchmark module ``tessera.benchmarks.bench_NAME``.

Benchmarks live in ``benchmarks/bench_<area>.py`` (each prints a table and
writes JSON to ``benchmarks/results/<area>.json``); this command finds them,
lists them, and runs one or all with the remaining arguments as its argv.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import runpy
import sys


def available() -> list[str]:
    import tessera.benchmarks as benchmarks

    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


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
    module = f"tessera.benchmarks.bench_{name}"
    importlib.import_module("tessera.benchmarks")
    saved = sys.argv
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0
