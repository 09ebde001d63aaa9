"""The CLI: every subcommand explains itself; exit codes scripts can trust; `tessera run` runs a job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tessera.launch.cli import build_parser

TESSERA = [sys.executable, "-m", "tessera.launch.cli"]
MINE = ["run", "plan", "submit", "slurm", "bench"]


def cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TESSERA_LOG_LEVEL": "WARNING", "RAY_AUTH_MODE": "disabled", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([*TESSERA, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in MINE:
        assert name in sub.choices, f"subcommand {name} is not registered"
        text = sub.choices[name].format_help()
        assert len(sub.choices[name].description or "") > 60, f"{name} --help explains too little"
        assert "usage: " in text
    slurm_sub = next(a for a in sub.choices["slurm"]._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"render", "submit"} <= set(slurm_sub.choices)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["run", "missing.yaml"], 2, "does not exist"),
        (["run", "--plan", "tq=2"], 2, "unknown mesh dim 'tq'"),
        (["run", "--task", "generate", "--model", "tiny-moe:mixtral", "--plan", "tp=2"], 2, "needs at least one prompt"),
        (["plan", "--plan", "tp=0"], 2, "every degree must be >= 1"),
        (["bench", "no-such-bench"], 2, "no benchmark 'no-such-bench'"),
        (["slurm", "render", "missing.yaml", "--nodes", "2"], 2, "does not exist"),
        (["submit", "missing.yaml", "--address", "http://127.0.0.1:1"], 2, "does not exist"),
    ],
)
def test_errors_are_one_line_and_nonzero(tmp_path, args, code, message):
    proc = cli(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_plan_shows_ranks_without_starting_anything(tmp_path):
    proc = cli("plan", "--plan", "pp=2,tp=2", "--json", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["world_size"] == 4 and out["ranks"][3]["coords"] == {"pp": 1, "tp": 1}
    assert out["resources"] == {"CPU": 4.0}


def test_run_job_file_embedded(tmp_path):
    (tmp_path / "mesh.yaml").write_text("task: mesh\nplan: {pp: 2, tp: 2}\nmesh: {payload_bytes: 4096}\n")
    proc = cli("run", "mesh.yaml", "--output", "out/result.json", cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "collectives over each dim: all correct" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("result: ")
    result = json.loads(last[len("result: "):])
    assert result["ok"] and result["mesh"]["dims"] == {"pp": 2, "tp": 2}
    assert [r["coords"] for r in result["placement"]][3] == {"pp": 1, "tp": 1}
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == result


def test_plan_auto_asks_the_planner(tmp_path):
    import importlib.util

    proc = cli("plan", "--model", "tiny-moe:mixtral", "--plan", "auto", cwd=tmp_path, timeout=300)
    if importlib.util.find_spec("tessera.memory.planner") is None:
        assert proc.returncode == 2 and "needs tessera.memory.planner" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert "rank 0:" in proc.stdout and "per rank" in proc.stdout  # the planner's description
    bad = cli("plan", "--model", "tiny-moe:mixtral", "--plan", "tp=3", cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "tp=3 does not divide" in bad.stderr
