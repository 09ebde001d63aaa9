"""Render SLURM batch scripts that run a tessera job on a Ray cluster over the allocation.

The templates live in ``clusters/slurm/`` (``single_node.sbatch``,
``multi_node.sbatch``); placeholders are ``@@NAME@@`` so that the shell's own
``$VARS`` need no escaping. A rendered script is self-contained: it embeds the
validated job file, the path of the Python environment that renders it, and
explicit ports, then starts Ray (token auth, readiness loop, fast teardown)
and runs ``tessera run`` as the driver on the head node.

Every option that lands in the script is validated here: values that are not
meant to be shell (partition, account, time, names, paths, ``ray start``
flags) may not carry newlines or shell metacharacters, so a ``$(...)`` or a
second line typed into ``--partition`` can never become a command. Only
``env_setup`` is shell, on purpose. The dashboard and Jobs API bind to
``127.0.0.1`` unless ``dashboard_host`` says otherwise; token auth is always on.
"""

from __future__ import annotations

import ipaddress
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
_TIME = re.compile(r"(\d+-)?\d{1,2}(:\d{2}){0,2}")
# What a value may hold where it is not meant to be shell. Each pattern is matched in full.
_PARTITION = re.compile(r"[A-Za-z0-9_.,-]{1,128}")  # a comma-separated list of partitions
_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_PATH = re.compile(r"[A-Za-z0-9_./%@+,:=-]{1,1024}")  # paths in the script: no spaces, quotes, $, `, ; or newlines
_FLAG = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9_-]*(=[A-Za-z0-9_./%@+,:=-]*)?|[A-Za-z0-9_./%@+,:=-]+")
_SBATCH_OPTION = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=[^\x00-\x1f\x7f`$]*)?")
_UNSAFE_IN_QUOTES = re.compile(r"[\x00-\x1f\x7f`$\"\\]")


