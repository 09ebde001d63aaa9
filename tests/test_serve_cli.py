"""``tessera serve`` as users start it: the CLI with an embedded Ray (SIGTERM stops every process it started,
checked by pid), through ``ray job submit`` on a running Ray head (``ray job stop`` removes the application and
its workers), and the SLURM script of ``tessera slurm render --serve``."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tessera.launch.local_cluster import BIN, ray_head_fixture
from tessera.models.tiny_moe import build_tiny_moe
from tessera.tests.serve_testing import free_port, wait_until

pytestmark = pytest.mark.timeout(900)
KEY = "cli-key-0123456789abcdef"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_moe("qwen3_moe", tmp_path_factory.mktemp("serve-cli") / "qwen3", tokenizer=True)


def _reader(proc: subprocess.Popen) -> "queue.Queue[str]":
    lines: queue.Queue[str] = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_line(lines: "queue.Queue[str]", needle: str, timeout_s: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if needle in line:
            return line
        if line == "":
            break
    raise AssertionError(f"no {needle!r} line within {timeout_s:.0f}s; output:\n{''.join(seen)[-4000:]}")


def _cmdline(proc: "psutil.Process | int") -> str:
    """A process's command line, or "" when it exited (or became a zombie) between listing and reading: Ray
    starts and ends short-lived helper processes at any time, so a listed child may be gone a moment later."""
    try:
        return " ".join((proc if isinstance(proc, psutil.Process) else psutil.Process(proc)).cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def _tree(pid: int) -> dict[int, float]:
    """pid -> create time of a process and all its descendants (a pid may be reused: the time tells)."""
    root = psutil.Process(pid)
    tree = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            tree[p.pid] = p.create_time()
        except psutil.NoSuchProcess:  # a short-lived helper that ended while we listed: nothing to stop
            pass
    return tree


def _alive(pids: dict[int, float]) -> list[str]:
    left = []
    for pid, created in pids.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {_cmdline(p)[:80]}")
        except psutil.NoSuchProcess:
            pass
    return left


def test_cli_serves_and_sigterm_stops_every_process(model_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                          "RAY_AUTH_TOKEN_PATH")}
    env.update(TESSERA_API_KEY=KEY, TESSERA_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera.launch.cli", "serve", "--model", str(model_dir), "--plan", "ep=2",
         "--port", str(port), "--served-model-name", "cli-model"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        lines = _reader(proc)
        ready = _wait_line(lines, "ready at", 400, seen)
        assert f"http://127.0.0.1:{port}" in ready and "API key required" in ready
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
        r = client.completions.create(model="cli-model", prompt="the quick brown fox", max_tokens=5, temperature=0)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        pids = _tree(proc.pid)
        names = " ".join(_name(p) for p in pids)
        assert "raylet" in names and "gcs_server" in names  # the embedded Ray's processes are in the tree
        assert sum("Worker" in _cmdline(p) for p in pids) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, "".join(seen)[-4000:]
        wait_until(lambda: not _alive(pids), 60, f"every process of the server to exit: {_alive(pids)}")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:  # only on failure: our own process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_cli_refuses_an_open_bind_without_a_key_before_starting_anything(model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_API_KEY"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "serve", "--model", str(model_dir),
                           "--host", "0.0.0.0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs an API key" in proc.stderr and "TESSERA_API_KEY" in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr and time.monotonic() - started < 60
    keyfile = tmp_path / "key"
    keyfile.write_text("k" * 20 + "\n")
    keyfile.chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "serve", "--model", str(model_dir),
                           "--api-key-file", str(keyfile)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "readable by other users" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "serve", "--model", str(model_dir),
                           "--max-image-batch", "0"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "max_image_batch" in proc.stderr
    assert "Started a local Ray" not in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "serve", "--model", str(model_dir),
                           "--image-batching", "approx"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--image-batching" in proc.stderr and "'exact', 'fast'" in proc.stderr


@pytest.fixture(scope="module")
def ray_head():
    yield from ray_head_fixture()


@pytest.mark.slow
def test_ray_job_submit_serves_and_ray_job_stop_removes_it(ray_head, model_dir, tmp_path):
    port = free_port()
    (tmp_path / "job.yaml").write_text(f"model: {model_dir}\nplan: {{ep: 2}}\nengine: {{max_model_len: 128}}\n")
    # `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default): give the
    # server the time to delete its application, workers and Serve.
    runtime_env = '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}'
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(tmp_path),
         "--runtime-env-json", runtime_env, "--no-wait", "--", "tessera", "serve", "job.yaml", "--port", str(port),
         "--served-model-name", "job-model"],
        cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)

    def job(*args, timeout=120):
        return subprocess.run([str(BIN / "ray"), "job", *args, "--address", ray_head.dashboard_url, job_id],
                              env=ray_head.env, capture_output=True, text=True, timeout=timeout)

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {"status": "ready"}
        except httpx.HTTPError:
            status = job("status").stdout
            assert "FAILED" not in status and "STOPPED" not in status, job("logs").stdout[-4000:]
            return False

    try:
        wait_until(healthy, 400, "the server started by `ray job submit` to answer", every_s=1.0)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                       json={"model": "job-model", "prompt": "the router", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        head = psutil.Process(ray_head.proc.pid)
        workers = {p.pid for p in head.children(recursive=True) if "ray::Worker" in _cmdline(p)}
        assert len(workers) >= 2
    finally:
        stop = job("stop", timeout=300)
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    logs = job("logs").stdout
    assert "tessera serve: stopping" in logs and "Traceback" not in logs, logs[-4000:]
    wait_until(lambda: not any("ray::Worker" in _cmdline(p) for p in workers), 60, "the engine's workers to exit")
    left = [p for p in head.children(recursive=True)
            if any(name in _cmdline(p) for name in ("ServeReplica", "ServeController", "ProxyActor"))]
    assert not left, [_cmdline(p)[:80] for p in left]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_slurm_render_serve(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: tiny-moe:qwen3_moe\nplan: {ep: 2}\n")  # no prompts: a server needs none
    for nodes in ("1", "2"):
        out = tmp_path / f"serve{nodes}.sbatch"
        proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "slurm", "render", str(job), "--serve",
                               "--serve-host", "0.0.0.0", "--serve-port", "8400", "--nodes", nodes, "--out", str(out)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        script = out.read_text()
        assert 'tessera serve "$RUN_DIR/job.yaml"' in script and "--host 0.0.0.0 --port 8400" in script
        assert "tessera run " not in script.replace("`tessera run`", "")
        assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    plain = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "slurm", "render", str(job)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "needs at least one prompt" in plain.stderr  # a batch job still needs prompts
    bad = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "slurm", "render", str(job), "--serve",
                          "--serve-host", "$(reboot)"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not an IP address" in bad.stderr
