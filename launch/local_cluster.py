"""Real clusters on one machine: a Ray head with token auth, and a two-node SLURM cluster.

The launch tests and ``benchmarks/bench_launch.py`` start them to drive
``ray job submit`` and ``sbatch`` for real (and a person can, to try those
paths on a laptop). Both are started on private ports and temp dirs, with a
private HOME (so a ~/.ray/auth_token on the machine does not change what the
CLI sends), and both are stopped by the pids they started: never `ray stop`,
never a kill by name.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now, chosen *below* the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) is released before the daemon binds
    it, and meanwhile any process on the machine (another Ray, a gloo
    rendezvous) may be given the same ephemeral port: a Ray head whose runtime
    env agent port was taken that way talks to another Ray's agent and fails
    with "Invalid authentication token". Ports below the ephemeral range are
    never handed out automatically.
    """
    low = max(10000, _ephemeral_range()[0] - 12000)
    high = _ephemeral_range()[0] - 1
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    ports: list[int] = []
    for _ in range(2000):
        port = rng.randrange(low, high)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"could not find {n} free TCP ports in [{low}, {high})")


def auth_env(home: Path, token: str) -> dict[str, str]:
    """The environment of every process that talks to the test cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        HOME=str(home),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        TESSERA_LOG_LEVEL="WARNING",
        TESSERA_CACHE=os.environ.get("TESSERA_CACHE", str(Path.home() / ".cache" / "tessera")),
    )
    return env


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM our own process (and its session, which we created), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    proc: subprocess.Popen
    temp_dir: Path
    log: Path


def start_ray_head(num_cpus: int = 4, timeout_s: float = 180.0) -> RayHead:
    """`ray start --head --block` on private ports, token auth on; waits until jobs can be submitted."""
    root = Path(tempfile.mkdtemp(prefix="trh-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    env = auth_env(home, token)
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, nm, om = free_ports(9)
    log = root / "head.log"
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
        f"--num-cpus={num_cpus}", "--num-gpus=0", f"--object-store-memory={300 * 1024 * 1024}",
        f"--temp-dir={root / 'ray'}", "--disable-usage-stats",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env, proc, root, log)
    try:
        _wait_for_jobs_api(head, timeout_s)
    except BaseException:
        stop_ray_head(head)
        raise
    return head


def _wait_for_jobs_api(head: RayHead, timeout_s: float) -> None:
    probe = (
        "import sys\nfrom ray.job_submission import JobSubmissionClient\n"
        f"JobSubmissionClient({head.dashboard_url!r}).list_jobs()\n"
    )
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError(f"ray head exited with {head.proc.returncode}: {head.log.read_text()[-2000:]}")
        probe_proc = subprocess.run([sys.executable, "-c", probe], env=head.env, capture_output=True, text=True, timeout=120)
        if probe_proc.returncode == 0:
            return
        last = (probe_proc.stderr.strip().splitlines() or [""])[-1]
        time.sleep(1.0)
    raise TimeoutError(f"Ray head's job API at {head.dashboard_url} not ready within {timeout_s:.0f}s: {last}")


def stop_ray_head(head: RayHead) -> None:
    stop_process_group(head.proc)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def ray_head_fixture() -> Iterator[RayHead]:
    head = start_ray_head()
    try:
        yield head
    finally:
        stop_ray_head(head)


# -- a two-node SLURM cluster on this machine --------------------------------------------


def slurm_unavailable_reason() -> str | None:
    """Install slurm-wlm and munge when missing (root + apt); a reason to skip only when the machine forbids it."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing slurm-wlm/munge needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and this machine has no apt-get to install slurm-wlm/munge"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return f"could not install slurm-wlm/munge ({' '.join(cmd)} failed: {last})"
    return None


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    procs: list[subprocess.Popen]
    nodes: tuple[str, ...]


def _wait(predicate, timeout_s: float, what: str, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, proc.args[:2]))} exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.3)


def start_slurm(nodes: tuple[str, ...] = ("node1", "node2"), cpus: int = 2, timeout_s: float = 120.0) -> SlurmCluster:
    """munged (private socket and key), slurmctld and one slurmd per node, all in the foreground."""
    root = Path(tempfile.mkdtemp(prefix="tslurm-", dir="/tmp"))
    root.chmod(0o711)
    key = root / "munge.key"
    key.write_bytes(secrets.token_bytes(128))
    key.chmod(0o400)
    socket_path = root / "munge.sock"
    host = socket.gethostname().split(".")[0]
    ctld_port, *node_ports = free_ports(1 + len(nodes))
    for sub in ("state", "spool", "logs"):
        (root / sub).mkdir()
    node_lines = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} RealMemory=2000 State=UNKNOWN"
        for n, p in zip(nodes, node_ports)
    )
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=tessera-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/logs/slurmctld.log
SlurmdLogFile={root}/logs/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=4
KillWait=5
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SLURM_"))}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root, conf, env, [], tuple(nodes))
    try:
        log = open(root / "logs" / "daemons.log", "ab")
        munged = subprocess.Popen(
            ["munged", "-F", "-f", f"--socket={socket_path}", f"--key-file={key}", f"--log-file={root}/logs/munged.log",
             f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        cluster.procs.append(munged)
        _wait(socket_path.exists, timeout_s, "munged's socket", [munged])
        ctld = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        cluster.procs.append(ctld)
        ping = lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=30).stdout  # noqa: E731
        _wait(lambda: "UP" in ping(), timeout_s, "slurmctld to answer", [ctld])
        for node in nodes:
            cluster.procs.append(subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(conf)], env=env, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True))

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True,
                                 timeout=30).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return all(states.get(n, "").startswith("idle") for n in nodes)

        _wait(idle, timeout_s, f"nodes {nodes} to be idle", cluster.procs)
    except BaseException:
        stop_slurm(cluster)
        raise
    return cluster


def stop_slurm(cluster: SlurmCluster) -> None:
    """Cancel what is left, let job steps end (bounded), then stop slurmd, slurmctld, munged by pid."""
    try:
        subprocess.run(["scancel", "--full", "--user=root"], env=cluster.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h"], env=cluster.env, capture_output=True, text=True, timeout=30).stdout
            if not out.strip():
                break
            time.sleep(0.5)
    except Exception:  # noqa: BLE001 - the daemons may already be gone
        pass
    for proc in reversed(cluster.procs):
        stop_process_group(proc, timeout_s=20)
    shutil.rmtree(cluster.root, ignore_errors=True)
