"""``tessera plan``: where a job's ranks would go, or the best plan for a model on a cluster, without starting anything.

Two uses:

- ``tessera plan JOB.yaml`` (or ``--model/--plan`` flags): the job's placement as ``tessera run`` would
  make it (the planner's rules for ``plan: auto``, checks for an explicit plan). Exit 2 with the reason when
  the plan cannot work.
- ``tessera plan MODEL [--cluster clusters/hardware/X.yaml] [--workload batch=8,context=4096]
  [--objective latency|throughput]``: the cost model (``memory.cost_model``) costs every plan the rules
  allow on that cluster and prints the chosen one (per-device bytes per tier, step time, tokens/s or
  s/image), the three runners-up and why each lost. MODEL is a directory that may hold only
  ``config.json`` (or a diffusers ``transformer/config.json``): a model not downloaded yet. Without
  ``--cluster`` it plans for this machine, with the figures ``tessera plan --calibrate`` measured.
  ``--plan`` costs that one plan instead. Exit 2, one line, when nothing fits, naming what to change.
- ``tessera plan --calibrate``: measure this machine's constants and store them (see ``launch/calibrate.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tessera.launch.commands.run import add_job_flags, jobfile_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="show a job's placement, or choose a plan for a model on a cluster with the cost model",
        description="Validate a job and print its placement (mesh, ranks, resources), or, given a model "
        "directory (config.json alone is enough), cost every plan the rules allow on a cluster (--cluster "
        "clusters/hardware/X.yaml, default this machine) and print the best for the workload and objective "
        "with per-device memory per tier, predicted step time and throughput, and the top alternatives with "
        "why each lost. Starts nothing. Exit 0 when a plan is valid, 2 with the reason when none is.",
        epilog="examples:\n"
        "  tessera plan clusters/local.yaml\n"
        "  tessera plan tests/data/released/llm/DeepSeek-V3 --cluster clusters/hardware/h100-2x8-ib400.yaml\n"
        "  tessera plan MODEL --cluster clusters/hardware/h100-1x8.yaml --workload batch=256,context=2048 "
        "--objective throughput --json\n"
        "  tessera plan --calibrate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", nargs="?", help="YAML job file, or a model directory to plan with the cost model")
    add_job_flags(parser)
    cost = parser.add_argument_group("cost model (a model directory and a cluster)")
    cost.add_argument("--workload", help="batch, context, new_tokens (LMs) / image_size, steps, text_tokens "
                      "(diffusion) as key=value pairs, or a YAML file (default batch=1,context=1024,new_tokens=128)")
    cost.add_argument("--objective", choices=["latency", "throughput"], help="what to optimise (default latency)")
    cost.add_argument("--offload", action="store_true", help="allow weights beyond device memory in host memory / NVMe")
    cost.add_argument("--weights", choices=["auto", "stored", "dequantized"], default="auto",
                      help="block-FP8 checkpoints: as stored (FP8 resident), dequantized to the model dtype (what "
                      "tessera's loader holds today), or auto: stored where the device keeps FP8 (default)")
    cost.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="diffusion weight dtype (default bfloat16)")
    cost.add_argument("--ranks", type=int, help="this machine: rank slots to plan for (default: its cores)")
    cost.add_argument("--alternatives", type=int, default=3, help="runners-up to show (default 3)")
    cost.add_argument("--calibrate", action="store_true", help="measure this machine's constants and store them")
    cost.add_argument("--calibration-out", help="where --calibrate writes (default: $TESSERA_CALIBRATION or "
                      "$TESSERA_CACHE/calibration/<host>.yaml)")
    parser.add_argument("--json", action="store_true", help="print the placement (or the plan search) as JSON")
    parser.set_defaults(func=_run)


def _is_model_dir(value: str | None) -> bool:
    if not value:
        return False
    path = Path(value)
    return path.is_dir() and ((path / "config.json").is_file() or (path / "transformer" / "config.json").is_file())


def _cost_mode(args: argparse.Namespace) -> bool:
    if _is_model_dir(args.job) or (args.job or "").startswith(("tiny-moe:", "tiny-diffusion:")):
        return True
    cluster_file = bool(args.cluster) and Path(args.cluster).suffix in (".yaml", ".yml")
    return not args.job and bool(args.model) and (cluster_file or bool(args.workload or args.objective))


def _run(args: argparse.Namespace) -> int:
    if args.calibrate:
        from tessera.launch.calibrate import calibrate

        calibrate(args.calibration_out)
        return 0
    if _cost_mode(args):
        return _run_cost(args)
    return _run_job(args)


def cluster_for(args: argparse.Namespace):
    """The ClusterSpec named by ``--cluster``: a YAML file, this machine (``local``/none), or a Ray cluster."""
    from tessera.memory.hardware import cluster_from_inventory, load_cluster, local_cpu_cluster

    value = args.cluster
    if value and Path(value).suffix in (".yaml", ".yml"):
        return load_cluster(value)
    device = args.device or "cpu"
    if value in (None, "local"):
        if device == "cuda":
            from tessera.memory.inventory import detect_inventory

            return cluster_from_inventory(detect_inventory("cuda"))
        return local_cpu_cluster(args.ranks)
    import ray

    from tessera.memory.inventory import detect_inventory

    ray.init(address=value, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        return cluster_from_inventory(detect_inventory(device))
    finally:
        ray.shutdown()


def _run_cost(args: argparse.Namespace) -> int:
    from tessera.config import ParallelPlan
    from tessera.launch.api import materialise_model
    from tessera.memory.cost_model import Workload, estimate
    from tessera.memory.plan_search import PlanSearch, describe_estimate, describe_search, search_plans, search_to_dict
    from tessera.memory.profile import model_profile

    model = args.job or args.model
    if model.startswith(("tiny-moe:", "tiny-diffusion:")):
        model = materialise_model(model)
    cluster = cluster_for(args)
    stored = args.weights == "stored" or (args.weights == "auto" and cluster.device.fp8_weights)
    profile = model_profile(model, fp8_resident=stored, dtype=args.dtype)
    workload = Workload.parse(args.workload)
    objective = args.objective or "latency"
    if args.plan and args.plan != "auto":
        e = estimate(profile, cluster, ParallelPlan.parse(args.plan), workload, objective, args.offload)
        if args.json:
            fake = PlanSearch(profile, cluster, workload, objective, args.offload, e, (), 1, int(e.feasible), 0.0)
            print(json.dumps(search_to_dict(fake)))
        else:
            print(f"model {profile.architecture}: {profile.weights}; cluster {cluster.describe()}")
            print(f"workload {workload.describe(profile.kind)}")
            print(describe_estimate(profile, e))
        return 0 if e.feasible else 2
    result = search_plans(profile, cluster, workload, objective, args.offload, keep=args.alternatives)
    print(json.dumps(search_to_dict(result)) if args.json else describe_search(result))
    return 0


def _run_job(args: argparse.Namespace) -> int:
    from tessera.launch.api import materialise_model, model_kind, plan_placement

    jobfile = jobfile_from_args(args)
    job = jobfile.job
    if job.model and jobfile.task != "mesh":
        model_kind(job.model)  # refuses a missing checkpoint before planning
        from dataclasses import replace

        job = replace(job, model=materialise_model(job.model))
    placement = plan_placement(job)
    plan = placement.plan
    ranks = [{"rank": r, "coords": plan.coordinates(r), "bundle": placement.bundle()} for r in range(plan.world_size)]
    totals = {k: v * plan.world_size for k, v in placement.bundle().items()}
    if args.json:
        print(json.dumps({"plan": dict(plan.degrees), "world_size": plan.world_size, "device": placement.device,
                          "ranks": ranks, "resources": totals}))
        return 0
    print(f"job {jobfile.name!r}: task {jobfile.task}, model {job.model or '-'}")
    if jobfile.plan_auto or job.model:
        from tessera.memory.planner import describe_placement

        print(describe_placement(placement))
        return 0
    print(f"mesh {plan} = {plan.world_size} rank(s) on {placement.device}; dims outermost first")
    print(f"  {'rank':>4}  coords")
    for row in ranks:
        print(f"  {row['rank']:>4}  " + ", ".join(f"{d}={c}" for d, c in row["coords"].items()))
    print(f"each rank's Ray bundle: {placement.bundle()}; the cluster needs {totals} in all")
    if plan.degree("tp") > 1:
        print(f"tensor-parallel groups of {plan.degree('tp')} ranks are packed onto one node each")
    return 0
