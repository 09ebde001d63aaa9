"""``tessera submit``: run a job file on a running Ray cluster through the Ray Job API.

Wraps ``ray job submit --address URL --working-dir DIR -- tessera run JOB``:
validates the job here first, prints the submission id, follows the driver's
logs, and exits with the job's status (0 SUCCEEDED, 1 FAILED/STOPPED with
Ray's reason on one stderr line, 2 for a job that cannot work).
"""

from __future__ import annotations

import argparse
import os
import sys

from tessera.config import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="submit a job file to a running Ray cluster (Ray Job API) and follow it",
        description="Submit JOB to the Ray cluster at --address (the dashboard URL, http://HEAD:8265) "
        "as `tessera run JOB` with the job's folder as working dir; print the submission id, "
        "follow the logs and exit with the job's status: 0 SUCCEEDED, 1 FAILED or STOPPED, "
        "2 when the job file is invalid. With token auth, export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN.",
        epilog="example:\n  tessera submit job.yaml --address http://head:8265",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", help="YAML job file")
    parser.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="Ray dashboard address, e.g. http://HEAD:8265 (default: $RAY_DASHBOARD_ADDRESS)")
    parser.add_argument("--working-dir", help="folder uploaded with the job (default: the job file's folder)")
    parser.add_argument("--submission-id", help="the job's id (default: tessera-<name>-<random>)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    parser.add_argument("--no-wait", action="store_true", help="print the submission id and return at once")
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop the job after this many seconds (default 3600)")
    parser.add_argument("--tessera-cmd", default="tessera", help="command that runs tessera on the cluster (default: tessera)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tessera.launch.ray_job import JobFailed, Submission, submit

    if not args.address:
        raise ConfigError("no cluster address; pass --address http://HEAD:8265 (or set $RAY_DASHBOARD_ADDRESS)")
    env_vars = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {item!r} is not KEY=VALUE")
        env_vars[key] = value
    if args.log_level:
        env_vars.setdefault("TESSERA_LOG_LEVEL", args.log_level)
    sub = Submission(
        job_path=args.job,
        address=args.address,
        working_dir=args.working_dir,
        submission_id=args.submission_id,
        env_vars=env_vars,
        follow=not args.no_wait,
        timeout_s=args.timeout,
        tessera_cmd=args.tessera_cmd,
    )
    last_error: list[str] = []

    def echo(line: str) -> None:
        print(line, flush=True)
        if "error" in line.lower():
            last_error[:] = [line.strip()]

    outcome = submit(sub, echo=echo, note=lambda line: print(line, flush=True))
    if outcome.status in ("FAILED", "STOPPED"):
        reason = " ".join(outcome.message.split(", last available logs")[0].split())[:200] or "see the logs above"
        if last_error:
            reason += f"; last error: {last_error[0][:300]}"
        raise JobFailed(f"job {outcome.submission_id} {outcome.status} after {outcome.seconds:.0f}s: {reason}")
    print(f"tessera submit: job {outcome.submission_id} {outcome.status} in {outcome.seconds:.1f}s")
    return 0
