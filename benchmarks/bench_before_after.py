"""This checkout against an earlier one, alternating, on the same machine in one run.

    python -m tessera.benchmarks.bench_before_after --before /path/to/old/checkout [--rounds 3]

The old checkout needs its own environment (``make setup`` there: ``.venv``).
Each round runs, in both checkouts one after the other (the order flips every
round, so drift in the machine's load hits both sides alike):

- ``bench_moe --skip-hf`` (medium Qwen3-MoE, tp=2 and ep=2): decode tok/s;
- ``bench_diffusion`` (Flux, sp=2 Ulysses and exact over shared memory): s/image.

Reports per figure the median and [min, max] over rounds of each side and the
after/before ratio of the medians (>= 1: the current checkout is at least as
fast), with the load average at every run. Writes
``benchmarks/results/before_after.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tessera.benchmarks._common import RESULTS_DIR, machine

RESULTS = RESULTS_DIR / "before_after.json"
HERE = Path(__file__).resolve().parent.parent


def _python(checkout: Path) -> str:
    py = checkout / ".venv" / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"{checkout} has no .venv; run `make setup` there first")
    return str(py)


def _run(checkout: Path, module: str, args: list[str], out: Path) -> dict[str, Any]:
    cmd = [_python(checkout), "-m", f"tessera.benchmarks.{module}", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {checkout}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _moe_figures(result: dict[str, Any]) -> dict[str, float]:
    return {f"moe {p['plan']} decode tok/s": p["tessera"]["decode_tok_s"] for p in result["plans"]}


def _flux_figures(result: dict[str, Any]) -> dict[str, float]:
    flux = result["flux_vs_diffusers_context_parallel"]
    return {"flux sp=2 ulysses s/image": flux["tessera_sp2_ulysses_s"],
            "flux sp=2 exact s/image": flux["tessera_sp2_exact_s"]}


def one_round(side: str, checkout: Path, work: Path, diffusion_repeats: int) -> dict[str, Any]:
    load = os.getloadavg()
    moe = _run(checkout, "bench_moe", ["--skip-hf"], work / f"{side}-moe.json")
    flux = _run(checkout, "bench_diffusion", ["--repeats", str(diffusion_repeats)], work / f"{side}-diffusion.json")
    return {"figures": {**_moe_figures(moe), **_flux_figures(flux)}, "loadavg": [round(x, 2) for x in load]}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    names = rounds[0]["before"]["figures"].keys()
    out: dict[str, Any] = {}
    for name in names:
        row: dict[str, Any] = {}
        for side in ("before", "after"):
            xs = [r[side]["figures"][name] for r in rounds]
            row[side] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}
        higher_is_better = "tok/s" in name
        b, a = row["before"]["median"], row["after"]["median"]
        row["ratio_after_over_before"] = (a / b) if higher_is_better else (b / a)  # >= 1: no regression
        spread = [(s["max"] - s["min"]) / s["median"] for s in (row["before"], row["after"])]
        row["spread_max_over_median"] = max(spread)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="the earlier checkout (with its own .venv)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--diffusion-repeats", type=int, default=3, help="bench_diffusion's own --repeats per round")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    before = args.before.resolve()
    sides = {"before": before, "after": HERE}
    commits = {k: subprocess.run(["git", "-C", str(v), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() for k, v in sides.items()}
    started = time.time()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="tessera-ab-") as tmp:
        for i in range(args.rounds):
            order = ("before", "after") if i % 2 == 0 else ("after", "before")
            r = {}
            for side in order:
                print(f"round {i + 1}/{args.rounds}: {side} ({commits[side]})", flush=True)
                r[side] = one_round(side, sides[side], Path(tmp), args.diffusion_repeats)
            rounds.append(r)
    result = {"benchmark": "before_after", "machine": machine(), "commits": commits, "rounds": rounds,
              "summary": summarize(rounds), "seconds": round(time.time() - started, 1),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, row in result["summary"].items():
        b, a = row["before"], row["after"]
        print(f"{name:32s} before {b['median']:.3f} [{b['min']:.3f}, {b['max']:.3f}]  after {a['median']:.3f} "
              f"[{a['min']:.3f}, {a['max']:.3f}]  after/before {row['ratio_after_over_before']:.3f} "
              f"(spread {row['spread_max_over_median']:.0%})")
    return result


if __name__ == "__main__":
    main()
