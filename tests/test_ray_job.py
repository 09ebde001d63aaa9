"""`ray job submit -- tessera run` and `tessera submit` against a real Ray head with token auth."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tessera.config import ConfigError
from tessera.launch.local_cluster import BIN, RayHead, ray_head_fixture
from tessera.runtime.ray_env import check_ray_version

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_head() -> RayHead:
    yield from ray_head_fixture()


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("result: ")]
    assert lines, f"no result line in:\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("result: "):])


GENERATE_JOB = """task: generate
model: tiny-moe:mixtral
plan: {ep: 2}
prompts: ["the router sends every token"]
sampling: {max_new_tokens: 6}
offload: {device_budget_bytes: 64MiB}
"""
MESH_JOB = "task: mesh\nplan: {pp: 2, tp: 2}\nmesh: {payload_bytes: 4096}\n"


def test_ray_job_submit_runs_tessera(ray_head, tmp_path):
    """The MoE engine generates through `ray job submit`; before the engine exists, the mesh check runs."""
    has_engine = importlib.util.find_spec("tessera.runtime.llm.engine") is not None
    (tmp_path / "job.yaml").write_text(GENERATE_JOB if has_engine else MESH_JOB)
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(tmp_path),
         "--", "tessera", "run", "job.yaml"],
        cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = _result(proc.stdout)
    assert result["ok"]
    if has_engine:
        (gen,) = result["generations"]
        assert gen["finish_reason"] in ("length", "stop") and 1 <= len(gen["token_ids"]) <= 6
        # the generated tokens and text are in the job's output as the driver printed them
        assert f"tokens {gen['token_ids']}" in proc.stdout and repr(gen["text"]) in proc.stdout
        assert result["plan"] == {"ep": 2}
        # the job file's offload key reached the engine on every rank: experts came through the expert cache
        assert len(result["offload"]) == 2 and all(s and s["cache_misses"] > 0 for s in result["offload"])
    else:
        assert "collectives over each dim: all correct" in proc.stdout
        assert result["plan"] == {"pp": 2, "tp": 2} and len(result["placement"]) == 4


def test_tessera_submit_reports_a_failing_job(ray_head, tmp_path):
    # Valid as a file, impossible on this 4-CPU cluster: the placement times out there.
    (tmp_path / "too_big.yaml").write_text("task: mesh\nplan: {dp: 16}\ntimeouts: {placement_group_s: 3}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.launch.cli", "submit", "too_big.yaml", "--address", ray_head.dashboard_url,
         "--timeout", "400"],
        cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted tessera-too_big-" in proc.stdout
    assert "placement not satisfied" in proc.stdout  # the driver's error, followed from the logs
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "FAILED" in errors[0], proc.stderr


def test_tessera_submit_follows_a_job_to_success(ray_head, tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "mesh.yaml").write_text(MESH_JOB)
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.launch.cli", "submit", "jobs/mesh.yaml", "--address", ray_head.dashboard_url,
         "--submission-id", "tessera-test-ok", "--timeout", "400"],
        cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted tessera-test-ok" in proc.stdout and "tessera-test-ok SUCCEEDED" in proc.stdout
    assert _result(proc.stdout)["mesh"]["correct"]  # the driver's logs were followed to the end


def test_tessera_submit_without_the_token_says_what_to_export(ray_head, tmp_path):
    """The head uses token auth: a submission without the token is refused, and the error says how to fix it."""
    (tmp_path / "mesh.yaml").write_text(MESH_JOB)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.launch.cli", "submit", "mesh.yaml", "--address", ray_head.dashboard_url,
         "--timeout", "120"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "refused the request for lack of a valid token" in proc.stderr
    assert "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN" in proc.stderr


def test_a_given_token_is_sent_without_setting_the_mode(ray_head, tmp_path):
    """RAY_AUTH_TOKEN_PATH (a 0600 file) alone is enough: tessera puts its client in token mode."""
    (tmp_path / "mesh.yaml").write_text(MESH_JOB)
    token = tmp_path / "token"
    token.write_text(ray_head.env["RAY_AUTH_TOKEN"])
    token.chmod(0o600)
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    proc = subprocess.run(
        [sys.executable, "-m", "tessera.launch.cli", "submit", "mesh.yaml", "--address", ray_head.dashboard_url,
         "--submission-id", "tessera-test-token-path", "--timeout", "400"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tessera-test-token-path SUCCEEDED" in proc.stdout


EMBEDDED_AUTH_PROBE = textwrap.dedent("""
    import json, os, stat, subprocess, sys
    import ray
    from tessera.runtime.ray_env import RayConnection
    report = {}
    for session in range(2):  # a second embedded Ray in the same process gets a fresh token
        RayConnection.acquire(num_cpus=2)
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        worker_env = ray.get(ray.remote(lambda: (os.environ.get("RAY_AUTH_MODE"),
                                                 os.environ.get("RAY_AUTH_TOKEN_PATH"))).remote())
        gcs = ray.get_runtime_context().gcs_address
        bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={gcs!r}); print('CONNECTED')"],
                               env=bare, capture_output=True, text=True, timeout=120)
        report[session] = {
            "mode": os.environ["RAY_AUTH_MODE"], "path": path,
            "file_mode": stat.S_IMODE(os.stat(path).st_mode), "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode),
            "worker_env": list(worker_env), "unauthenticated_connected": "CONNECTED" in probe.stdout,
        }
        RayConnection.release()
        report[session]["after"] = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
        report[session]["token_left"] = os.path.exists(path)
    report["home_ray"] = os.path.exists(os.path.expanduser("~/.ray"))
    print("REPORT " + json.dumps(report))
