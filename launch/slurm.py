"""Render SLURM batch scripts that run a tessera job on a Ray cluster over the allocation.

The templates live in ``clusters/slurm/`` (``single_node.sbatch``,
``multi_node.sbatch``); placeholders are ``@@NAME@@`` so that the shell's own
``$VARS`` need no escaping. A rendered script is self-contained: it embeds the
validated job file, the path of the Python environment that renders it, and
explicit ports, then starts Ray (token auth, readiness loop, fast teardown)
and runs ``tessera run`` as the driver on the head node.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tessera.launch.jobfile import JobFile
from tessera.config import ConfigError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "clusters" / "slurm"
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
_TIME = re.compile(r"^(\d+-)?\d{1,2}(:\d{2}){0,2}$")


@dataclass(frozen=True)
class SlurmOptions:
    """What the batch script asks SLURM for and how it lays Ray out."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None  # None: whole nodes (--exclusive)
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    log: str = "tessera-%j.out"
    ray_port: int = 6379
    dashboard_port: int = 8265
    port_base: int = 30000
    port_stride: int = 100  # > 0 so that several SLURM nodes may share one host
    run_root: str = "/tmp"
    ready_timeout_s: int = 300
    ray_start_args: str = ""
    env_setup: str = ""  # shell lines run first, e.g. "module load cuda"
    extra_sbatch: tuple[str, ...] = field(default_factory=tuple)
    bin_dir: str = field(default_factory=lambda: str(Path(sys.executable).parent))

    def __post_init__(self) -> None:
        for name in ("nodes", "ready_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name.replace('_', '-')} is {value!r}; it must be an integer >= 1")
        if self.gpus_per_node < 0:
            raise ConfigError(f"gpus-per-node is {self.gpus_per_node}; it must be >= 0")
        if self.cpus_per_node is not None and self.cpus_per_node < 1:
            raise ConfigError(f"cpus-per-node is {self.cpus_per_node}; it must be >= 1 (or omitted for whole nodes)")
        if not _TIME.match(self.time):
            raise ConfigError(f"time {self.time!r} is not a SLURM time limit; write e.g. 01:00:00 or 1-00:00:00")
        ports = {"ray-port": self.ray_port, "dashboard-port": self.dashboard_port, "port-base": self.port_base}
        for name, port in ports.items():
            if not 1024 <= port <= 65535:
                raise ConfigError(f"{name} {port} is outside 1024..65535")
        top = self.port_base + (self.nodes - 1) * self.port_stride + 99
        if top > 65535:
            raise ConfigError(
                f"ports of {self.nodes} nodes run up to {top} (> 65535); lower --port-base or "
                f"--port-stride (0 when every SLURM node is its own host)"
            )
        if self.port_base <= self.ray_port <= top or self.port_base <= self.dashboard_port <= top:
            raise ConfigError(f"ray-port and dashboard-port must lie outside the per-node range {self.port_base}..{top}")
        for line in self.extra_sbatch:
            if not line.startswith("--"):
                raise ConfigError(f"extra sbatch option {line!r} must look like --name=value")


def render(jobfile: JobFile, opts: SlurmOptions) -> str:
    """The batch script for ``jobfile``; refuses a job that a batch run could not finish."""
    jobfile.check_runnable()
    if jobfile.job.cluster is not None:
        raise ConfigError(
            f"the job names cluster {jobfile.job.cluster!r}, but a SLURM job runs on the Ray cluster it "
            f"starts; remove cluster from the job file"
        )
    if jobfile.job.device == "cuda" and opts.gpus_per_node == 0:
        raise ConfigError("the job runs on cuda but --gpus-per-node is 0; pass --gpus-per-node G")
    world = jobfile.job.plan.world_size
    if jobfile.job.device == "cuda" and not jobfile.plan_auto and world > opts.nodes * opts.gpus_per_node:
        raise ConfigError(
            f"plan {jobfile.job.plan} needs {world} GPUs but {opts.nodes} node(s) x {opts.gpus_per_node} GPU(s) "
            f"= {opts.nodes * opts.gpus_per_node}; add nodes or lower the degrees"
        )
    template = TEMPLATE_DIR / ("single_node.sbatch" if opts.nodes == 1 else "multi_node.sbatch")
    sbatch = [f"#SBATCH {line}" for line in _sbatch_lines(opts)]
    job_yaml = jobfile.to_yaml().rstrip("\n")
    if "TESSERA_JOB" in job_yaml:
        raise ConfigError("the job file may not contain the text TESSERA_JOB (it ends the embedded job)")
    values = {
        "JOB_NAME": _safe_name(opts.job_name or jobfile.name),
        "NODES": str(opts.nodes),
        "LOG": opts.log,
        "TIME": opts.time,
        "SBATCH_LINES": "\n".join(sbatch),
        "ENV_SETUP": opts.env_setup or "# (no environment set-up lines)",
        "BIN_DIR": opts.bin_dir,
        "PYTHON": shlex.quote(str(Path(opts.bin_dir) / "python")),
        "RAY_PORT": str(opts.ray_port),
        "DASHBOARD_PORT": str(opts.dashboard_port),
        "PORT_BASE": str(opts.port_base),
        "PORT_STRIDE": str(opts.port_stride),
        "GPUS_PER_NODE": str(opts.gpus_per_node),
        "RAY_START_ARGS": opts.ray_start_args.replace('"', ""),
        "READY_TIMEOUT_S": str(opts.ready_timeout_s),
        "RUN_ROOT": opts.run_root,
        "JOB_YAML": job_yaml,
        "RUN_ARGS": f"--output {shlex.quote(jobfile.output)}" if jobfile.output else "",
    }
    return fill(template.read_text(), values)


def fill(text: str, values: dict[str, str]) -> str:
    """Replace every ``@@NAME@@``; an unknown or missing name is an error, not a silent blank."""
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise ConfigError(f"template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _sbatch_lines(opts: SlurmOptions) -> list[str]:
    lines = []
    if opts.cpus_per_node is None:
        lines.append("--exclusive")
    else:
        lines.append(f"--cpus-per-task={opts.cpus_per_node}")
    if opts.gpus_per_node:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.partition:
        lines.append(f"--partition={opts.partition}")
    if opts.account:
        lines.append(f"--account={opts.account}")
    lines.extend(opts.extra_sbatch)
    return lines


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:64] or "tessera"


@dataclass(frozen=True)
class SbatchResult:
    job_id: str
    returncode: int
    script: str


def sbatch(script_path: str | os.PathLike[str], wait: bool, timeout_s: float, env: dict[str, str] | None = None) -> SbatchResult:
    """Submit with ``sbatch --parsable`` (``--wait``: block until the job ends, exit with its code)."""
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [str(script_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except FileNotFoundError:
        raise ConfigError("sbatch is not on PATH; run this on a SLURM login node (or install slurm-client)") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"sbatch did not return within {timeout_s:.0f}s; raise --timeout or drop --wait") from None
    first = (proc.stdout.strip().splitlines() or [""])[0]
    job_id = first.split(";")[0].strip()
    if not job_id.isdigit():
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"sbatch refused the job: {reason}")
    return SbatchResult(job_id=job_id, returncode=proc.returncode, script=str(script_path))
