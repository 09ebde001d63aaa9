"""``tessera place``: read a routing trace, solve an expert placement, write a placement file.

The placement file is what ``LLMEngine.load(..., expert_map=...)`` applies
(see ``tessera.memory.affinity.placement_file``); ``--plot DIR`` also
writes the placement and the affinity matrix as PNGs.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "place",
        help="solve an expert->rank placement from a routing trace",
        description="Read a routing trace (.npz, recorded with LLMEngine.load(..., record_routing=True)), "
        "compute affinity statistics, solve a balanced expert->rank placement per MoE layer, optionally add "
        "replicas of hot experts, and write a placement file (JSON).",
    )
    parser.add_argument("trace", help="routing trace file (.npz)")
    parser.add_argument("--ranks", type=int, required=True, help="expert-parallel degree (ep)")
    parser.add_argument("--solver", default="ilp", choices=["linear", "round_robin", "greedy", "ilp"])
    parser.add_argument("--out", default="placement.json", help="placement file to write (default: %(default)s)")
    parser.add_argument("--ranks-per-node", type=int, default=None, help="ranks per node for the topology cost (default: all on one node)")
    parser.add_argument("--intra-node-cost", type=float, default=1.0, help="cost of a hop between ranks of one node")
    parser.add_argument("--inter-node-cost", type=float, default=4.0, help="cost of a hop between nodes")
    parser.add_argument("--time-limit", type=float, default=30.0, help="ilp: HiGHS time limit in seconds")
    parser.add_argument("--ilp-method", default="auto", choices=["auto", "direct", "bipartition", "lns"],
                        help="ilp: auto = direct program when small, then two-rank layer-window search (default)")
    parser.add_argument("--ilp-backend", default="auto", choices=["auto", "highspy", "scipy"],
                        help="ilp: highspy takes greedy as a MIP start; scipy's milp cannot (default: highspy if installed)")
    parser.add_argument("--keep-mass", type=float, default=1.0, help="ilp: keep the heaviest transition pairs holding this fraction of all transitions")
    parser.add_argument("--max-tokens", type=int, default=None, help="sample at most this many tokens of the trace")
    parser.add_argument("--replicas", type=int, default=0, metavar="SLOTS", help="redundant expert slots per rank per layer for hot experts")
    parser.add_argument("--plot", default=None, metavar="DIR", help="write placement.png and affinity.png into DIR")
    parser.add_argument("--seed", type=int, default=0, help="seed of token sampling")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tessera.memory.affinity.balance import add_replicas, balance_report
    from tessera.memory.affinity.metrics import cross_node_fraction, cross_rank_fraction
    from tessera.memory.affinity.placement_file import save_placement
    from tessera.memory.affinity.problem import PlacementProblem
    from tessera.memory.affinity.solvers import get_solver
    from tessera.memory.affinity.stats import AffinityStats
    from tessera.memory.affinity.topology import Topology
    from tessera.memory.affinity.trace import RoutingTrace

    trace = RoutingTrace.load(args.trace)
    stats = AffinityStats.from_trace(trace, max_tokens=args.max_tokens, seed=args.seed)
    topology = Topology(args.ranks, args.ranks_per_node, args.intra_node_cost, args.inter_node_cost)
    problem = PlacementProblem(stats, args.ranks, topology)
    options = {}
    if args.solver == "ilp":
        options = {"time_limit_s": args.time_limit, "method": args.ilp_method, "keep_mass": args.keep_mass,
                   "backend": args.ilp_backend}
    placement = get_solver(args.solver, **options).solve(problem)
    baseline = get_solver("linear").solve(problem)
    if args.replicas:
        placement = add_replicas(placement, stats.load, args.replicas)
    summary = {
        "trace_tokens": trace.num_tokens,
        "affinity_strength": round(stats.affinity_strength(), 4),
        "cross_rank_fraction": round(cross_rank_fraction(stats, placement), 4),
        "cross_rank_fraction_linear": round(cross_rank_fraction(stats, baseline), 4),
        "cross_node_fraction": round(cross_node_fraction(stats, placement, topology), 4),
        **{k: round(v, 4) for k, v in balance_report(stats.load, placement).items()},
    }
    out = save_placement(args.out, placement, model=trace.header.model, layer_ids=trace.header.layer_ids, extra=summary)
    used = placement.info.get("used", args.solver)
    print(f"tessera place: {args.solver} ({used}) in {placement.info['solve_s']:.2f}s -> {out}")
    for key, value in summary.items():
        print(f"  {key:28s} {value}")
    if args.plot:
        from pathlib import Path

        from tessera.memory.affinity.plot import plot_affinity, plot_placement

        plot_dir = Path(args.plot)
        p1 = plot_placement(placement, plot_dir / "placement.png")
        written = [p1]
        if stats.num_layers > 1:
            written.append(plot_affinity(stats, plot_dir / "affinity.png", placement))
        else:
            print("  (one MoE layer: no affinity matrix to plot)", file=sys.stderr)
        print("  plots: " + ", ".join(str(p) for p in written))
    return 0
