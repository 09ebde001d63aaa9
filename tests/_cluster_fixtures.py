"""Real clusters for launch tests: a Ray head with token auth, and a two-node SLURM cluster.

Both are started by the tests, on private ports and temp dirs, with a
private HOME (so a ~/.ray/auth_token on the machine does not change what the
CLI sends), and both are stopped by the pids they started: never `ray stop`,
never a kill by name.
"""

from __future__ import annotations

import os
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


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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
