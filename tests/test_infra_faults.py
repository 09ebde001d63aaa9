"""The Ray head dies under a running job (issue 12): a clear error, a bounded shutdown, no process left behind.

A real token-auth Ray head started by the test (``launch/local_cluster.py``);
a driver process launches tessera on it, generates, then the test kills the
head's whole process group. The driver's next call must fail with an error
that names the lost head, ``shutdown()`` must return in seconds (Ray itself
would block for a minute and then terminate the process), the driver must
exit normally, and every worker pid it reported must be gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tessera.launch.local_cluster import start_ray_head, stop_ray_head

pytestmark = pytest.mark.timeout(600)

DRIVER = r"""
import json, sys, time
import tessera
from tessera.config import Timeouts
handle = tessera.launch(model="tiny-moe:mixtral", plan={"ep": 2}, cluster=sys.argv[1],
                        timeouts=Timeouts(call_s=60, worker_start_s=180))
first = handle.generate("hello there", max_new_tokens=3)[0]
print(json.dumps({"pids": [r.pid for r in handle.ranks], "tokens": first.token_ids}), flush=True)
sys.stdin.readline()      # the test kills the head now
time.sleep(4)             # the cluster monitor probes every 2 s
started = time.time()
try:
    handle.generate("hello again", max_new_tokens=3)
    error = None
except Exception as err:
    error = f"{type(err).__name__}: {err}"
print(json.dumps({"error": error, "error_s": time.time() - started}), flush=True)
started = time.time()
handle.shutdown()
print(json.dumps({"shutdown_s": time.time() - started}), flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_losing_the_ray_head_is_reported_and_nothing_leaks(tmp_path):
    head = start_ray_head(num_cpus=4)
    driver = None
    try:
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        driver = subprocess.Popen([sys.executable, str(script), head.gcs_address], env=head.env, cwd=tmp_path,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = json.loads(driver.stdout.readline() or "{}")
        assert first.get("tokens"), driver.stderr.read()[-3000:] if driver.poll() is not None else first
        pids = first["pids"]
        os.killpg(head.proc.pid, signal.SIGKILL)  # the head node's GCS, raylet, dashboard: all at once
        head.proc.wait(timeout=30)
        driver.stdin.write("go\n")
        driver.stdin.flush()
        after = json.loads(driver.stdout.readline())
        closed = json.loads(driver.stdout.readline())
        driver.wait(timeout=60)
        assert driver.returncode == 0, driver.stderr.read()[-3000:]
        assert after["error"] and after["error"].startswith("InfrastructureError")
        assert "Ray head" in after["error"] and "does not answer" in after["error"]
        assert "launch again" in after["error"]
        assert closed["shutdown_s"] < 20.0  # bounded: Ray alone blocks 60 s, then kills the process
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in pids if _alive(p)], "worker processes outlived the job"
        leftovers = subprocess.run(["pgrep", "-f", str(head.temp_dir)], capture_output=True, text=True).stdout.split()
        assert not leftovers, f"processes of the dead cluster still run: {leftovers}"
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        stop_ray_head(head)
