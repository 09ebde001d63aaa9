"""Expert-affinity placement: how much cross-rank routing each solver removes, what it costs, what it buys.

Run: ``python -m tessera.benchmarks.bench_affinity [--quick] [--skip-engine]``.
Writes ``benchmarks/results/affinity.json`` and prints tables:

1. *engine*: a tiny random Mixtral run by the MoE engine with ep=4 records
   its routing on a fixed workload; linear / round_robin / greedy / ilp are
   solved on that trace and scored on it (cross-rank transition fraction,
   all-to-all bytes per token under standard and context-coherent EP).
2. *synthetic*: planted-affinity traces from affinity 0 (none) to 0.9; the
   same scores plus the planted floor, and the reduction against linear
   (ExFlow reports up to 67% less cross-GPU routing on real models).
3. *solver time and quality* against problem size (experts x layers x ranks
   x tokens), greedy vs ilp, up to 64 experts x 24 layers x 8 ranks, on
   planted-group traces (floor reachable) and branching-chain traces.
4. *end to end*: with ep=4 on the same workload, under linear and ilp
   placement: the standard path (default dispatch, and all_to_all) vs the
   token-sharded ExFlow path (``expert_parallel_mode="exflow"``): decode
   tokens/s, rows and bytes handed to collectives per token.

``--parts solver_time`` (or any comma list) reruns only those parts and keeps
the others' figures in the JSON.

All ratios are measured in one run on one machine; figures on a busy 2-core
VM are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from tessera.memory.affinity.metrics import alltoall_bytes_per_token, cross_rank_fraction
from tessera.memory.affinity.problem import PlacementProblem
from tessera.memory.affinity.solvers import get_solver, solver_names
from tessera.memory.affinity.stats import AffinityStats
from tessera.memory.affinity.synthetic import planted_affinity_trace
from tessera.memory.affinity.trace import RoutingTrace, trace_from_engine

RESULTS = Path(__file__).resolve().parent / "results" / "affinity.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def score_solvers(trace: RoutingTrace, ranks: int, hidden: int, dtype_bytes: int, ilp_time_s: float, planted=None) -> dict:
    stats = AffinityStats.from_trace(trace)
    problem = PlacementProblem(stats, ranks)
    rows = {}
    for name in solver_names():
        opts = {"time_limit_s": ilp_time_s} if name == "ilp" else {}
        placement = get_solver(name, **opts).solve(problem)
        rows[name] = {
            "cross_rank_fraction": placement.info["cross_rank_fraction"],
            "a2a_bytes_per_token_standard": alltoall_bytes_per_token(trace, placement, hidden, dtype_bytes, "standard"),
            "a2a_bytes_per_token_coherent": alltoall_bytes_per_token(trace, placement, hidden, dtype_bytes, "coherent"),
            "solve_s": placement.info["solve_s"],
            **({"ilp_used": placement.info.get("used"), "ilp_status": placement.info.get("status")} if name == "ilp" else {}),
        }
    lin = rows["linear"]
    for row in rows.values():
        row["cross_rank_reduction_vs_linear"] = 1 - row["cross_rank_fraction"] / lin["cross_rank_fraction"] if lin["cross_rank_fraction"] else 0.0
        row["coherent_bytes_reduction_vs_linear"] = (
            1 - row["a2a_bytes_per_token_coherent"] / lin["a2a_bytes_per_token_coherent"] if lin["a2a_bytes_per_token_coherent"] else 0.0
        )
    out = {"affinity_strength": stats.affinity_strength(), "tokens": trace.num_tokens, "solvers": rows}
    if planted is not None:
        out["planted_floor_cross_rank_fraction"] = cross_rank_fraction(stats, planted, ranks)
    return out


def bench_synthetic(quick: bool, ilp_time_s: float) -> list[dict]:
    out = []
    E, L, R, k, T = (16, 4, 4, 2, 1500) if quick else (16, 8, 4, 2, 4000)
    for affinity in (0.0, 0.25, 0.5, 0.75, 0.9):
        _log(f"[synthetic] affinity={affinity} E={E} L={L} R={R} k={k} tokens={T}")
        syn = planted_affinity_trace(L, E, R, k, T, affinity=affinity, seed=7)
        row = score_solvers(syn.trace, R, hidden=4096, dtype_bytes=2, ilp_time_s=ilp_time_s, planted=syn.planted_rank_of)
        out.append({"affinity": affinity, "experts": E, "layers": L, "ranks": R, "top_k": k, **row})
    return out


def bench_solver_time(quick: bool, ilp_time_s: float) -> list[dict]:
    """Greedy vs ilp: time and quality, from toy sizes to realistic ones (64 experts x 16-24 layers x 4-8 ranks).

    ``planted``: hidden groups, as many as ranks (the floor is reachable: the
    lower bound proves greedy optimal and ilp stops there). ``chains``:
    branching expert chains (:func:`chain_affinity_trace`), where no
    placement reaches zero and greedy stops in a local optimum.
    """
    from tessera.memory.affinity.ilp import cross_lower_bound
    from tessera.memory.affinity.synthetic import chain_affinity_trace

    sizes = [("planted", 8, 4, 4, 1000), ("planted", 16, 8, 4, 2000), ("chains", 32, 8, 8, 4000)]
    if not quick:
        sizes += [("planted", 64, 16, 4, 20000), ("planted", 64, 16, 8, 20000),
                  ("chains", 64, 16, 4, 20000), ("chains", 64, 16, 8, 20000), ("chains", 64, 24, 8, 20000)]
    out = []
    for kind, E, L, R, T in sizes:
        if kind == "planted":
            trace = planted_affinity_trace(L, E, R, 2, T, affinity=0.9, seed=3).trace
        else:
            trace = chain_affinity_trace(L, E, 2, T, affinity=0.9, successors=2, seed=3)
        started = time.perf_counter()
        stats = AffinityStats.from_trace(trace)
        stats_s = time.perf_counter() - started
        problem = PlacementProblem(stats, R)
        linear_cost = problem.cost(get_solver("linear").solve(problem).rank_of)
        bound = cross_lower_bound(problem) / stats.total_transitions
        for name in ("greedy", "ilp"):
            _log(f"[solver time] {name} {kind} E={E} L={L} R={R} tokens={T}")
            opts = {"time_limit_s": ilp_time_s} if name == "ilp" else {}
            start = time.perf_counter()
            placement = get_solver(name, **opts).solve(problem)
            elapsed = time.perf_counter() - start
            out.append({
                "trace": kind, "solver": name, "experts": E, "layers": L, "ranks": R, "tokens": T,
                "seconds": elapsed, "stats_s": stats_s,
                "cross_rank_fraction": placement.info["cross_rank_fraction"],
                "lower_bound_fraction": bound,
                "cost_vs_linear": placement.info["cost"] / linear_cost if linear_cost else 1.0,
                **({k: placement.info.get(k) for k in ("method", "status", "used", "backend", "pairs_kept")}
                   if name == "ilp" else {}),
                **({"lns_improvements": (placement.info.get("lns") or {}).get("improved", 0)} if name == "ilp" else {}),
            })
        g, i = out[-2], out[-1]
        i["ilp_vs_greedy_cross"] = i["cross_rank_fraction"] - g["cross_rank_fraction"]
    return out


def _workload(num_prompts: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=int(rng.integers(8, 24))).tolist() for _ in range(num_prompts)]


def bench_engine(quick: bool, ilp_time_s: float, cache: Path) -> dict:
    from tessera.memory.placement import Placement
    from tessera.models.tiny_moe import build_tiny_moe
    from tessera.config import ParallelPlan
    from tessera.runtime.controller import Controller
    from tessera.runtime.llm.engine import LLMEngine, SamplingParams

    # GQA with K/V rows half a hidden row (as Mixtral: 8 kv heads x 128 x 2 = 2048 vs 4096): what ExFlow all-gathers
    size = dict(experts=16, layers=6, top_k=2, hidden=128, heads=8, kv_heads=2, vocab=128)
    path = build_tiny_moe("mixtral", cache / "bench_affinity_mixtral", **size)
    prompts = _workload(8 if quick else 24, size["vocab"])
    # Seeded sampling keeps sequences diverse (greedy decoding of a tiny random model
    # repeats a few tokens, so a handful of fixed routes would decide every figure).
    sampling = SamplingParams(max_new_tokens=16 if quick else 32, temperature=1.0, seed=1234)
    result: dict = {"model": "tiny random Mixtral", **size, "ep": 4, "prompts": len(prompts), "max_new_tokens": sampling.max_new_tokens}
    _log("[engine] starting 4 workers (ep=4)")
    with Controller(Placement(ParallelPlan({"ep": 4}), device="cpu")) as ctl:
        engine = LLMEngine.load(ctl, path, record_routing=True)
        try:
            reference = [r.token_ids for r in engine.generate(prompts, sampling)]
            trace = trace_from_engine(engine.routing_trace())
        finally:
            engine.close()
        trace.save(cache / "bench_affinity_engine_trace.npz")
        _log(f"[engine] recorded {trace.num_tokens} routed tokens; solving placements")
        result["trace"] = score_solvers(trace, 4, hidden=size["hidden"], dtype_bytes=4, ilp_time_s=ilp_time_s)
        stats = AffinityStats.from_trace(trace)
        ilp = get_solver("ilp", time_limit_s=ilp_time_s).solve(PlacementProblem(stats, 4))
        maps = {"linear": {}, "ilp": {"expert_map": ilp.expert_map()}}
        modes = {"standard": {}, "standard a2a": {"moe_dispatch": "all_to_all"}, "exflow": {"expert_parallel_mode": "exflow"}}
        configs = {f"{m} / {pl}": {**mopts, **popts} for m, mopts in modes.items() for pl, popts in maps.items()}
        runs: dict[str, list[float]] = {name: [] for name in configs}
        moved: dict[str, dict] = {}
        identical = True
        H, P, b = size["hidden"], 4, 4  # fp32 checkpoint
        moe_layers = size["layers"]
        kv_row = 2 * size.get("kv_heads", 2) * (H // size.get("heads", 4))
        for rep in range(2 if quick else 3):  # alternate to spread machine noise over all
            for name, options in configs.items():
                _log(f"[engine] decode run {rep + 1}: {name}")
                engine = LLMEngine.load(ctl, path, **options)
                try:
                    tokens = [r.token_ids for r in engine.generate(prompts, sampling)]
                    st = engine.stats()
                    runs[name].append(st["decode_tok_s"])
                    routed = st["prefill_tokens"] + st["decode_tokens"]
                    per_rank = ctl.collective_rpc(_moved, args=(engine.key,))
                finally:
                    engine.close()
                identical &= tokens == reference
                rows = sum(r["rows_sent"] for r in per_rank)
                if name.startswith("exflow"):
                    ex = [r["exflow"] for r in per_rank]
                    moe_b, kv_b, gather_b = (sum(e[k] for e in ex) for k in ("moe_bytes", "kv_bytes", "gather_bytes"))
                    moved[name] = {"rows_per_token": rows / routed, "moe_bytes_per_token": moe_b / routed,
                                   "kv_bytes_per_token": kv_b / routed, "gather_bytes_per_token": gather_b / routed,
                                   "bytes_per_token": (moe_b + kv_b + gather_b) / routed,
                                   "second_exchange_layers": sum(e["second_exchanges"] for e in ex) / P,
                                   "moe_layer_calls": sum(e["moe_layer_calls"] for e in ex) / P}
                elif "a2a" in name:
                    # measured dispatch+return rows, plus the all-gather of the shares ((P-1) copies of every row per layer)
                    moved[name] = {"rows_per_token": rows / routed,
                                   "bytes_per_token": rows * H * b / routed + (P - 1) * H * b * moe_layers}
                else:
                    # auto at ep=4, top-2: one all_reduce of [tokens, H] per MoE layer (ring: 2(P-1)/P of it per rank)
                    moved[name] = {"rows_per_token": 2 * (P - 1) * moe_layers,
                                   "bytes_per_token": 2 * (P - 1) * H * b * moe_layers}
        result["decode_tok_s"] = {name: {"median": float(np.median(v)), "runs": v} for name, v in runs.items()}
        result["exflow_vs_standard_decode"] = {
            pl: result["decode_tok_s"][f"exflow / {pl}"]["median"] / result["decode_tok_s"][f"standard / {pl}"]["median"]
            for pl in maps
        }
        result["moved"] = moved
        result["kv_row_values"] = kv_row
        result["tokens_identical"] = bool(identical)
    return result


def _moved(worker, key: str) -> dict:
    """What this rank's MoE exchanges sent (runs on a worker): dispatcher rows, and ExFlow's byte counters."""
    ops = worker.engines[key].stage.ops
    ex = getattr(ops.tokens, "stats", None)  # ExFlow's layout counts its own bytes
    return {"rows_sent": int(getattr(ops.dispatch, "rows_sent", 0)), "exflow": ex.snapshot() if ex is not None else None}


def _table(title: str, header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(h)), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    body = "\n".join("  ".join(_fmt(v).ljust(w) for v, w in zip(r, widths)) for r in rows)
    return f"\n{title}\n{line}\n{'-' * len(line)}\n{body}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on 2 cores)")
    parser.add_argument("--skip-engine", action="store_true", help="no Ray workers: synthetic and solver-time parts only")
    parser.add_argument("--parts", default="synthetic,solver_time,engine",
                        help="comma list of parts to run (synthetic, solver_time, engine); the others keep their "
                             "figures from the existing JSON")
    parser.add_argument("--ilp-time", type=float, default=20.0, help="ILP time limit per solve (s)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.skip_engine:
        parts.discard("engine")
    cache = Path(os.environ.get("TESSERA_CACHE", Path.home() / ".cache" / "tessera"))
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    out = Path(args.out)
    results: dict = json.loads(out.read_text()) if out.is_file() and parts != {"synthetic", "solver_time", "engine"} else {}
    results.update({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "quick": args.quick,
        "ilp_time_limit_s": args.ilp_time,
        "notes": {
            "cross_rank_fraction": "fraction of (expert at l, expert at l+1) pairs of a token on different ranks",
            "a2a_bytes_per_token_standard": "hidden-state bytes a token crosses ranks with per forward pass, two all-to-alls per MoE layer, attention on the token's home rank",
            "a2a_bytes_per_token_coherent": "same under context-coherent EP (token stays on the rank of its top-1 expert between layers, one all-to-all per layer)",
            "solver_time": "planted = hidden groups, as many as ranks (greedy reaches the floor; the capacity lower bound proves it, so ilp stops at once); chains = branching expert chains (no placement reaches 0; ilp's two-rank x layer-window search improves on greedy); lower_bound_fraction: no placement can do better",
            "engine_configs": "standard = the engine's default dispatch (at ep=4, top-2: one all_reduce of [tokens, hidden] per MoE layer, activations replicated, placement-independent); standard a2a = tokens split by index, dispatch + return all-to-all, shares all-gathered; exflow = token-sharded context-coherent EP (parallel/coherent.py): tokens live on their top-1 expert's rank, one all_to_all per MoE layer plus a partial-output exchange only for choices away from the anchor, K/V rows all-gathered for the attention context",
            "moved": "per routed token, all ranks, all MoE layers: rows_per_token = (token, choice) rows sent across ranks (standard: all_reduce row-equivalents, 2(P-1) per layer); bytes_per_token = bytes handed to collectives (exflow: measured MoE exchange + K/V context all-gather + end-of-stage gather; standard a2a: measured rows + the share all-gather; standard: ring all_reduce volume)",
        },
    })
    if "synthetic" in parts:
        results["synthetic"] = bench_synthetic(args.quick, args.ilp_time)
    if "solver_time" in parts:
        results["solver_time"] = bench_solver_time(args.quick, args.ilp_time)
    if "engine" in parts:
        results["engine"] = bench_engine(args.quick, args.ilp_time, cache)
    results["wall_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))

    if results.get("synthetic"):
        syn_rows = []
        for r in results["synthetic"]:
            for name, s in r["solvers"].items():
                syn_rows.append([r["affinity"], name, s["cross_rank_fraction"], r["planted_floor_cross_rank_fraction"],
                                 s["cross_rank_reduction_vs_linear"], s["a2a_bytes_per_token_standard"],
                                 s["a2a_bytes_per_token_coherent"], s["coherent_bytes_reduction_vs_linear"], s["solve_s"]])
        print(_table("synthetic traces (hidden 4096, bf16)",
                     ["affinity", "solver", "cross", "floor", "cut_vs_lin", "B/tok std", "B/tok coh", "coh_cut", "solve_s"], syn_rows))
    if results.get("solver_time"):
        print(_table("solver time and quality (ilp vs greedy)",
                     ["trace", "solver", "E", "L", "R", "tokens", "seconds", "cross", "bound", "cost/linear", "ilp used"],
                     [[r.get("trace", "planted"), r["solver"], r["experts"], r["layers"], r["ranks"], r["tokens"], r["seconds"],
                       r.get("cross_rank_fraction", float("nan")), r.get("lower_bound_fraction", float("nan")),
                       r["cost_vs_linear"], str(r.get("used", ""))[:28]] for r in results["solver_time"]]))
    e = results.get("engine")
    if e and "moved" in e:
        print(_table(f"engine trace ({e['trace']['tokens']} tokens, affinity strength {e['trace']['affinity_strength']:.3f})",
                     ["solver", "cross", "cut_vs_lin", "B/tok std", "B/tok coh", "coh_cut"],
                     [[n, s["cross_rank_fraction"], s["cross_rank_reduction_vs_linear"], s["a2a_bytes_per_token_standard"],
                       s["a2a_bytes_per_token_coherent"], s["coherent_bytes_reduction_vs_linear"]] for n, s in e["trace"]["solvers"].items()]))
        print(_table("engine ep=4, same workload: standard vs exflow under linear and ilp placement",
                     ["config", "decode tok/s (median)", "runs", "rows/token", "bytes/token"],
                     [[n, v["median"], " ".join(f"{r:.1f}" for r in v["runs"]), e["moved"][n]["rows_per_token"],
                       e["moved"][n]["bytes_per_token"]] for n, v in e["decode_tok_s"].items()]))
        print(f"tokens identical across configs: {e['tokens_identical']}")
    print(f"\nwrote {out} in {results['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
