"""`ray job submit -- tessera run` and `tessera submit` against a real Ray head with token auth."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tessera.launch.local_cluster import BIN, RayHead, ray_head_fixture

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
