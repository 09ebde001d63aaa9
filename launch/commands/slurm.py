"""``tessera slurm render|submit``: a SLURM batch script that starts Ray over the allocation and runs a job.

``render`` writes the script (from clusters/slurm/*.sbatch); ``submit``
renders and submits it with ``sbatch`` (``--wait``: block until the job ends
and exit with its exit code).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "slurm",
        help="render or submit a SLURM batch script that starts Ray over the allocation and runs a job",
        description="SLURM batch jobs: a Ray cluster over the allocation (head on the first node, workers "
        "on the others via srun, token auth, explicit ports, readiness loop, fast teardown), then "
        "`tessera run` of the embedded job file as the driver. 'render' writes the script, 'submit' "
        "also runs sbatch.",
    )
    sub = parser.add_subparsers(dest="slurm_command", metavar="ACTION")
    render = sub.add_parser("render", help="write a ready batch script for a job file",
                            description="Validate JOB and write a self-contained batch script (to --out or stdout).")
    submit = sub.add_parser("submit", help="render and submit with sbatch (--wait: exit with the job's code)",
                            description="Render JOB to a script (--out, default .tessera/slurm/<name>.sbatch) and "
                            "submit it with sbatch; prints the SLURM job id. With --wait, block until the job ends "
                            "and exit with its exit code (0 ok, else 1 with the log path on stderr).")
    for p in (render, submit):
        p.add_argument("job", help="YAML job file")
        p.add_argument("--nodes", type=int, default=1, help="SLURM nodes (one Ray node each; default 1)")
        p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
        p.add_argument("--cpus-per-node", type=int, help="CPUs per node (default: whole nodes, --exclusive)")
        p.add_argument("--time", default="01:00:00", help="SLURM time limit (default 01:00:00)")
        p.add_argument("--partition", help="SLURM partition")
        p.add_argument("--account", help="SLURM account")
        p.add_argument("--job-name", help="SLURM job name (default: the job's name)")
        p.add_argument("--log", default="tessera-%j.out", help="batch log path (default tessera-%%j.out)")
        p.add_argument("--ray-port", type=int, default=6379, help="GCS port on the head (default 6379)")
        p.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / job API port (default 8265)")
        p.add_argument("--dashboard-host", default="127.0.0.1",
                       help="address the dashboard / job API binds to (default 127.0.0.1: the head node only; token "
                       "auth is always on)")
        p.add_argument("--port-base", type=int, default=30000, help="first per-node port (default 30000)")
        p.add_argument("--port-stride", type=int, default=100,
                       help="port offset between nodes (default 100; 0 when each node is its own host)")
        p.add_argument("--run-root", default="/tmp", help="node-local folder for Ray temp dirs (default /tmp)")
        p.add_argument("--ready-timeout", type=int, default=300, help="seconds to wait for Ray to start (default 300)")
        p.add_argument("--ray-start-args", default="", help="extra flags for every `ray start`")
        p.add_argument("--env-setup", default="", help="shell lines run first (e.g. 'module load cuda')")
        p.add_argument("--sbatch", action="append", default=[], metavar="--OPT=VALUE", help="extra #SBATCH option")
        p.add_argument("--out", help="where to write the script")
        p.add_argument("--serve", action="store_true",
                       help="run `tessera serve` (an OpenAI-compatible HTTP service until the job ends) instead of "
                       "`tessera run`")
        p.add_argument("--serve-host", default="127.0.0.1",
                       help="with --serve: address to listen on (default 127.0.0.1; any other needs $TESSERA_API_KEY "
                       "in the job's environment)")
        p.add_argument("--serve-port", type=int, default=8000, help="with --serve: port to listen on (default 8000)")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end and exit with its code")
    submit.add_argument("--timeout", type=float, default=86400.0, help="give up waiting after this many seconds")
    render.set_defaults(func=_render)
    submit.set_defaults(func=_submit)
    parser.set_defaults(func=_no_action)


def _no_action(args: argparse.Namespace) -> int:
    from tessera.launch.cli import CliError

    raise CliError("choose an action: tessera slurm render JOB ... or tessera slurm submit JOB ... (see --help)")


def _options(args: argparse.Namespace):
    from tessera.launch.slurm import SlurmOptions

    return SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node, time=args.time,
        partition=args.partition, account=args.account, job_name=args.job_name, log=args.log,
        ray_port=args.ray_port, dashboard_port=args.dashboard_port, dashboard_host=args.dashboard_host,
        port_base=args.port_base,
        port_stride=args.port_stride, run_root=args.run_root, ready_timeout_s=args.ready_timeout,
        ray_start_args=args.ray_start_args, env_setup=args.env_setup, extra_sbatch=tuple(args.sbatch),
        serve=args.serve, serve_host=args.serve_host, serve_port=args.serve_port,
    )


def _script(args: argparse.Namespace) -> tuple[str, str]:
    from tessera.launch.jobfile import JobFile
    from tessera.launch.slurm import render

    jobfile = JobFile.from_yaml(args.job)
    return jobfile.name, render(jobfile, _options(args))


def _write(path: Path, text: str) -> None:
    """Write the script readable and executable by its owner only (it embeds the job)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o700)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o700)


def default_script_path(name: str, base: Path | None = None) -> Path:
    """``.tessera/slurm/<name>.sbatch`` under ``base`` (the current folder); never a path outside that folder."""
    from tessera.config import ConfigError
    from tessera.launch.slurm import safe_file_name

    folder = (base or Path.cwd()) / ".tessera" / "slurm"
    path = folder / f"{safe_file_name(name)}.sbatch"
    if path.resolve().parent != folder.resolve():
        raise ConfigError(f"job name {name!r} would write the script to {path.resolve()}, outside {folder}; "
                          "rename the job (letters, digits, _ . -)")
    return path


def _render(args: argparse.Namespace) -> int:
    _, script = _script(args)
    if args.out:
        _write(Path(args.out), script)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(script)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from tessera.launch.slurm import sbatch

    name, script = _script(args)
    path = Path(args.out) if args.out else default_script_path(name)
    _write(path, script)
    result = sbatch(path, wait=args.wait, timeout_s=args.timeout)
    log = args.log.replace("%j", result.job_id)
    print(f"tessera slurm: submitted job {result.job_id} ({path}); log {log}", flush=True)
    if args.wait:
        if result.returncode != 0:
            print(f"tessera slurm: job {result.job_id} failed (sbatch exit {result.returncode}); see {log}", file=sys.stderr)
            return 1
        print(f"tessera slurm: job {result.job_id} completed")
    return 0
