"""Time to first result of the tiny demo MoE through each launch surface, and where the time goes.

Three runs of the same job (tiny-moe:mixtral, 4 CPU ranks, greedy generation):

- ``direct``: ``tessera run job.yaml`` with an embedded Ray: the baseline;
- ``ray_job``: ``ray job submit --working-dir ... -- tessera run job.yaml`` against a
  real Ray head (token auth) started here;
- ``slurm``: ``tessera slurm submit --nodes 2 --wait`` on a SLURM cluster (the one in
  ``$SLURM_CONF`` if it answers, else a private two-node cluster started here, as in
  the tests), which starts Ray over both nodes and runs the job.

Each run's phases come from wall-clock stamps: the driver's own result JSON
(process start, Ray connect, worker placement, engine load, first result) and,
for SLURM, the batch script's ``tessera-timing:`` lines (job start, Ray head
ready, driver start, teardown). Ratios are against ``direct`` in the same run.

    python -m tessera.benchmarks.bench_launch [--skip-slurm] [--skip-ray-job]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "launch.json"
JOB = """name: bench-launch
task: generate
model: tiny-moe:mixtral
plan: {ep: 4}
prompts: ["the router sends every token"]
sampling: {max_new_tokens: 8}
"""


def _result_from(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("result: ")]
    if not lines:
        raise RuntimeError(f"no result line in the output:\n{text[-3000:]}")
    return json.loads(lines[-1][len("result: "):])


def _driver_phases(result: dict[str, Any], t0: float) -> dict[str, float]:
    """Seconds of each driver phase, from the driver's own stamps; t0 = when the surface was invoked."""
    tm = result["timings"]
    launch = tm["launch_s"]
    return {
        "until_driver_cli_loaded_s": tm["cli_loaded_unix"] - t0,
        "driver_imports_and_setup_s": tm["ready_unix"] - tm["cli_loaded_unix"] - launch["total_s"],
        "ray_connect_s": launch["ray_connect_s"],
        "wait_for_all_nodes_s": launch["wait_nodes_s"],
        "model_build_or_cache_s": launch["model_s"],
        "plan_s": launch["plan_s"],
        "workers_placement_group_and_process_group_s": launch["workers_s"],
        "engine_load_s": launch["engine_load_s"],
        "first_generation_s": tm["first_result_unix"] - tm["ready_unix"],
    }


def run_direct(workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "tessera.launch.cli", "run", "job.yaml"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)
    t_end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"direct run failed: {proc.stderr[-2000:]}")
    result = _result_from(proc.stdout)
    first = result["timings"]["first_result_unix"] - t0
    return {"first_result_s": first, "total_s": t_end - t0, "phases": _driver_phases(result, t0),
            "after_first_result_s": t_end - result["timings"]["first_result_unix"]}


