"""Controller costs: time from launch to a ready mesh, and the per-step fan-out tax.

1. Launch -> ready mesh for 1, 2, 4 CPU workers, each on a fresh embedded Ray
   (Ray start, placement group, worker start, process group + DeviceMesh).
2. Fan-out overhead of one ``collective_rpc`` (a no-op on every rank) for 1 and
   4 workers, against the same no-op called directly on a Worker object in
   this process: the controller tax that every engine step pays.

Run: ``python -m tessera.benchmarks.bench_controller [--calls 300]``.
"""

from __future__ import annotations

import argparse
import time

from tessera.benchmarks._common import print_table, summarize, write_result
from tessera.memory.placement import Placement
from tessera.config import ParallelPlan
from tessera.runtime.controller import Controller
from tessera.runtime.worker import Worker


def _noop(worker):
    return worker.rank


def launch_to_ready(world: int) -> dict[str, float]:
    started = time.perf_counter()
    ctl = Controller(Placement(ParallelPlan({"dp": world}))).start()
    ready = time.perf_counter() - started
    timings = dict(ctl.startup_timings)
    ctl.shutdown()
    return {"launch_to_ready_s": ready, **timings}


def fanout(world: int, calls: int) -> dict[str, dict[str, float]]:
    with Controller(Placement(ParallelPlan({"dp": world}))) as ctl:
        for _ in range(20):  # warm up
            ctl.collective_rpc(_noop)
        method, function = [], []
        for _ in range(calls):
            t0 = time.perf_counter()
            ctl.collective_rpc("ping")
            method.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            ctl.collective_rpc(_noop)
            function.append((time.perf_counter() - t0) * 1e3)
    return {"method_ms": summarize(method), "function_ms": summarize(function)}


def direct(calls: int) -> dict[str, float]:
    worker = Worker(rank=0, world_size=1, device_kind="cpu", log_level="WARNING")
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        worker.execute(_noop)
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4])
    args = parser.parse_args(argv)

    startup = {w: launch_to_ready(w) for w in args.worlds}
    print_table(
        "launch -> ready mesh (fresh embedded Ray each)",
        ["workers", "total s", "ray s", "placement s", "workers s", "process group s"],
        [
            [w, r["launch_to_ready_s"], r["ray_connect_s"], r["placement_group_s"], r["worker_start_s"], r["process_group_s"]]
            for w, r in startup.items()
        ],
    )
    base = direct(args.calls * 10)
    calls = {w: fanout(w, args.calls) for w in (1, 4)}
    rows = [["direct call (1 process)", base["median"], base["p99"], 1.0]]
    for w, r in calls.items():
        for kind in ("method_ms", "function_ms"):
            rows.append([f"collective_rpc x{w} ({kind[:-3]})", r[kind]["median"], r[kind]["p99"], r[kind]["median"] / base["median"]])
    print_table("per-step fan-out overhead", ["call", "median ms", "p99 ms", "x direct"], rows)
    write_result(
        "controller",
        {
            "launch_to_ready": {str(w): r for w, r in startup.items()},
            "fanout": {str(w): r for w, r in calls.items()},
            "direct_call_ms": base,
            "note": "fan-out = one collective_rpc to every rank (Ray actor calls); direct = the same no-op "
            "on a Worker object in this process. The difference is the controller tax per engine step.",
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