""")


def test_embedded_ray_uses_a_private_token(tmp_path):
    """tessera's embedded Ray: token mode set explicitly, a fresh token in a 0600 file in a 0700 dir (never
    ~/.ray), seen by the workers, refused to a client without it, removed with the environment restored."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", EMBEDDED_AUTH_PROBE], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["0"]["path"] != report["1"]["path"]
    for session in ("0", "1"):
        r = report[session]
        assert r["mode"] == "token" and r["file_mode"] == 0o600 and r["dir_mode"] == 0o700
        assert r["worker_env"] == ["token", r["path"]]
        assert not r["unauthenticated_connected"]
        assert r["after"] == {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN_PATH": None} and not r["token_left"]
    assert not report["home_ray"], "Ray wrote a token under HOME"


# Run in a child process: EmbeddedAuth edits os.environ's RAY_AUTH_* variables, and a Ray driver in the
# test process (the session's shared cluster) that opens a new GCS connection while they are edited sends
# the wrong token and dies on a RAY_CHECK (exit 1, pytest's own output lost).
USERS_TOKEN_PROBE = textwrap.dedent("""
    import logging, os, sys
    from tessera.config import ConfigError
    from tessera.runtime.ray_env import EmbeddedAuth

    class Lines(logging.Handler):
        text = ""
        def emit(self, record):
            Lines.text += record.getMessage() + "\\n"

    logging.getLogger().addHandler(Lines())
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(name, None)
    os.environ["RAY_AUTH_TOKEN"] = "users-own-token"
    auth = EmbeddedAuth()
    auth.enable()
    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN"] == "users-own-token"
    assert auth.token_path is None and "RAY_AUTH_TOKEN_PATH" not in os.environ
    auth.disable()
    assert "RAY_AUTH_MODE" not in os.environ and os.environ["RAY_AUTH_TOKEN"] == "users-own-token"
    del os.environ["RAY_AUTH_TOKEN"]
    os.environ["RAY_AUTH_MODE"] = "disabled"
    auth = EmbeddedAuth()
    auth.enable()
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "anyone who reaches this machine" in Lines.text, Lines.text
    auth.disable()
    os.environ["RAY_AUTH_MODE"] = "tokn"
    try:
        EmbeddedAuth().enable()
    except ConfigError as e:
        assert "RAY_AUTH_MODE='tokn' is not a mode tessera knows" in str(e), str(e)
    else:
        sys.exit("RAY_AUTH_MODE='tokn' was accepted")
    print("OK")
""")


def test_embedded_auth_respects_the_users_token_and_an_explicit_disable():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", USERS_TOKEN_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ray_older_than_2_52_is_refused():
    with pytest.raises(ConfigError, match=r"Ray 2\.51\.1 is too old: tessera needs Ray >= 2\.52"):
        check_ray_version("2.51.1")
    check_ray_version("2.52.0")
    check_ray_version("3.0.0.dev0")
