"""``tessera plan``: show where a job's ranks would go, without starting anything.

With a model (or ``plan: auto``) the planner decides and
``describe_placement`` explains its choice; otherwise the explicit plan is
shown as mesh, coordinates and Ray resources per rank. A
plan that cannot work exits 2 with the reason, as ``tessera run`` would.
"""

from __future__ import annotations

import argparse
import json

from tessera.launch.commands.run import add_job_flags, jobfile_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="show the placement of a job (mesh, ranks, resources) without starting workers",
        description="Validate a job and print its placement: the mesh dims and degrees, each rank's "
        "coordinates and Ray bundle, and the resources the cluster must have. Starts nothing. "
        "Exit 0 when the plan is valid, 2 with the reason when it is not.",
    )
    parser.add_argument("job", nargs="?", help="YAML job file")
    add_job_flags(parser)
    parser.add_argument("--json", action="store_true", help="print the placement as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
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
