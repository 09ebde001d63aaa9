"""SLURM: rendered batch scripts, and a real two-node SLURM cluster running a Ray job across both nodes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tessera.launch.commands.slurm import default_script_path
from tessera.launch.jobfile import JobFile
from tessera.launch.slurm import SlurmOptions, render
from tessera.config import ConfigError
from tessera.launch.local_cluster import BIN, free_ports, slurm_unavailable_reason, start_slurm, stop_slurm

pytestmark = pytest.mark.timeout(900)

MESH_JOB = "task: mesh\nplan: {pp: 2, tp: 2}\nmesh: {payload_bytes: 4096}\n"
# ep=2 x tp=2: each tensor-parallel pair is packed onto one node, experts are split across the nodes.
GENERATE_JOB = """task: generate
model: tiny-moe:mixtral
plan: {ep: 2, tp: 2}
prompts: ["the router sends every token"]
sampling: {max_new_tokens: 6}
offload: {device_budget_bytes: 64MiB}
"""


@pytest.mark.parametrize("nodes", [1, 2])
def test_rendered_script_is_valid_bash_with_everything_filled(nodes):
    jf = JobFile.from_dict({"name": "demo job", "task": "mesh", "plan": "pp=2,tp=2", "output": "out/r.json"})
    script = render(jf, SlurmOptions(nodes=nodes, gpus_per_node=0, cpus_per_node=2, ray_port=41000,
                                     dashboard_port=41001, port_base=42000, extra_sbatch=("--qos=debug",)))
    assert "@@" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "#SBATCH --job-name=demo-job" in script and "#SBATCH --qos=debug" in script
    assert f"#SBATCH --nodes={nodes}" in script or nodes == 1
    assert "RAY_AUTH_MODE=token" in script and "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0" in script
    assert "--port=\"$RAY_PORT\"" in script and "RAY_PORT=41000" in script
    assert "sleep 0.2" in script and re.search(r"until \(exec 3<>", script)  # readiness loop, not a fixed wait
    embedded = script.split("<<'TESSERA_JOB'\n")[1].split("\nTESSERA_JOB")[0]
    import yaml

    assert JobFile.from_dict(yaml.safe_load(embedded)) == jf


def test_render_refuses_what_cannot_work():
    gpu = JobFile.from_dict({"task": "mesh", "plan": "tp=8", "device": "cuda"})
    with pytest.raises(ConfigError, match="needs 8 GPUs"):
        render(gpu, SlurmOptions(nodes=1, gpus_per_node=4))
    with pytest.raises(ConfigError, match="--gpus-per-node is 0"):
        render(gpu, SlurmOptions(nodes=2))
    with pytest.raises(ConfigError, match="remove cluster"):
        render(JobFile.from_dict({"plan": "tp=2", "cluster": "auto"}), SlurmOptions())
    with pytest.raises(ConfigError, match="not a SLURM time limit"):
        SlurmOptions(time="one hour")
    with pytest.raises(ConfigError, match="> 65535"):
        SlurmOptions(nodes=400, port_base=60000)


# Values that are not meant to be shell: `$(...)`, a newline, `;`, quotes and backticks are refused.
INJECTIONS = [
    ("partition", "$(touch /tmp/pwned)"),
    ("partition", "debug\n#SBATCH --uid=0"),
    ("partition", "debug;id"),
    ("account", "proj`id`"),
    ("job_name", "x$(id)"),
    ("time", "01:00:00\nid"),
    ("log", "out-%j.log\necho pwned"),
    ("log", "out $(id).log"),
    ("run_root", "/tmp/$(touch /tmp/pwned)"),
    ("run_root", "/tmp\nid"),
    ("run_root", "/tmp/\"; id; \""),
    ("run_root", "relative/dir"),
    ("ray_start_args", "--num-cpus=$(id)"),
    ("ray_start_args", "--num-cpus=1\nid"),
    ("ray_start_args", "--x=1; id"),
    ("ray_start_args", "--x=\"a"),
    ("extra_sbatch", ("--qos=debug\nid",)),
    ("extra_sbatch", ("--comment=$(id)",)),
    ("dashboard_host", "0.0.0.0; id"),
    ("dashboard_host", "localhost\n"),
    ("bin_dir", "/opt/env$(id)/bin"),
]
FINE = {"partition": "debug,gpu-a100", "account": "proj_1.x", "job_name": "my-job.v2", "time": "1-00:00:00",
        "log": "logs/tessera-%j.out", "run_root": "/scratch/local_tmp", "ray_start_args":
        "--object-store-memory=150000000 --resources-cpu 2", "extra_sbatch": ("--qos=debug", "--constraint=a100&nvlink"),
        "dashboard_host": "0.0.0.0", "bin_dir": "/opt/my env/bin"}


@pytest.mark.parametrize("key, value", INJECTIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(INJECTIONS)])
def test_slurm_options_refuse_newlines_and_shell(key, value):
    with pytest.raises(ConfigError) as err:
        SlurmOptions(**{key: value})
    assert repr(value if not isinstance(value, tuple) else value[0]) in str(err.value) or "absolute" in str(err.value)


def test_normal_slurm_values_render_verbatim():
    jf = JobFile.from_dict({"name": "demo", "task": "mesh", "plan": "tp=2"})
    script = render(jf, SlurmOptions(nodes=2, **FINE))
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    for line in ("#SBATCH --partition=debug,gpu-a100", "#SBATCH --account=proj_1.x", "#SBATCH --job-name=my-job.v2",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --output=logs/tessera-%j.out", "#SBATCH --qos=debug",
                 "#SBATCH --constraint=a100&nvlink", 'RUN_DIR="/scratch/local_tmp/tessera-${SLURM_JOB_ID}"',
                 'RAY_START_ARGS="--object-store-memory=150000000 --resources-cpu 2"',
                 'export PATH="/opt/my env/bin:$PATH"', "--dashboard-host=0.0.0.0"):
        assert line in script, line


def test_dashboard_binds_loopback_with_token_auth_unless_asked(tmp_path):
    jf = JobFile.from_dict({"task": "mesh", "plan": "tp=2"})
    for nodes in (1, 2):
        script = render(jf, SlurmOptions(nodes=nodes))
        assert "--dashboard-host=127.0.0.1" in script and "0.0.0.0" not in script
        assert "export RAY_AUTH_MODE=token" in script and "umask 077" in script
        asked = render(jf, SlurmOptions(nodes=nodes, dashboard_host="10.1.2.3"))
        assert "--dashboard-host=10.1.2.3" in asked and "export RAY_AUTH_MODE=token" in asked


def test_cli_refuses_injection_before_writing_anything(tmp_path):
    (tmp_path / "job.yaml").write_text(MESH_JOB)
    marker = tmp_path / "pwned"
    for flags in (["--partition", f"$(touch {marker})"], ["--run-root", f"/tmp/$(touch {marker})"],
                  ["--account", "a\ntouch " + str(marker)], ["--ray-start-args", f"--x=`touch {marker}`"]):
        proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "slurm", "render", "job.yaml", *flags,
                               "--out", "job.sbatch"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "is refused" in proc.stderr and "would run as commands" in proc.stderr, proc.stderr
        assert not (tmp_path / "job.sbatch").exists() and not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "slurm", "render", "job.yaml", "--partition",
                           "debug", "--out", "job.sbatch"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "job.sbatch").stat().st_mode & 0o777 == 0o700  # the script is private to its owner
    assert "#SBATCH --partition=debug" in (tmp_path / "job.sbatch").read_text()


def test_submit_writes_scripts_only_under_tessera_slurm(tmp_path):
    (tmp_path / "evil.yaml").write_text("name: ../../../x\n" + MESH_JOB)
    with pytest.raises(ConfigError, match=r"job name '\.\./\.\./\.\./x' is not allowed"):
        JobFile.from_yaml(tmp_path / "evil.yaml")
    for name, file in (("demo job", "demo-job.sbatch"), ("..x", "x.sbatch"), ("a/../../b", "a-..-..-b.sbatch")):
        path = default_script_path(name, base=tmp_path)
        assert path == tmp_path / ".tessera" / "slurm" / file
        assert path.resolve().parent == (tmp_path / ".tessera" / "slurm").resolve()


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_slurm()
    try:
        yield cluster
    finally:
        stop_slurm(cluster)


def _our_processes(marker: str) -> list[int]:
    """Pids of processes whose command line names our private run dir (started by our SLURM job)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_slurm_submit_two_nodes_runs_a_ray_job_across_both(slurm_cluster, tmp_path):
    run_root = Path(tempfile.mkdtemp(prefix="tsr", dir="/tmp"))  # short: Ray's socket paths are length-limited
    home = tmp_path / "home"
    home.mkdir()
    has_engine = importlib.util.find_spec("tessera.runtime.llm.engine") is not None
    job = GENERATE_JOB if has_engine else MESH_JOB  # the mesh check runs where the MoE engine is missing
    (tmp_path / "job.yaml").write_text(job + f"output: {tmp_path / 'result.json'}\n")
    ray_port, dash_port = free_ports(2)
    env = {
        **slurm_cluster.env,
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TESSERA_LOG_LEVEL": "WARNING",
        "TESSERA_CACHE": os.environ.get("TESSERA_CACHE", str(Path.home() / ".cache" / "tessera")),
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tessera.launch.cli", "slurm", "submit", "job.yaml", "--nodes", "2",
             "--cpus-per-node", "2", "--wait", "--timeout", "600", "--log", str(tmp_path / "slurm-%j.out"),
             "--out", str(tmp_path / "job.sbatch"), "--ray-port", str(ray_port), "--dashboard-port", str(dash_port),
             "--port-base", str(_free_range(200)), "--run-root", str(run_root),
             "--ray-start-args=--object-store-memory=150000000"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=700,
        )
        logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
        ray_logs = "".join(f"\n--- {p}\n" + p.read_text()[-3000:] for p in sorted(run_root.glob("*/ray-*.log")))
        assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-6000:] + ray_logs
        result = json.loads((tmp_path / "result.json").read_text())
        assert result["ok"] and result["nodes"] == 2
        if has_engine:
            (gen,) = result["generations"]
            assert 1 <= len(gen["token_ids"]) <= 6 and f"tokens {gen['token_ids']}" in logs
            # the job file's offload key reached the engine on every rank of both nodes
            assert len(result["offload"]) == 4 and all(s and s["cache_misses"] > 0 for s in result["offload"])
        else:
            assert "collectives over each dim: all correct" in logs
        by_node = {}
        for rank in result["placement"]:
            by_node.setdefault(rank["node_id"], []).append(rank["rank"])
        assert sorted(map(sorted, by_node.values())) == [[0, 1], [2, 3]]  # each tp pair on one node
        assert re.search(r"tessera-timing: teardown_done", logs)
        # Teardown left no Ray process of the job behind (bounded wait, then clean up and fail).
        deadline = time.monotonic() + 60
        while _our_processes(str(run_root)) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = _our_processes(str(run_root))
        for pid in leftover:
            os.kill(pid, 9)
        assert not leftover, f"Ray processes outlived the SLURM job: {leftover}"
    finally:
        shutil.rmtree(run_root, ignore_errors=True)


def _free_range(width: int) -> int:
    """A base port with ``width`` free ports above it (checked now)."""
    import random
    import socket

    for _ in range(50):
        base = random.randrange(20000, 60000 - width)
        try:
            socks = []
            for port in range(base, base + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")