def _refuse(option: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(
        f"{option} {value!r} is refused: {allowed}. Newlines and shell characters ($, `, ;, |, &, quotes) "
        "would run as commands in the batch script"
    )


def _check_int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{name} is {value!r}; it must be an integer >= {least}")


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
    dashboard_host: str = "127.0.0.1"  # the dashboard / Jobs API bind address; 0.0.0.0 only when asked for
    port_base: int = 30000
    port_stride: int = 100  # > 0 so that several SLURM nodes may share one host
    run_root: str = "/tmp"
    ready_timeout_s: int = 300
    ray_start_args: str = ""
    env_setup: str = ""  # shell lines run first, e.g. "module load cuda"
    extra_sbatch: tuple[str, ...] = field(default_factory=tuple)
    bin_dir: str = field(default_factory=lambda: str(Path(sys.executable).parent))
    # --serve: the driver is `tessera serve` (an OpenAI-compatible service until the job ends) instead of
    # `tessera run`; it listens on serve_host:serve_port of the head node (any address but loopback needs
    # $TESSERA_API_KEY in the environment sbatch passes on).
    serve: bool = False
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000

    def __post_init__(self) -> None:
        for name in ("nodes", "ready_timeout_s"):
            _check_int(name.replace("_", "-"), getattr(self, name), 1)
        for name in ("gpus_per_node", "port_stride", "ray_port", "dashboard_port", "port_base"):
            _check_int(name.replace("_", "-"), getattr(self, name), 0)
        if self.cpus_per_node is not None:
            if isinstance(self.cpus_per_node, bool) or not isinstance(self.cpus_per_node, int) or self.cpus_per_node < 1:
                raise ConfigError(f"cpus-per-node is {self.cpus_per_node!r}; it must be >= 1 (or omitted for whole nodes)")
        if not isinstance(self.time, str) or not _TIME.fullmatch(self.time):
            raise ConfigError(f"time {self.time!r} is not a SLURM time limit; write e.g. 01:00:00 or 1-00:00:00")
        self._check_text()
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
        if not isinstance(self.serve, bool):
            raise ConfigError(f"serve is {self.serve!r}; it must be true or false")
        if self.serve:
            _check_int("serve-port", self.serve_port, 1024)
            if self.serve_port > 65535 or self.port_base <= self.serve_port <= top or self.serve_port in (
                    self.ray_port, self.dashboard_port):
                raise ConfigError(f"serve-port {self.serve_port} must be in 1024..65535 and differ from the Ray ports "
                                  f"(ray-port, dashboard-port, {self.port_base}..{top})")
            try:
                ipaddress.ip_address(self.serve_host)
            except ValueError:
                raise ConfigError(f"--serve-host {self.serve_host!r} is not an IP address; use 127.0.0.1 (the "
                                  "default) or 0.0.0.0 with $TESSERA_API_KEY set") from None
        if self.port_base <= self.ray_port <= top or self.port_base <= self.dashboard_port <= top:
            raise ConfigError(f"ray-port and dashboard-port must lie outside the per-node range {self.port_base}..{top}")
        for line in self.extra_sbatch:
            if not isinstance(line, str) or not line.startswith("--"):
                raise ConfigError(f"extra sbatch option {line!r} must look like --name=value")
            if not _SBATCH_OPTION.fullmatch(line):
                raise _refuse("extra sbatch option", line, "write one option as --name or --name=value on one line")

    def _check_text(self) -> None:
        """Refuse newlines and shell metacharacters in every value that is not meant to be shell."""
        checks = (
            ("--partition", self.partition, _PARTITION, "partition names are letters, digits, _ . - (comma-separated)"),
            ("--account", self.account, _ACCOUNT, "account names are letters, digits, _ . -"),
            ("--job-name", self.job_name, _JOB_NAME, "job names are up to 64 letters, digits, _ . + -"),
            ("--log", self.log, _PATH, "paths may hold letters, digits, / _ . % @ + , : = - (e.g. logs/tessera-%j.out)"),
            ("--run-root", self.run_root, _PATH, "an absolute path of letters, digits, / _ . @ + , : = -"),
        )
        for option, value, pattern, allowed in checks:
            if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
                raise _refuse(option, value, allowed)
        if not self.run_root.startswith("/"):
            raise ConfigError(f"--run-root {self.run_root!r} must be an absolute node-local folder such as /tmp")
        if not isinstance(self.bin_dir, str) or _UNSAFE_IN_QUOTES.search(self.bin_dir):
            raise _refuse("the Python environment's bin folder", self.bin_dir,
                          "it may not contain $, `, quotes, backslashes or control characters (move the environment)")
        if not isinstance(self.ray_start_args, str):
            raise ConfigError(f"--ray-start-args is {self.ray_start_args!r}; give flags as one string")
        if re.search(r"[\x00-\x1f\x7f]", self.ray_start_args):
            raise _refuse("--ray-start-args", self.ray_start_args, "give the flags on one line")
        try:
            flags = shlex.split(self.ray_start_args)
        except ValueError as err:
            raise _refuse("--ray-start-args", self.ray_start_args, f"it does not parse as flags ({err})") from None
        for flag in flags:
            if not _FLAG.fullmatch(flag):
                raise _refuse("--ray-start-args", self.ray_start_args,
                              f"{flag!r} is not a plain flag (--name or --name=value of letters, digits, / _ . % @ + , : = -)")
        if not isinstance(self.env_setup, str):
            raise ConfigError(f"--env-setup is {self.env_setup!r}; give shell lines as one string")
        if not isinstance(self.dashboard_host, str):
            raise ConfigError(f"--dashboard-host is {self.dashboard_host!r}; give an IP address such as 127.0.0.1")
        try:
            ipaddress.ip_address(self.dashboard_host)
        except ValueError:
            raise ConfigError(f"--dashboard-host {self.dashboard_host!r} is not an IP address; use 127.0.0.1 (the "
                              "default: only the head node reaches the Jobs API) or the address of one interface") from None


def render(jobfile: JobFile, opts: SlurmOptions) -> str:
    """The batch script for ``jobfile``; refuses a job that a batch run could not finish.

    With ``opts.serve`` the driver is ``tessera serve`` (no prompts needed: requests come over HTTP) and the
    job serves until SLURM ends it (its time limit, or ``scancel``: SIGTERM stops the server cleanly)."""
    if opts.serve:
        if not jobfile.job.model:
            raise ConfigError("--serve needs a job with a model to serve (model: in the job file)")
    else:
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
        "DASHBOARD_HOST": opts.dashboard_host,
        "PORT_BASE": str(opts.port_base),
        "PORT_STRIDE": str(opts.port_stride),
        "GPUS_PER_NODE": str(opts.gpus_per_node),
        "RAY_START_ARGS": " ".join(shlex.split(opts.ray_start_args)),  # validated: plain flags only
        "READY_TIMEOUT_S": str(opts.ready_timeout_s),
        "RUN_ROOT": opts.run_root,
        "JOB_YAML": job_yaml,
        "RUN_ARGS": _driver_args(jobfile, opts),
        "DRIVER": "tessera serve" if opts.serve else "tessera run",
    }
    return fill(template.read_text(), values)


def _driver_args(jobfile: JobFile, opts: SlurmOptions) -> str:
    if opts.serve:  # validated: an IP address and a port number
        return f"--host {opts.serve_host} --port {opts.serve_port}"
    return f"--output {shlex.quote(jobfile.output)}" if jobfile.output else ""


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
    """A SLURM job name / file name from a job's name: anything but letters, digits, _ . - becomes '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name).lstrip(".-")[:64] or "tessera"


def safe_file_name(name: str) -> str:
    """The file name (no folders, no leading dot) a script for job ``name`` is written to."""
    return _safe_name(name)


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