def run_ray_job(workdir: Path) -> dict[str, Any]:
    from tessera.launch.local_cluster import BIN, start_ray_head, stop_ray_head

    t_head = time.time()
    head = start_ray_head(num_cpus=4)
    head_ready_s = time.time() - t_head
    try:
        env = {**head.env, "TESSERA_LOG_LEVEL": "WARNING"}
        t0 = time.time()
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir", str(workdir),
             "--", "tessera", "run", "job.yaml"],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=900,
        )
        t_end = time.time()
    finally:
        stop_ray_head(head)
    if proc.returncode != 0:
        raise RuntimeError(f"ray job submit failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    result = _result_from(proc.stdout)
    return {"first_result_s": result["timings"]["first_result_unix"] - t0, "total_s": t_end - t0,
            "phases": _driver_phases(result, t0),
            "after_first_result_s": t_end - result["timings"]["first_result_unix"],
            "not_counted": {"ray_head_start_s": head_ready_s}}


def _slurm_env() -> tuple[dict[str, str] | None, Any]:
    """A working SLURM (the machine's, if it answers), else a private 2-node cluster started here."""
    if shutil.which("sinfo"):
        probe = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and probe.stdout.strip():
            return dict(os.environ), None
    from tessera.launch.local_cluster import slurm_unavailable_reason, start_slurm

    reason = slurm_unavailable_reason()
    if reason:
        return None, reason
    cluster = start_slurm()
    return cluster.env, cluster


def run_slurm(workdir: Path, home: Path) -> dict[str, Any]:
    from tessera.launch.local_cluster import BIN, free_ports, stop_slurm

    env, cluster = _slurm_env()
    if env is None:
        return {"skipped": cluster}
    run_root = Path(tempfile.mkdtemp(prefix="tsb", dir="/tmp"))
    try:
        ray_port, dash_port = free_ports(2)
        full_env = {**env, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "TESSERA_LOG_LEVEL": "WARNING",
                    "TESSERA_CACHE": os.environ.get("TESSERA_CACHE", str(Path.home() / ".cache" / "tessera"))}
        full_env = {k: v for k, v in full_env.items() if not k.startswith("RAY_")}
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "tessera.launch.cli", "slurm", "submit", "job.yaml", "--nodes", "2",
             "--cpus-per-node", "2", "--wait", "--log", str(workdir / "slurm-%j.out"), "--out",
             str(workdir / "job.sbatch"), "--ray-port", str(ray_port), "--dashboard-port", str(dash_port),
             "--port-base", str(45000 + (os.getpid() % 50) * 200), "--run-root", str(run_root),
             "--ray-start-args=--object-store-memory=150000000"],
            cwd=workdir, env=full_env, capture_output=True, text=True, timeout=900,
        )
        t_end = time.time()
    finally:
        if cluster is not None and not isinstance(cluster, str):
            stop_slurm(cluster)
        shutil.rmtree(run_root, ignore_errors=True)
    logs = "".join(p.read_text() for p in workdir.glob("slurm-*.out"))
    if proc.returncode != 0:
        raise RuntimeError(f"slurm submit failed: {proc.stderr[-1000:]} {logs[-3000:]}")
    stamps = {k: float(v) for k, v in re.findall(r"tessera-timing: (\w+) ([\d.]+)", logs)}
    result = _result_from(logs)
    phases = {"queue_and_job_start_s": stamps["job_start"] - t0,
              "ray_head_start_s": stamps["head_ready"] - stamps["job_start"],
              "launch_worker_step_s": stamps["driver_start"] - stamps["head_ready"]}
    driver = _driver_phases(result, t0)
    driver.pop("until_driver_cli_loaded_s")
    phases["driver_python_start_s"] = result["timings"]["cli_loaded_unix"] - stamps["driver_start"]
    phases.update(driver)
    return {"first_result_s": result["timings"]["first_result_unix"] - t0, "total_s": t_end - t0, "phases": phases,
            "after_first_result_s": t_end - result["timings"]["first_result_unix"],
            "teardown_s": stamps["teardown_done"] - stamps["teardown_start"], "nodes": result["nodes"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-slurm", action="store_true")
    parser.add_argument("--skip-ray-job", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    from tessera.launch.api import materialise_model

    print("building (or reusing) the tiny model once, so no run pays for it ...", flush=True)
    materialise_model("tiny-moe:mixtral")
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-launch-"))
    home = work / "home"
    home.mkdir()
    (work / "job.yaml").write_text(JOB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TESSERA_LOG_LEVEL="WARNING", RAY_AUTH_MODE="disabled")
    runs: dict[str, Any] = {}
    try:
        for name, fn in (("direct", lambda: run_direct(work, env)),
                         ("ray_job", None if args.skip_ray_job else lambda: run_ray_job(work)),
                         ("slurm", None if args.skip_slurm else lambda: run_slurm(work, home))):
            if fn is None:
                continue
            print(f"== {name} ...", flush=True)
            try:
                runs[name] = fn()
            except Exception as err:  # noqa: BLE001 - record it, measure the other surfaces
                runs[name] = {"error": f"{type(err).__name__}: {str(err)[-1500:]}"}
                print(f"   {name} failed: {runs[name]['error'][-500:]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs["direct"].get("first_result_s")
    for name, run in runs.items():
        if "first_result_s" in run and base:
            run["first_result_vs_direct"] = run["first_result_s"] / base
    print(f"\n{'surface':<9} {'first result s':>15} {'x direct':>9} {'total s':>8}")
    for name, run in runs.items():
        if "first_result_s" not in run:
            print(f"{name:<9} {'skipped: ' + run['skipped'] if 'skipped' in run else 'FAILED'}")
            continue
        ratio = run.get("first_result_vs_direct", float("nan"))
        print(f"{name:<9} {run['first_result_s']:>15.1f} {ratio:>9.2f} {run['total_s']:>8.1f}")
    for name, run in runs.items():
        if "phases" in run:
            print(f"\n{name}: where the time to first result goes")
            for phase, secs in run["phases"].items():
                print(f"  {phase:<46} {secs:>7.2f} s")
    out = {
        "benchmark": "launch",
        "what": "time from invoking each launch surface to the first generated result, tiny-moe:mixtral, ep=4 on CPU",
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "job": JOB,
        "runs": runs,
        "measured_at_unix": time.time(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if any("error" in run for run in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
