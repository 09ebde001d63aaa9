"""The embedded demo: a local Ray, 4 CPU workers, and what tessera does with them.

Sections run in order on their own controllers over one local Ray; each
prints what was placed where and what it cost: the 2x2 mesh and its
collectives, MoE generation (tiny Qwen3-MoE, tp=2 x ep=2) and diffusion
(tiny PixArt, patch parallel sp=2, written to a PNG). Tiny models are built on
first use and cached under ``$TESSERA_CACHE`` (default ``~/.cache/tessera``).
"""

from __future__ import annotations

import time
from typing import Callable

from tessera.memory.placement import Placement
from tessera.config import ParallelPlan, Timeouts
from tessera.runtime.controller import Controller
from tessera.runtime.diagnostics import check_mesh


def print_placement(ctl: Controller) -> None:
    print(f"  {'rank':>4}  {'node':<16} {'pid':>7}  {'device':<7} mesh coords")
    for info in ctl.describe():
        coords = ", ".join(f"{d}={c}" for d, c in info.coords.items())
        print(f"  {info.rank:>4}  {info.node_ip:<16} {info.pid:>7}  {info.device:<7} {coords}")


def demo_mesh(plan: ParallelPlan = ParallelPlan({"pp": 2, "tp": 2}), timeouts: Timeouts | None = None) -> dict:
    """Start workers as a 2x2 mesh, check collectives over each dim, print timings."""
    print(f"== mesh: {plan.world_size} CPU workers as {plan} (gloo)")
    with Controller(Placement(plan), timeouts=timeouts) as ctl:
        t = ctl.startup_timings
        print(
            f"  ready in {t['total_s']:.2f}s (ray {t['ray_connect_s']:.2f}s, placement group "
            f"{t['placement_group_s']:.2f}s, workers {t['worker_start_s']:.2f}s, process group "
            f"{t['process_group_s']:.2f}s)"
        )
        print_placement(ctl)
        results, failures = check_mesh(ctl, payload_bytes=1 << 20)
        print(f"  collectives over each dim: {'all correct' if not failures else 'WRONG: ' + ', '.join(failures)}")
        print(f"  {'dim':<5} {'all_reduce':>12} {'all_gather':>12} {'all_to_all':>12}   (1 MiB, median ms, rank 0)")
        for dim, got in results[0]["dims"].items():
            ms = got["timings_ms"]
            print(f"  {dim:<5} {ms['all_reduce']:>12.2f} {ms['all_gather']:>12.2f} {ms['all_to_all']:>12.2f}")
        started = time.perf_counter()
        for _ in range(20):
            ctl.collective_rpc("ping")
        fanout_ms = (time.perf_counter() - started) / 20 * 1e3
        print(f"  fan-out call to {plan.world_size} workers: {fanout_ms:.2f} ms")
        if failures:
            raise RuntimeError(f"collective checks failed: {failures}")
        return {"startup": t, "fanout_ms": fanout_ms}


def _section(module: str, name: str) -> Callable[[], object]:
    """Import a section only when it runs (the CLI stays fast, sections stay independent)."""

    def run() -> object:
        import importlib

        return getattr(importlib.import_module(module), name)()

    return run


# Sections of the demo, in order: the mesh, then each engine's.
SECTIONS: list[tuple[str, Callable[[], object]]] = [
    ("mesh", demo_mesh),
    ("moe", _section("tessera.launch.demo_moe", "demo_moe")),
    ("diffusion", _section("tessera.launch.demo_diffusion", "demo_diffusion")),
]


def run_demo(only: list[str] | None = None) -> int:
    started = time.perf_counter()
    names = [n for n, _ in SECTIONS]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise ValueError(f"unknown demo section(s) {unknown}; choose from {names}")
    from tessera.runtime.ray_env import RayConnection

    RayConnection.acquire(num_cpus=8)  # an embedded Ray with token auth, shared by every section
    try:
        for name, section in SECTIONS:
            if only and name not in only:
                continue
            section()
    finally:
        RayConnection.release()
    print(f"== demo finished in {time.perf_counter() - started:.1f}s")
    return 0
